"""One lock per guest tree: no clone, hashify or delete of a tree in use, no mount of a tree being
hashified.

The attack: a guest process opens a file for writing through its mount; the
admin clones (or hashifies) the guest's tree, which makes that file's inode
shared; the process writes through its old handle, and the write lands in the
shared inode, so in the clone (or the store and the other guests). Each test
makes the attack end to end and checks its outcome before the refusal, so
that with the lock taken away it fails on what the attack did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import COWFS, Mounts, cowfs, is_marked, run

from cowfs.errors import CowfsError
from cowfs.host.treelock import remove_tree, tree_lock
from cowfs.unify.clone import CloneStats, clone
from cowfs.unify.hashify import HashifyOptions, HashifyReport, hashify

WRITE = "written through a handle opened before\n"


def mount(mounts: Mounts, backing: Path, point: Path) -> int:
    """Mount backing at point (unmounted at the end of the test); the FUSE server's pid."""
    point.mkdir(parents=True, exist_ok=True)
    out = cowfs("mount", backing, point).stdout
    mounts.points.append(point)
    return int(out.rsplit("(pid ", 1)[1].rstrip(")\n"))


class Writer:
    """A shell in the guest (chroot of its mount) holding a file open for appending on fd 3."""

    def __init__(self, mnt: Path, path: str):
        script = f'exec 3>>{path}; echo ready; read line; echo "$line" >&3; echo done'
        self.proc = subprocess.Popen(
            ["chroot", str(mnt), "/bin/sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def write_and_end(self, line: str) -> None:
        """Write line through the old handle, and wait until the shell has ended."""
        out, _ = self.proc.communicate(line, timeout=30)
        assert out == "done\n" and self.proc.returncode == 0


@pytest.fixture
def writer_cleanup() -> Iterator[list[Writer]]:
    writers: list[Writer] = []
    yield writers
    for w in writers:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def in_use(role: str, tree: Path, mnt: Path, pid: int) -> str:
    return f"cowfs: error: {role} {tree}: in use (mounted at {mnt}, pid {pid}); unmount it first\n"


def test_clone_of_a_mounted_tree_is_refused_and_the_writer_stays_in_its_guest(
    tmp_path: Path, guest_tree: Path, mounts: Mounts, writer_cleanup: list[Writer]
) -> None:
    guest, new = guest_tree, tmp_path / "clone"
    assert (guest / "etc" / "hostname").stat().st_nlink == 1
    mnt = tmp_path / "mnt"
    pid = mount(mounts, guest, mnt)
    writer = Writer(mnt, "/etc/hostname")
    writer_cleanup.append(writer)
    attempt = cowfs("clone", guest, new, check=False)
    writer.write_and_end(WRITE)
    # what the attack would have done: the guest's write in the clone's file
    assert (guest / "etc" / "hostname").read_text() == "busybox-guest\n" + WRITE
    if new.exists():
        assert (new / "etc" / "hostname").read_text() == "busybox-guest\n", "written into the clone"
    # refused, with nothing made or marked
    assert (attempt.returncode, attempt.stdout) == (1, "")
    assert attempt.stderr == in_use("template", guest, mnt, pid)
    assert not new.exists() and not list(tmp_path.glob(".clone.cowfs-clone-*"))
    assert not is_marked(guest / "etc" / "hostname") and not is_marked(guest / "bin" / "busybox")
    # unmounted, the tree is free again
    mounts.umount(mnt)
    cowfs("clone", guest, new)
    assert (new / "etc" / "hostname").stat().st_ino == (guest / "etc" / "hostname").stat().st_ino


def test_hashify_of_a_mounted_guest_is_refused_and_the_writer_stays_in_its_guest(
    tmp_path: Path, guest_tree: Path, mounts: Mounts, writer_cleanup: list[Writer]
) -> None:
    a, b, store = guest_tree, tmp_path / "b", tmp_path / "store"
    run("cp", "-a", a, b)  # the same files, mtimes included: hashify would unify them
    mnt = tmp_path / "mnt"
    pid = mount(mounts, a, mnt)
    writer = Writer(mnt, "/etc/hostname")
    writer_cleanup.append(writer)
    args: list[str | Path] = [
        "hashify", "--no-default-excludes", "--min-size", "1", "--store", store, a, b
    ]  # fmt: skip
    attempt = cowfs(*args, check=False)
    writer.write_and_end(WRITE)
    # what the attack would have done: the write in b or the store, or lost from a's name
    assert (a / "etc" / "hostname").read_text() == "busybox-guest\n" + WRITE
    assert (b / "etc" / "hostname").read_text() == "busybox-guest\n"
    entries = [p for p in store.rglob("*") if p.is_file()] if store.exists() else []
    assert not [p for p in entries if WRITE.encode() in p.read_bytes()]
    # refused, with nothing changed
    assert (attempt.returncode, attempt.stdout) == (1, "")
    assert attempt.stderr == in_use("guest", a, mnt, pid)
    assert not store.exists()
    assert (a / "etc" / "hostname").stat().st_nlink == 1 and not is_marked(b / "bin" / "busybox")
    mounts.umount(mnt)
    cowfs(*args)
    assert (a / "bin" / "busybox").stat().st_ino == (b / "bin" / "busybox").stat().st_ino


def test_a_guest_is_not_mounted_while_hashify_runs_on_it(tmp_path: Path, guest_tree: Path) -> None:
    a, b = guest_tree, tmp_path / "b"
    run("cp", "-a", a, b)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    attempts: list[subprocess.CompletedProcess[str]] = []

    def mount_meanwhile(phase: str, report: HashifyReport) -> None:
        # a real run, between two directories of its scan: it holds its guests
        if not attempts:
            attempts.append(run(COWFS, "mount", a, mnt, check=False))

    options = HashifyOptions(store=tmp_path / "store", ignore_mtime=True)
    report = hashify([str(a), str(b)], options, mount_meanwhile).report
    try:
        assert report.unified_files > 0
        assert attempts and (attempts[0].returncode, attempts[0].stdout) == (1, "")
        # this process runs hashify: /proc/locks names it, with its command line
        prefix = f"cowfs: error: backing tree {a}: in use (by pid {os.getpid()}: "
        assert attempts[0].stderr.startswith(prefix), attempts[0].stderr
        assert attempts[0].stderr.endswith("); wait for it to end, or stop it\n")
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            cowfs("umount", mnt)
    # once hashify has ended, the guest mounts
    cowfs("mount", a, mnt)
    cowfs("umount", mnt)


HOLDER = (
    "import sys, cowfs.host.treelock as t; k = t.tree_lock(sys.argv[1], True); print(1); input()"
)


def test_a_tree_held_by_another_command_names_it(tmp_path: Path, guest_tree: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(guest_tree)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "1\n"
        refused = cowfs("clone", guest_tree, tmp_path / "new", check=False)
        assert refused.returncode == 1 and not (tmp_path / "new").exists()
        assert refused.stderr == (
            f"cowfs: error: template {guest_tree}: in use (by pid {holder.pid}:"
            f" {sys.executable} -c {HOLDER} {guest_tree}); wait for it to end, or stop it\n"
        )
    finally:
        holder.communicate("\n", timeout=30)
    cowfs("clone", guest_tree, tmp_path / "new")  # free once the holder has ended


def test_clones_of_one_template_may_run_together(tmp_path: Path, guest_tree: Path) -> None:
    with tree_lock(str(guest_tree), exclusive=False, role="template"):  # another clone's hold
        cowfs("clone", guest_tree, tmp_path / "one")
    with tree_lock(str(guest_tree), exclusive=True):
        assert cowfs("clone", guest_tree, tmp_path / "two", check=False).returncode == 1


def test_a_clone_being_built_cannot_be_mounted(tmp_path: Path) -> None:
    template = tmp_path / "template"
    template.mkdir()
    for i in range(1100):  # clone reports progress every 1,000 entries
        (template / f"f{i}").write_text("x")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    attempts: list[subprocess.CompletedProcess[str]] = []

    def mount_meanwhile(stats: CloneStats) -> None:
        (work,) = tmp_path.glob(".new.cowfs-clone-*")
        attempts.append(run(COWFS, "mount", work, mnt, check=False))

    try:
        clone(str(template), str(tmp_path / "new"), mount_meanwhile)
        assert attempts and attempts[0].returncode == 1, attempts
        assert "in use (by pid" in attempts[0].stderr and not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            cowfs("umount", mnt)


def test_a_tree_around_or_inside_a_mounted_one_is_refused(
    tmp_path: Path, guest_tree: Path, mounts: Mounts
) -> None:
    """The lock covers a tree's root; the mount registry covers what lies around it."""
    mnt = tmp_path / "mnt"
    mount(mounts, guest_tree, mnt)
    outer = cowfs("clone", tmp_path, tmp_path.parent / f"{tmp_path.name}-copy", check=False)
    assert outer.returncode == 1
    assert f"in use ({guest_tree} is mounted at {mnt}); unmount it first" in outer.stderr
    inner = cowfs("hashify", "--store", tmp_path / "store", guest_tree / "etc", check=False)
    assert inner.returncode == 1
    assert f"in use ({guest_tree} is mounted at {mnt}); unmount it first" in inner.stderr


def test_delete_refuses_a_mounted_tree(
    tmp_path: Path, guest_tree: Path, mounts: Mounts, writer_cleanup: list[Writer]
) -> None:
    mnt = tmp_path / "mnt"
    pid = mount(mounts, guest_tree, mnt)
    with pytest.raises(CowfsError) as refused:
        remove_tree(str(guest_tree))
    assert f"cowfs: error: {refused.value}\n" == in_use("guest tree", guest_tree, mnt, pid)
    assert (guest_tree / "bin" / "busybox").exists()
    mounts.umount(mnt)
    remove_tree(str(guest_tree))
    assert not guest_tree.exists()


def test_delete_refuses_a_root_that_is_a_symlink(tmp_path: Path, guest_tree: Path) -> None:
    """A guest file whose root names a symlink (to a template, another guest's
    tree): --remove-root removes neither the tree it names nor the link."""
    link = tmp_path / "guest-root"
    link.symlink_to(guest_tree)
    with pytest.raises(CowfsError) as refused:
        remove_tree(str(link))
    assert str(refused.value) == (
        f"guest tree {link}: a symlink (to {guest_tree}); not removed:"
        " remove the tree it names yourself if that is meant"
    )
    assert (guest_tree / "bin" / "busybox").exists()
    assert link.is_symlink()
    # Control: through a symlinked parent directory the tree is removed.
    parent_link = tmp_path / "trees"
    parent_link.symlink_to(guest_tree.parent)
    remove_tree(str(parent_link / guest_tree.name))
    assert not guest_tree.exists()


def test_a_lazily_detached_mount_in_use_keeps_its_tree(
    tmp_path: Path, guest_tree: Path, mounts: Mounts, writer_cleanup: list[Writer]
) -> None:
    """umount --lazy with a writer inside: the FUSE server (and its lock) lives on."""
    mnt = tmp_path / "mnt"
    mount(mounts, guest_tree, mnt)
    writer = Writer(mnt, "/etc/hostname")
    writer_cleanup.append(writer)
    run("umount", "--lazy", mnt)  # (cowfs umount would wait for the server to end)
    mounts.points.remove(mnt)
    refused = cowfs("clone", guest_tree, tmp_path / "new", check=False)
    writer.write_and_end(WRITE)
    assert (
        not (tmp_path / "new").exists()
        or WRITE not in (tmp_path / "new" / "etc" / "hostname").read_text()
    )
    assert refused.returncode == 1 and "in use (" in refused.stderr


def test_a_killed_mount_leaves_no_stale_lock(
    tmp_path: Path, guest_tree: Path, mounts: Mounts
) -> None:
    mnt = tmp_path / "mnt"
    pid = mount(mounts, guest_tree, mnt)
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not os.path.exists(f"/proc/{pid}/fd"):  # gone, or a zombie: its fds are closed
            break
        time.sleep(0.05)
    cowfs("clone", guest_tree, tmp_path / "new")


def test_a_symlink_to_a_mounted_tree_is_refused_as_the_tree_itself(
    tmp_path: Path, guest_tree: Path, mounts: Mounts
) -> None:
    """An alias must not dodge the lock: clone and hashify resolve it first, and a clone
    cannot be made inside a mount through a link to it either."""
    mnt = tmp_path / "mnt"
    pid = mount(mounts, guest_tree, mnt)
    alias = tmp_path / "alias"
    alias.symlink_to(guest_tree)
    attempt = cowfs("clone", alias, tmp_path / "clone", check=False)
    assert (attempt.returncode, attempt.stderr) == (1, in_use("template", guest_tree, mnt, pid))
    assert not (tmp_path / "clone").exists()
    attempt = cowfs("hashify", "--store", tmp_path / "store", alias, check=False)
    assert (attempt.returncode, attempt.stderr) == (1, in_use("guest", guest_tree, mnt, pid))
    small = tmp_path / "small"
    (small / "etc").mkdir(parents=True)
    (small / "etc" / "motd").write_text("hello\n")
    into_mount = tmp_path / "into"
    into_mount.symlink_to(mnt)
    attempt = cowfs("clone", small, into_mount / "x", check=False)
    assert attempt.returncode == 1 and attempt.stderr.startswith("cowfs: error: ")
    assert not (guest_tree / "x").exists() and not is_marked(small / "etc" / "motd")
    assert not is_marked(guest_tree / "etc" / "hostname")
