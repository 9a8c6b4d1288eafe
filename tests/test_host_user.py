"""The commands run by a host user who is not root: one line saying why not, no traceback,
nothing changed.

The interpreter and the checkout may sit where host users cannot reach them
(pyenv under /root, mode 0700, on the development machines): each command runs
in a mount namespace of its own where the directories in the way are replaced by
a tmpfs (0755) holding only what it needs, bound from the original, and then as
uid/gid 65534 with no capabilities (setpriv). Only the way to the program is
opened; the host layout (/var/lib/cowfs, the test's COWFS_ROOT, /run/cowfs,
/etc/contextd) stays as it is.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from contextd_harness import SLEEPER, Contextd, guest_status

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NOBODY = 65534


def _closed_ancestor(path: Path) -> tuple[Path, str] | None:
    """The first directory above path that others cannot search, and path's component
    right below it; None if path is reachable."""
    for parent in reversed(path.parents):
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            return parent, path.relative_to(parent).parts[0]
    return None


def _as_host_user(
    *argv: str | os.PathLike[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run argv as the host user, in cwd (entered as root, so that the user needs no way
    to it) with env (the test's environment by default)."""
    needed = [Path(os.path.realpath(sys.base_prefix)), ROOT, Path(os.path.realpath(BIN))]
    keep = Path(os.environ["COWFS_ROOT"]).parent / f"host-user-{os.getpid()}"
    script = ["set -e"]
    opened: dict[Path, set[str]] = {}
    for path in needed:
        closed = _closed_ancestor(path)
        if closed is not None:
            opened.setdefault(closed[0], set()).add(closed[1])
    for number, (directory, children) in enumerate(sorted(opened.items())):
        saved = keep / str(number)
        script.append(f"mkdir -p {saved} && mount --bind {directory} {saved}")
        script.append(f"mount -t tmpfs -o mode=0755 host-user {directory}")
        for child in sorted(children):
            script.append(f"mkdir -p {directory / child}")
            script.append(f"mount --bind {saved / child} {directory / child}")
    if cwd is not None:
        script.append(f"cd {shlex.quote(str(cwd))}")
    script.append(
        f"exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --inh-caps=-all"
        f" --bounding-set=-all -- {shlex.join(str(a) for a in argv)}"
    )
    try:
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd="/",
            env=env,
        )
    finally:
        subprocess.run(["rm", "-rf", str(keep)], check=False)


def _one_line_refusal(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


def test_a_host_user_can_run_the_commands_at_all() -> None:
    # What the refusals below rest on: the program runs as that user, not for a lack of it.
    result = _as_host_user(BIN / "cowfs", "--help")
    assert result.returncode == 0 and "Usage: cowfs" in result.stdout, result
    assert _as_host_user("id", "-u").stdout.strip() == str(NOBODY)


@pytest.mark.parametrize(
    "argv",
    [
        ("du",),
        ("du", "--recalc", "web1"),
        ("hashify", "--dry-run", "web1"),
        ("hashify", "web1"),
        ("limit", "show"),
        ("limit", "set", "web1", "--space", "1G"),
        ("limit", "clear", "web1"),
        ("quota", "report", "web1"),
        ("quota", "set", "web1", "--user", "alice", "--space-hard", "1M"),
        ("quota", "clear", "web1", "--user", "alice"),
        ("store", "gc"),
        ("store", "verify"),
        ("clone", "/var/lib/cowfs/guests/a", "/var/lib/cowfs/guests/b"),
        ("umount", "/var/lib/cowfs/guests/a"),
    ],
    ids=lambda argv: "-".join(a for a in argv[:2] if not a.startswith("/")),
)
def test_cowfs_refuses_a_host_user_in_one_line(argv: tuple[str, ...]) -> None:
    before = sorted(os.listdir(os.environ["COWFS_ROOT"]))
    result = _as_host_user(BIN / "cowfs", *argv)
    _one_line_refusal(result, "cowfs: error: ")
    assert "root" in result.stderr
    assert sorted(os.listdir(os.environ["COWFS_ROOT"])) == before


def test_cowfs_mount_refuses_a_host_user_in_one_line(tmp_path: Path) -> None:
    result = _as_host_user(BIN / "cowfs", "mount", "/", "/tmp")
    _one_line_refusal(result, "cowfs: error: ")
    assert "/tmp" not in {
        line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if "cowfs" in line
    }


def test_contextd_refuses_a_host_user_in_one_line(tmp_path: Path) -> None:
    _one_line_refusal(_as_host_user(BIN / "contextd", "serve"), "must run as root")
    result = _as_host_user(BIN / "contextd", "list")
    _one_line_refusal(result, "contextd: error: ")


def test_every_contextd_verb_of_a_host_user_is_refused_by_the_daemon(
    ctx: Contextd, guest_tree: Path
) -> None:
    """Even with the socket's modes opened, the daemon's own check of its peer refuses each
    verb, in one line, and the guest and the configurations stay as they were."""
    ctx("create", "gapnobody", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "gapnobody")
    init = guest_status(ctx, "gapnobody")["init_pid"]
    configs = {p.name: p.read_text() for p in (ctx.base / "etc").iterdir()}
    sock = ctx.base / "run" / "contextd.sock"
    os.chmod(sock, 0o666)
    os.chmod(sock.parent, 0o711)
    env = {**ctx.env, "CONTEXTD_SOCKET": sock.name}  # reached from its directory
    try:
        for verb in (
            ["list"],
            ["status", "gapnobody"],
            ["logs", "gapnobody"],
            ["exec", "gapnobody", "--", "/bin/touch", "/gapmade"],
            ["enter", "gapnobody"],
            ["stop", "gapnobody"],
            ["restart", "gapnobody"],
            ["start", "gapnobody"],
            ["delete", "gapnobody"],
            ["create", "gapother", "--from", str(guest_tree)],
        ):
            result = _as_host_user(BIN / "contextd", *verb, cwd=sock.parent, env=env)
            assert (result.returncode, result.stderr) == (
                1,
                "contextd: error: contextd serves root only\n",
            ), verb
    finally:
        os.chmod(sock, 0o600)
        os.chmod(sock.parent, 0o700)
    status = guest_status(ctx, "gapnobody")
    assert (status["state"], status["init_pid"]) == ("running", init)
    assert {p.name: p.read_text() for p in (ctx.base / "etc").iterdir()} == configs
    made = ctx("exec", "gapnobody", "--", "/bin/sh", "-c", "test -e /gapmade", check=False)
    assert made.returncode == 1
    ctx("stop", "gapnobody")


@pytest.mark.parametrize(
    "argv",
    [
        ("state", "box"),
        ("start", "box"),
        ("kill", "box", "KILL"),
        ("delete", "box"),
        ("ps", "box"),
        ("create", "--bundle", "/nonexistent", "box"),
    ],
    ids=lambda argv: argv[0],
)
def test_contextd_oci_refuses_a_host_user_in_one_line(argv: tuple[str, ...]) -> None:
    # Not "container box does not exist": the user may not look.
    result = _as_host_user(BIN / "contextd-oci", *argv)
    _one_line_refusal(result, "contextd-oci: contextd-oci runs containers as root only")


def test_contextd_oci_prints_its_features_and_a_spec_for_a_host_user(tmp_path: Path) -> None:
    assert _as_host_user(BIN / "contextd-oci", "features").returncode == 0
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    bundle.chmod(0o777)
    done = _as_host_user(BIN / "contextd-oci", "spec", cwd=bundle)  # the bundle: "."
    assert done.returncode == 0, done.stderr
    assert (bundle / "config.json").exists()
