"""contextd-oci under real engines: podman (with conmon) runs containers on cowfs roots.

No registry is reachable: the image is a busybox tree imported from a tarball.
Each test's podman has storage of its own; the runtime is a wrapper that points
contextd-oci at this module's contextd daemon (crun, podman's default, fails on
hosts with hybrid cgroups, so the runtime is always named).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import build_busybox_guest, have, run
from contextd_harness import CONTEXTD, Contextd, parent_of, procfs_alive, wait_for

pytestmark = pytest.mark.skipif(
    not (have("podman") and have("conmon")),
    reason="podman and conmon are not installed (tools/install.sh installs them)",
)

ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
IMAGE = "localhost/cowfs-busybox:1"
CONTEXTD_OCI = str(Path(CONTEXTD).parent / "contextd-oci")


class Podman:
    """podman with storage of its own, its runtime contextd-oci (through a wrapper that
    gives it the test daemon's environment)."""

    def __init__(self, base: Path, daemon: Contextd):
        self.base = base
        self.state = base / "oci-state"
        self.runtime = base / "contextd-oci-wrapper"
        exports = " ".join(
            f"{k}={shlex.quote(v)}"
            for k, v in daemon.env.items()
            # (PYTHONPATH: tools/mutants.py runs the tests on a scratch copy of the code)
            if k.startswith(("CONTEXTD_", "COWFS_")) or k == "PYTHONPATH"
        )
        self.runtime.write_text(
            f'#!/bin/sh\nexport {exports}\nexec {CONTEXTD_OCI} --root {self.state} "$@"\n'
        )
        self.runtime.chmod(0o755)
        self.argv = [
            "podman", "--root", str(base / "storage"), "--runroot", str(base / "runroot"),
            "--cgroup-manager", "cgroupfs", "--runtime", str(self.runtime),
            "--events-backend", "file",
        ]  # fmt: skip

    def __call__(self, *args: str, check: bool = True, timeout: float = 120):
        result = subprocess.run(
            [*self.argv, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {args} exited {result.returncode}: {result.stderr}")
        return result

    def run_container(self, *args: str, check: bool = True):
        return self("run", *ULIMITS, "--network", "none", *args, check=check)

    def inspect(self, container: str, what: str) -> str:
        return self("inspect", "--format", "{{" + what + "}}", container).stdout.strip()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Contextd]:
    base = tmp_path_factory.mktemp("oci-contextd")
    ctx = Contextd(base)
    ctx.serve()
    yield ctx
    ctx.kill()


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory, daemon: Contextd) -> Iterator[Podman]:
    base = tmp_path_factory.mktemp("podman")
    engine = Podman(base, daemon)
    tree = build_busybox_guest(base / "image-tree")
    tarball = base / "image.tar"
    run("tar", "-C", tree, "-cf", tarball, ".")
    engine("import", str(tarball), IMAGE)
    yield engine
    engine("rm", "--all", "--force", "--time", "0", check=False)
    engine("system", "reset", "--force", check=False)


def leftovers(daemon: Contextd, podman: Podman) -> list[str]:
    """What contextd or the runtime still keeps for containers that are gone."""
    found = [f"record {p.name}" for p in (daemon.base / "run" / "oci").glob("*.json")]
    if podman.state.is_dir():
        found += [f"state {p.name}" for p in podman.state.iterdir()]
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line.split()[4]}" for line in mounts.splitlines() if "/roots/oci-" in line]
    found += [
        f"cgroup {d}" for d in Path("/sys/fs/cgroup/pids/contextd").glob("oci-*") if d.is_dir()
    ]
    guests = Path(daemon.env["COWFS_ROOT"]) / "guests"
    found += [f"tree {d.name}" for d in guests.glob("oci-[!i]*")]
    found += [f"zombie {z}" for z in daemon.zombie_children()]
    return found


def test_podman_run_prints_and_passes_the_exit_code_on(daemon: Contextd, podman: Podman) -> None:
    result = podman.run_container("--rm", IMAGE, "sh", "-c", "echo ok; exit 3", check=False)
    assert (result.returncode, result.stdout) == (3, "ok\n"), result.stderr
    assert leftovers(daemon, podman) == []


