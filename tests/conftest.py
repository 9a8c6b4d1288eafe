"""Shared fixtures: real cowfs mounts (through the CLI), busybox-static guests, helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from contextd_harness import Contextd, running_contextd

ROOT = Path(__file__).resolve().parent.parent
COWFS = str(Path(sys.executable).parent / "cowfs")
# A host layout of the test run's own (state database, store, guests/): the
# CLI and the mount daemons the tests start inherit it.
os.environ["COWFS_ROOT"] = tempfile.mkdtemp(prefix="cowfs-test-root-")
COW_MARK = "trusted.cowfs.cow"


def pytest_configure(config: pytest.Config) -> None:
    # Refused, not skipped: a run that tested nothing must not look like a green one.
    if os.geteuid() != 0:
        raise pytest.UsageError(
            "the tests need root (real FUSE mounts with allow_other, namespaces, cgroups):"
            " run them as root (tools/test.sh)"
        )


def run(
    *args: str | os.PathLike[str], check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; with check, a failure shows its output."""
    argv = [str(a) for a in args]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(
            f"{argv} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def cowfs(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the cowfs CLI."""
    return run(COWFS, *args, check=check)


def is_marked(path: str | os.PathLike[str]) -> bool:
    """True if the backing file at path carries the COW mark."""
    try:
        os.getxattr(path, COW_MARK, follow_symlinks=False)
    except OSError:
        return False
    return True


def build_busybox_guest(path: Path) -> Path:
    """A busybox-static guest tree at path."""
    run(ROOT / "tools" / "mkguest-busybox.sh", path)
    return path


class Mounts:
    """Mounts made by a test, all unmounted at teardown."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def mount(self, backing: Path, mountpoint: Path, *extra: str) -> Path:
        mountpoint.mkdir(parents=True, exist_ok=True)
        cowfs("mount", *extra, backing, mountpoint)
        self.points.append(mountpoint)
        return mountpoint

    def umount(self, mountpoint: Path) -> None:
        cowfs("umount", mountpoint)
        self.points.remove(mountpoint)

    def cleanup(self) -> None:
        for point in reversed(self.points):
            if cowfs("umount", point, check=False).returncode != 0:
                run("umount", "-l", point, check=False)
        self.points.clear()


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Contextd]:
    """A contextd daemon of the test's own (its own directories), stopped afterwards."""
    with running_contextd(tmp_path / "contextd") as daemon:
        yield daemon


@pytest.fixture
def netctx(tmp_path: Path) -> Iterator[Contextd]:
    """The same, in a network namespace of its own (its bridges never touch the host's)."""
    with running_contextd(tmp_path / "contextd", own_network=True) as daemon:
        yield daemon


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    """Mount helper; everything it mounted is unmounted afterwards."""
    m = Mounts()
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture(scope="session")
def busybox_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine busybox guest; copy it (cp -a) before changing anything."""
    return build_busybox_guest(tmp_path_factory.mktemp("template") / "busybox")


@pytest.fixture
def guest_tree(tmp_path: Path, busybox_template: Path) -> Path:
    """A private copy of the busybox guest, a test may use it as a template."""
    dest = tmp_path / "template"
    run("cp", "-a", busybox_template, dest)
    return dest


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    """An empty backing tree."""
    path = tmp_path / "backing"
    path.mkdir()
    return path


@pytest.fixture
def mnt(tmp_path: Path, backing: Path, mounts: Mounts) -> Path:
    """An empty backing tree mounted through cowfs."""
    return mounts.mount(backing, tmp_path / "mnt")


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under root: type, mode, owner, size, mtime, content or target, xattrs."""
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if os.path.islink(path):
                content: object = os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    content = f.read()
            else:
                content = None
            xattrs = tuple(
                sorted(
                    (n, os.getxattr(path, n, follow_symlinks=False))
                    for n in os.listxattr(path, follow_symlinks=False)
                    if n != COW_MARK
                )
            )
            result[os.path.relpath(path, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size if not os.path.isdir(path) else None,
                st.st_mtime_ns,
                content,
                xattrs,
            )
    return result


@pytest.fixture
def host_disk(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """A block device of the host holding data (a loop device on a file that starts with
    "host disk"): its node, major and minor, for attacks on the host's disks."""
    image = tmp_path / "host-disk.img"
    with open(image, "wb") as f:
        f.write(b"host disk".ljust(1 << 20, b"\0"))
    node = Path(run("losetup", "--find", "--show", image).stdout.strip())
    try:
        rdev = node.stat().st_rdev
        yield node, os.major(rdev), os.minor(rdev)
    finally:
        run("losetup", "--detach", node, check=False)


def have(program: str) -> bool:
    """True if program is on PATH."""
    return shutil.which(program) is not None