def test_a_container_runs_on_cowfs_as_the_engines_child(daemon: Contextd, podman: Podman) -> None:
    """The contract with conmon: the pid it is given is the container's init, its child
    (it learns the exit status only as its parent); the root is a cowfs mount."""
    podman.run_container("-d", "--name", "child", IMAGE, "sleep", "1000")
    try:
        pid = int(podman.inspect("child", ".State.Pid"))
        conmon = int(podman.inspect("child", ".State.ConmonPid"))
        ppid = parent_of(pid)
        assert ppid == conmon
        assert Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x001000\x00"
        root_mount = next(
            line.split(" - ")[1].split()[0]
            for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            if line.split()[4] == "/"
        )
        assert root_mount == "fuse.cowfs"
        container_id = podman.inspect("child", ".Id")
        listed = json.loads(daemon("status", "--json").stdout)
        assert [(g["name"], g["state"], g["init_pid"], g["engine"], g["container_id"])
                for g in listed] == [
            (f"oci-{container_id[:12]}", "running", pid, "libpod", container_id)
        ]  # fmt: skip
        assert daemon("list").stdout == (
            f"oci-{container_id[:12]} running (OCI container of libpod: {container_id})\n"
        )
    finally:
        podman("rm", "--force", "--time", "0", "child")
    assert leftovers(daemon, podman) == []


def test_detached_container_exec_stop_and_rm(daemon: Contextd, podman: Podman) -> None:
    podman.run_container("-d", "--name", "svc", IMAGE, "sleep", "1000")
    script = "echo in:$(cat /proc/1/cmdline | tr '\\0' ' '); exit 7"
    result = podman("exec", "svc", "sh", "-c", script, check=False)
    assert (result.returncode, result.stdout) == (7, "in:sleep 1000\n"), result.stderr
    started = time.monotonic()
    podman("stop", "--time", "2", "svc")  # sleep as PID 1 ignores SIGTERM: SIGKILL after 2 s
    assert time.monotonic() - started < 30
    assert podman.inspect("svc", ".State.Status") == "exited"
    podman("rm", "svc")
    assert leftovers(daemon, podman) == []


def test_podman_run_it_gets_a_pty(daemon: Contextd, podman: Podman) -> None:
    command = shlex.join([*podman.argv, "run", "-it", "--rm", *ULIMITS, "--network", "none",
                          IMAGE, "sh", "-c", "tty; echo done"])  # fmt: skip
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/dev/pts/0" in result.stdout and "done" in result.stdout
    assert leftovers(daemon, podman) == []


def test_two_containers_share_files_but_not_writes(daemon: Contextd, podman: Podman) -> None:
    for name in ("one", "two"):
        podman.run_container("-d", "--name", name, IMAGE, "sleep", "1000")
    try:
        guests = Path(daemon.env["COWFS_ROOT"]) / "guests"
        trees = {
            name: guests / f"oci-{podman.inspect(name, '.Id')[:12]}" for name in ("one", "two")
        }
        inodes = {os.stat(t / "bin" / "busybox").st_ino for t in trees.values()}
        assert len(inodes) == 1, "the image's files are hard links shared by its containers"
        podman("exec", "one", "sh", "-c", "echo mine >> /etc/passwd")
        seen = podman("exec", "two", "cat", "/etc/passwd").stdout
        assert "mine" not in seen
        assert "mine" in podman("exec", "one", "cat", "/etc/passwd").stdout
        assert (
            os.stat(trees["one"] / "etc" / "passwd").st_ino
            != os.stat(trees["two"] / "etc" / "passwd").st_ino
        )
    finally:
        podman("rm", "--force", "--time", "0", "one", "two")
    assert leftovers(daemon, podman) == []


def test_containers_on_the_shared_fuse_server(daemon: Contextd, podman: Podman) -> None:
    shared = ("--annotation", "org.contextd.cowfs.fuse-server=shared")
    for name in ("left", "right"):
        podman.run_container("-d", *shared, "--name", name, IMAGE, "sleep", "1000")
    try:
        servers = {}
        for record in Path("/run/cowfs/mounts").glob("*.json"):
            mount = json.loads(record.read_text())
            if str(daemon.base) in mount["mountpoint"] and "/roots/oci-" in mount["mountpoint"]:
                servers[mount["mountpoint"]] = (mount["pid"], mount["shared"])
        assert len(servers) == 2 and len(set(servers.values())) == 1, servers
        server = next(iter(servers.values()))[0]
        podman("exec", "left", "sh", "-c", "echo mine > /root/note")
        assert podman("exec", "left", "cat", "/root/note").stdout == "mine\n"
        assert podman("exec", "right", "ls", "/root").stdout == ""
        podman("rm", "--force", "--time", "0", "left")
        assert Path(f"/proc/{server}").exists()  # it serves right still
        assert podman("exec", "right", "cat", "/etc/passwd").stdout.startswith("root:")
    finally:
        podman("rm", "--force", "--ignore", "--time", "0", "left", "right")
    assert leftovers(daemon, podman) == []
    bad = podman.run_container(
        "--rm", "--annotation", "org.contextd.cowfs.fuse-server=many", IMAGE, "true", check=False
    )
    assert bad.returncode != 0 and "neither 'own' nor 'shared'" in bad.stderr, bad.stderr
    assert leftovers(daemon, podman) == []


def test_the_disk_limit_annotation_gives_enospc(daemon: Contextd, podman: Podman) -> None:
    result = podman.run_container(
        "--rm", "--annotation", "org.contextd.cowfs.disk-space=2M", IMAGE,
        "sh", "-c", "dd if=/dev/zero of=/big bs=64k count=100 2>&1; echo rc=$?",
    )  # fmt: skip
    assert "No space left on device" in result.stdout, result.stdout
    assert "rc=1" in result.stdout
    unlimited = podman.run_container(
        "--rm", IMAGE, "sh", "-c", "dd if=/dev/zero of=/big bs=64k count=100 2>&1; echo rc=$?"
    )
    assert "rc=0" in unlimited.stdout, unlimited.stdout


def test_the_container_keeps_the_specs_capabilities_only(podman: Podman) -> None:
    status = podman.run_container("--rm", IMAGE, "cat", "/proc/self/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    # podman's default set: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
    # NET_BIND_SERVICE SYS_CHROOT SETFCAP
    expected = sum(1 << n for n in (0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 31))
    assert int(fields["CapBnd"], 16) == expected
    assert int(fields["CapEff"], 16) == expected
    assert fields["Seccomp"].strip() == "2", "contextd's seccomp filter is loaded"
    assert fields["NoNewPrivs"].strip() == "0"


def test_a_mount_destination_through_a_symlink_stays_in_the_root(
    daemon: Contextd, podman: Podman, tmp_path: Path
) -> None:
    """An image whose /data is a symlink to a directory of the host: the volume's missing
    mount point is made inside the container's root (where the link leads when followed
    from the container's /), never in the host's directory."""
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    tree = build_busybox_guest(tmp_path / "tree")
    os.symlink(str(host_dir), tree / "data")
    tarball = tmp_path / "evil.tar"
    run("tar", "-C", tree, "-cf", tarball, ".")
    podman("import", str(tarball), "localhost/evil:1")
    source = tmp_path / "volume"
    source.mkdir()
    (source / "marker").write_text("from the volume")
    result = podman.run_container(
        "--rm", "-v", f"{source}:/data/sub", "localhost/evil:1", "cat", "/data/sub/marker",
        check=False,
    )  # fmt: skip
    assert list(host_dir.iterdir()) == [], "made on the host through the image's symlink"
    assert (result.returncode, result.stdout) == (0, "from the volume"), result.stderr


def test_unsupported_specs_are_refused_in_one_line(podman: Podman) -> None:
    result = podman.run_container("--rm", "--pid", "host", IMAGE, "true", check=False)
    assert result.returncode != 0
    assert "the host's pid namespace is not shared with containers" in result.stderr


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory, podman: Podman) -> Iterator[list[str]]:
    """A containerd of the module's own (its own socket, root and state), with the busybox
    image (saved by podman as an OCI archive): the ctr command line to reach it."""
    if not have("containerd"):
        pytest.skip("containerd is not installed (tools/install.sh installs it)")
    base = tmp_path_factory.mktemp("containerd")
    config = base / "config.toml"
    config.write_text(
        f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
        f'[grpc]\n  address = "{base}/containerd.sock"\n'
    )
    with open(base / "log", "w") as log:
        server = subprocess.Popen(["containerd", "-c", str(config)], stdout=log, stderr=log)
    ctr = ["ctr", "-a", str(base / "containerd.sock")]
    try:
        for _ in range(200):
            if subprocess.run([*ctr, "version"], capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.05)
        archive = base / "image.tar"
        podman("save", "--format", "oci-archive", "-o", str(archive), IMAGE)
        run(*ctr, "image", "import", "--base-name", IMAGE.split(":")[0], archive)
        yield ctr
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_containerd_runs_and_stops_a_container(
    daemon: Contextd, podman: Podman, containerd: list[str]
) -> None:
    runtime = ["--runc-binary", str(podman.runtime)]
    result = subprocess.run(
        [*containerd, "run", "--rm", *runtime, IMAGE, "once", "sh", "-c", "echo ok; exit 3"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (3, "ok\n"), result.stderr
    run(*containerd, "run", "-d", *runtime, IMAGE, "svc", "sleep", "1000")
    try:
        tasks = run(*containerd, "task", "ls").stdout
        assert "svc" in tasks and "RUNNING" in tasks
        inside = subprocess.run(
            [*containerd, "task", "exec", "--exec-id", "e1", "svc", "sh", "-c", "echo in; exit 5"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert (inside.returncode, inside.stdout) == (5, "in\n"), inside.stderr
        run(*containerd, "task", "kill", "--signal", "SIGKILL", "svc")
        assert wait_stopped(containerd, "svc")
    finally:
        run(*containerd, "task", "delete", "--force", "svc", check=False)
        run(*containerd, "container", "delete", "svc", check=False)
    assert leftovers(daemon, podman) == []


def wait_stopped(ctr: list[str], task: str) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listed = run(*ctr, "task", "ls").stdout.splitlines()
        if any(line.split()[:1] == [task] and "STOPPED" in line for line in listed):
            return True
        time.sleep(0.1)
    return False


def test_a_container_outlives_a_restart_of_the_daemon(daemon: Contextd, podman: Podman) -> None:
    """The daemon keeps the container's root; restarted, it still releases it at delete."""
    podman.run_container("-d", "--name", "across", IMAGE, "sleep", "1000")
    try:
        daemon.kill()
        daemon.serve()
        result = podman("exec", "across", "cat", "/etc/passwd")
        assert result.stdout.startswith("root:x:0:0:"), result.stderr
        listed = daemon("list").stdout
        assert "running (OCI container of libpod" in listed
    finally:
        podman("rm", "--force", "--time", "0", "across")
    assert leftovers(daemon, podman) == []


def test_a_container_outlives_the_death_of_its_roots_server(
    daemon: Contextd, podman: Podman
) -> None:
    """As a guest does (contextd(8), FAULTS): kill -9 of the FUSE server, a successor takes
    over the session, the container's files still answer."""
    podman.run_container("-d", "--name", "sturdy", IMAGE, "sleep", "1000")
    try:
        short = podman.inspect("sturdy", ".Id")[:12]
        first = _registered_server(daemon, short)
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: _registered_server(daemon, short) not in (0, first), 30)
        result = podman("exec", "sturdy", "cat", "/etc/passwd")
        assert result.stdout.startswith("root:x:0:0:"), result.stderr
        assert podman.inspect("sturdy", ".State.Status") == "running"
    finally:
        podman("rm", "--force", "--time", "0", "sturdy")
    assert leftovers(daemon, podman) == []


def _replaced(daemon: Contextd, short: str, dead: int) -> bool:
    return _registered_server(daemon, short) not in (0, dead)


def _registered_server(daemon: Contextd, short: str) -> int:
    """The live server the mount registry names for the container's root (0 if none)."""
    mountpoint = os.path.realpath(daemon.base / "run" / "roots" / f"oci-{short}")
    for record in Path("/run/cowfs/mounts").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            mount = json.loads(record.read_text())
            if mount["mountpoint"] == mountpoint and procfs_alive(mount["pid"]):
                return int(mount["pid"])
    return 0


def test_an_image_template_goes_once_its_image_is_removed(
    daemon: Contextd, podman: Podman, tmp_path: Path
) -> None:
    """The copy of an image's layers stays for its next container, and goes once the
    engine has removed the image and no container uses it."""
    guests = Path(daemon.env["COWFS_ROOT"]) / "guests"
    tree = build_busybox_guest(tmp_path / "tree")
    (tree / "etc" / "motd").write_text("a short-lived image\n")
    run("tar", "-C", tree, "-cf", tmp_path / "brief.tar", ".")
    podman("import", str(tmp_path / "brief.tar"), "localhost/brief:1")
    before = set(guests.glob("oci-image-*"))
    podman.run_container("--rm", "localhost/brief:1", "true")
    made = set(guests.glob("oci-image-*")) - before
    assert len(made) == 1
    (template,) = made
    assert (template / "etc" / "motd").read_text() == "a short-lived image\n"
    podman.run_container("--rm", "localhost/brief:1", "true")
    assert template.is_dir(), "kept for the image's next container"
    podman("rmi", "localhost/brief:1")
    podman.run_container("--rm", IMAGE, "true")  # any container's delete prunes
    assert not template.exists()
    assert before <= set(guests.glob("oci-image-*"))  # the other images' stay


def test_a_root_server_that_keeps_dying_ends_the_container(
    daemon: Contextd, podman: Podman
) -> None:
    """Past the keeper's limit (contextd.rootserver.MAX_DEATHS within a minute) no
    successor is started: the container's init is killed and its engine says so."""
    podman.run_container("-d", "--name", "doomed", IMAGE, "sleep", "1000")
    try:
        short = podman.inspect("doomed", ".Id")[:12]
        server = _registered_server(daemon, short)
        for deaths in range(1, 7):
            os.kill(server, signal.SIGKILL)
            if deaths <= 5:
                assert wait_for(functools.partial(_replaced, daemon, short, server), 30)
                server = _registered_server(daemon, short)
        assert wait_for(lambda: podman.inspect("doomed", ".State.Status") == "exited", 30)
        assert podman.inspect("doomed", ".State.ExitCode") == "137"
    finally:
        podman("rm", "--force", "--time", "0", "doomed")
    assert leftovers(daemon, podman) == []


def test_the_runtimes_own_command_line(daemon: Contextd, podman: Podman) -> None:
    """What an admin types at contextd-oci for a container an engine runs: exec with a
    command (options before the id, as runc), ps, state; errors in one line."""
    podman.run_container("-d", "--name", "typed", IMAGE, "sleep", "1000")
    try:
        container_id = podman.inspect("typed", ".Id")
        pid = int(podman.inspect("typed", ".State.Pid"))
        runtime = [str(podman.runtime)]
        result = run(*runtime, "exec", container_id, "sh", "-c", "echo hi; exit 4", check=False)
        assert (result.returncode, result.stdout) == (4, "hi\n"), result.stderr
        assert json.loads(run(*runtime, "ps", "--format", "json", container_id).stdout) == [pid]
        state = json.loads(run(*runtime, "state", container_id).stdout)
        assert (state["status"], state["pid"], state["id"]) == ("running", pid, container_id)
        missing = run(*runtime, "state", "no-such-container", check=False)
        assert missing.returncode == 1
        assert missing.stderr == "contextd-oci: container no-such-container does not exist\n"
    finally:
        podman("rm", "--force", "--time", "0", "typed")
    assert leftovers(daemon, podman) == []
