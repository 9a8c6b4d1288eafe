"""contextd against the real kernel: boot, exec, enter, stop, isolation and security."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from conftest import cowfs, run
from contextd_harness import (
    CONTEXTD,
    SLEEPER,
    Contextd,
    cgroup_v2,
    guest_status,
    left_behind,
    parent_of,
    wait_for,
)


def test_boot_exec_service_stop_leaves_nothing(ctx: Contextd, guest_tree: Path) -> None:
    ctx("create", "web", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "web")
    status = json.loads(ctx("status", "web", "--json").stdout)
    assert status["state"] == "running" and status["processes"] == 1 and status["xid"] >= 2
    # exec: output and exit code passed through, stdin too
    result = ctx(
        "exec",
        "web",
        "--",
        "/bin/sh",
        "-c",
        "hostname; cat; exit 42",
        check=False,
        stdin="from stdin\n",
    )
    assert result.returncode == 42
    assert result.stdout == "web\nfrom stdin\n"
    # a real service: busybox httpd, reached from the host
    port = _free_port()
    ctx("exec", "web", "--", "httpd", "-p", f"127.0.0.1:{port}", "-h", "/var/www")
    body = _fetch(f"http://127.0.0.1:{port}/index.html")
    assert "hello from the guest" in body
    assert json.loads(ctx("status", "web", "--json").stdout)["processes"] == 2
    # enter: a shell on a pty of the guest's own
    entered = ctx("enter", "web", stdin="tty; echo inside-$((6*7)); exit 3\n", check=False)
    assert entered.returncode == 3
    assert "inside-42" in entered.stdout and re.search(
        r"^/dev/pts/[1-9]\d*\r?$", entered.stdout, re.M
    )
    # /dev/console is a pty of the guest's own (its first), init's stdio, and the log
    console = ctx(
        "exec", "web", "--", "/bin/sh", "-c", "ls -l /proc/1/fd/0; echo hi > /dev/console"
    )
    assert console.stdout.rstrip().endswith("/dev/pts/0"), console.stdout
    logged = ctx("logs", "web").stdout
    assert "booted" in logged and "hi" in logged
    text = ctx("status").stdout
    assert "web" in text and "running" in text
    ctx("stop", "web", "--timeout", "1")
    assert json.loads(ctx("status", "web", "--json").stdout)["state"] == "stopped"
    assert left_behind("web", ctx) == []
    with pytest.raises(OSError):
        _fetch(f"http://127.0.0.1:{port}/index.html")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fetch(url: str) -> str:
    for _ in range(50):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            time.sleep(0.1)
    with urllib.request.urlopen(url, timeout=2) as response:
        return str(response.read().decode())


def cgroups_of(pid: int) -> dict[str, str]:
    """A process's cgroup in each hierarchy: controllers (or "" on v2) -> path."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return {line.split(":")[1]: line.split(":", 2)[2] for line in lines}


def test_what_outlives_the_daemon_leaves_the_cgroup_it_was_started_in(
    ctx: Contextd, guest_tree: Path
) -> None:
    """A guest's supervisor (its init's parent) is in contextd/_helpers, with the fork
    server it came from, not in the daemon's cgroup: under systemd, the daemon's unit,
    which `systemctl kill` signals whole and whose stop finds them left over."""
    ctx("create", "h", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "h")
    init = int(guest_status(ctx, "h")["init_pid"])
    supervisor = parent_of(init)
    assert Path(f"/proc/{supervisor}/comm").read_text() != "contextd\n"
    assert ctx.proc is not None
    # The hierarchies contextd uses: v1 controllers and systemd's, or v2's one.
    ours = {""} if cgroup_v2() else {"memory", "pids", "freezer", "devices", "cpu", "name=systemd"}
    used = [k for k in cgroups_of(supervisor) if ours & set(k.split(","))]
    assert used, cgroups_of(supervisor)
    for hierarchy in used:
        assert cgroups_of(supervisor)[hierarchy] == "/contextd/_helpers", cgroups_of(supervisor)
        assert cgroups_of(ctx.proc.pid)[hierarchy] != "/contextd/_helpers"


def test_two_guests_on_unified_trees(ctx: Contextd, guest_tree: Path) -> None:
    ctx("create", "one", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("create", "two", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "one")
    ctx("start", "two")
    ctx("exec", "one", "--", "/bin/sh", "-c", "echo rewritten by one > /var/www/index.html")
    assert (
        ctx("exec", "one", "--", "/bin/cat", "/var/www/index.html").stdout == "rewritten by one\n"
    )
    assert (
        "hello from the guest" in ctx("exec", "two", "--", "/bin/cat", "/var/www/index.html").stdout
    )
    assert "hello from the guest" in (guest_tree / "var" / "www" / "index.html").read_text()


def test_isolation_from_host_and_other_guests(ctx: Contextd, guest_tree: Path) -> None:
    ctx("create", "a", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("create", "b", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "a")
    ctx("start", "b")
    b_init = json.loads(ctx("status", "b", "--json").stdout)["init_pid"]
    ps = ctx("exec", "a", "--", "/bin/ps").stdout
    assert len(ps.strip().splitlines()) <= 3  # header, its init, ps itself
    assert "contextd" not in ps and "pytest" not in ps
    for target in (os.getpid(), b_init, 1):
        result = ctx("exec", "a", "--", "/bin/kill", "-9", str(target), check=False)
        assert result.returncode != 0 or target == 1
    assert json.loads(ctx("status", "b", "--json").stdout)["state"] == "running"
    # SIGKILL to its own PID 1 from inside is ignored by the kernel: a keeps running
    assert json.loads(ctx("status", "a", "--json").stdout)["state"] == "running"
    os.kill(os.getpid(), 0)  # the test itself is alive


def test_fork_bomb_and_memory_hog_stay_inside(ctx: Contextd, guest_tree: Path) -> None:
    ctx("create", "hog", "--from", str(guest_tree), "--init", SLEEPER)
    ctx.configure("hog", limits={"pids": 40, "memory": "48M"})
    ctx("start", "hog")
    bomb = ctx(
        "exec",
        "hog",
        "--",
        "/bin/sh",
        "-c",
        "i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done 2>&1 | tail -1; echo done",
        check=False,
    )
    said = bomb.stdout + bomb.stderr
    assert "can't fork" in said or "Resource temporarily unavailable" in said
    status = json.loads(ctx("status", "hog", "--json").stdout)
    assert status["processes"] <= 40
    assert status["limit_hits"].get("pids", 0) > 0
    ctx("exec", "hog", "--", "/bin/sh", "-c", "killall sleep; true", check=False)
    hog = ctx(
        "exec",
        "hog",
        "--",
        "/bin/sh",
        "-c",
        "awk 'BEGIN { s = \"x\"; while (1) s = s s }'",
        check=False,
    )
    assert hog.returncode == 128 + 9  # SIGKILL by the OOM killer of the guest's cgroup
    after = json.loads(ctx("status", "hog", "--json").stdout)
    assert after["state"] == "running"  # only the hog died
    assert after["limit_hits"].get("memory", 0) > 0


def test_bad_input(ctx: Contextd, guest_tree: Path) -> None:
    for verb in (
        ["start"],
        ["stop"],
        ["status"],
        ["logs"],
        ["delete"],
        ["exec", "nope", "--", "/bin/true"],
        ["enter"],
    ):
        args = verb if "nope" in verb else [*verb, "nope"]
        result = ctx(*args, check=False)
        assert result.returncode != 0 and "unknown guest 'nope'" in result.stderr, args
        assert result.stderr.count("\n") == 1, args
    ctx("create", "x1", "--from", str(guest_tree), "--xid", "300", "--init", SLEEPER)
    result = ctx("create", "x2", "--from", str(guest_tree), "--xid", "300", check=False)
    assert result.returncode == 1 and "xid 300 is used by guest x1" in result.stderr
    assert not (ctx.base / "etc" / "x2.toml").exists()
    ctx("start", "x1")
    result = ctx("start", "x1", check=False)
    assert result.returncode == 1 and "already running" in result.stderr
    ctx("stop", "x1")
    result = ctx("stop", "x1", check=False)
    assert result.returncode == 1 and "not running" in result.stderr
    bad = ctx.base / "etc" / "broken.toml"
    bad.write_text('xid = "many"\nroot = "/x"\n')
    result = ctx("start", "x1", check=False)
    assert result.returncode == 1 and "broken.toml: xid: expected an integer" in result.stderr
    bad.write_text('xid = 5\nroot = "/x"\nmemroy = 1\n')
    assert "broken.toml: memroy: unknown key" in ctx("status", check=False).stderr
    bad.unlink()
    # A name is checked before anything is written (it becomes file and cgroup names).
    before = sorted(p.name for p in ctx.base.rglob("*"))
    for name in ("../x", "a/b", "X", "_x", "." * 3, "x" * 64):
        result = ctx("create", name, "--from", str(guest_tree), check=False)
        assert result.returncode == 1 and "bad guest name" in result.stderr, name
        assert result.stderr.count("\n") == 1
    assert sorted(p.name for p in ctx.base.rglob("*")) == before


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_guests_survive_the_daemon_and_are_adopted(
    ctx: Contextd, guest_tree: Path, how: signal.Signals
) -> None:
    ctx("create", "keep", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "keep")
    init = json.loads(ctx("status", "keep", "--json").stdout)["init_pid"]
    ctx.kill(how)
    assert ctx("status", check=False).returncode == 1  # no daemon
    os.kill(init, 0)  # the guest runs on
    ctx.serve()
    assert '"adopted"' in ctx.log()
    status = json.loads(ctx("status", "keep", "--json").stdout)
    assert status["state"] == "running" and status["init_pid"] == init
    # Adopted whole: its root still serves, it can be entered, its console is still logged.
    result = ctx("exec", "keep", "--", "/bin/sh", "-c", "echo kept > /tmp/f; cat /tmp/f")
    assert result.stdout == "kept\n"
    assert "booted" in ctx("logs", "keep").stdout
    ctx("exec", "keep", "--", "/bin/sh", "-c", "echo after the restart > /dev/console")
    for _ in range(50):
        if "after the restart" in ctx("logs", "keep").stdout:
            break
        time.sleep(0.1)
    assert "after the restart" in ctx("logs", "keep").stdout
    ctx("stop", "keep")
    assert left_behind("keep", ctx) == []


def test_autostart(ctx: Contextd, guest_tree: Path) -> None:
    ctx("create", "auto", "--from", str(guest_tree), "--init", SLEEPER)
    ctx.configure("auto", autostart=True)
    ctx.kill()
    ctx.serve()
    assert json.loads(ctx("status", "auto", "--json").stdout)["state"] == "running"


def test_socket_is_root_only(ctx: Contextd) -> None:
    sock = ctx.base / "run" / "contextd.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"
    # even if the modes allowed it, the peer check refuses
    os.chmod(sock, 0o666)
    os.chmod(sock.parent, 0o711)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # a non-root client
        try:
            os.chdir(sock.parent)  # as root: the barrier keeps host users from the path
            os.setgid(1000)
            os.setuid(1000)
            client = socket.socket(socket.AF_UNIX)
            client.connect(sock.name)
            # Refused before it read the request? The refusal is still queued.
            with contextlib.suppress(BrokenPipeError):
                client.sendall(b'{"verb": "list"}\n')
            os.write(write_end, client.recv(4096))
        except OSError as error:
            os.write(write_end, repr(error).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    answer = os.read(read_end, 4096)
    os.chmod(sock, 0o600)
    os.chmod(sock.parent, 0o700)
    assert json.loads(answer) == {"ok": False, "error": "contextd serves root only"}


def test_cowfs_disk_limits_from_the_configuration(ctx: Contextd, guest_tree: Path) -> None:
    ctx("create", "disk", "--from", str(guest_tree), "--init", SLEEPER)
    ctx.configure("disk", limits={"disk_space": "1M"})
    ctx("start", "disk")
    out = ctx("exec", "disk", "--", "/bin/sh", "-c", "cat /bin/busybox > /root/big", check=False)
    assert out.returncode != 0 and "No space left" in out.stderr
    size = run("stat", "-f", "-c", "%b %S", str(ctx.base / "run" / "roots" / "disk")).stdout.split()
    assert int(size[0]) * int(size[1]) == 2**20
    assert cowfs("limit", "show", "--json").returncode == 0


def test_restart_and_delete(ctx: Contextd, guest_tree: Path) -> None:
    ctx("create", "r", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "r")
    first = json.loads(ctx("status", "r", "--json").stdout)["init_pid"]
    ctx("restart", "r", "--timeout", "1")
    second = json.loads(ctx("status", "r", "--json").stdout)
    assert second["state"] == "running" and second["init_pid"] != first
    result = ctx("delete", "r", check=False)
    assert result.returncode == 1 and "stop it first" in result.stderr
    ctx("stop", "r")
    root = Path(ctx.env["COWFS_ROOT"]) / "guests" / "r"
    assert root.is_dir()
    ctx("delete", "r", "--remove-root")
    assert not root.exists() and not (ctx.base / "etc" / "r.toml").exists()
    assert "r " not in ctx("list").stdout


PERL_HTTPD = (
    "use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1:PORT',"
    " Listen => 5, ReuseAddr => 1) or die $!; while (my $c = $s->accept) { <$c>;"
    " open(my $f, '<', '/etc/debian_version'); my $v = <$f>;"
    ' print $c "HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\ndebian $v"; close $c }'
)


@pytest.mark.slow
def test_debian_guest_boots_and_serves(ctx: Contextd, tmp_path: Path) -> None:
    from conftest import ROOT, have

    if not have("debootstrap"):
        pytest.skip("debootstrap is not installed (tools/install.sh installs it)")
    template = tmp_path / "debian"
    run(ROOT / "tools" / "mkguest-debian.sh", template, "1")
    ctx("create", "deb", "--from", str(template), "--init", "/bin/sleep infinity")
    ctx("start", "deb")
    assert ctx("exec", "deb", "--", "cat", "/etc/os-release").stdout.count("Debian") >= 1
    assert ctx("exec", "deb", "--", "dpkg", "--verify").stdout == ""
    assert "apt" in ctx("exec", "deb", "--", "apt-get", "--version").stdout
    assert ctx("exec", "deb", "--", "id", "-un").stdout == "root\n"
    port = _free_port()
    script = PERL_HTTPD.replace("PORT", str(port))
    ctx("exec", "deb", "--", "/bin/sh", "-c", "cat > /tmp/httpd.pl", stdin=script)
    ctx("exec", "deb", "--", "/bin/sh", "-c", "perl /tmp/httpd.pl >/tmp/httpd.log 2>&1 &")
    assert _fetch(f"http://127.0.0.1:{port}/").startswith("debian 12")
    ctx("stop", "deb", "--timeout", "2")
    assert left_behind("deb", ctx) == []


def _children(pid: int) -> list[int]:
    # Of every thread: the fork server was started from a worker thread.
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _holding_open(path: Path) -> list[int]:
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                found.append(int(fd_dir.parent.name))
    return found


def _pidfds(pid: int) -> int:
    return sum(os.readlink(fd) == "anon_inode:[pidfd]" for fd in Path(f"/proc/{pid}/fd").iterdir())


def test_helpers_forked_from_a_fork_server_that_is_replaced_if_it_dies(
    ctx: Contextd, guest_tree: Path
) -> None:
    for name in ("first", "second"):
        ctx("create", name, "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "first")
    assert ctx.proc is not None
    mounts = [json.loads(p.read_text()) for p in Path("/run/cowfs/mounts").glob("*.json")]
    fuse = next(m["pid"] for m in mounts if m["mountpoint"].endswith("/roots/first"))
    servers = [
        pid
        for pid in _children(ctx.proc.pid)
        if b"contextd.forkserver" in _cmdline(pid) and pid != fuse
    ]
    assert len(servers) == 1, servers
    # The guest's FUSE server was forked there (no `cowfs mount` process of its own)
    # and passed to the daemon; its console logger is the fork server's child.
    assert b"contextd.forkserver" in _cmdline(fuse) and parent_of(fuse) == ctx.proc.pid
    (logger,) = _holding_open(ctx.base / "log" / "first.console.log")
    assert parent_of(logger) == servers[0]
    os.kill(servers[0], signal.SIGKILL)
    ctx("start", "second")  # a new fork server
    assert f"fork server (pid {servers[0]}) ended: starting another" in ctx.log()
    assert "booted" in ctx("logs", "second").stdout
    assert json.loads(ctx("status", "second", "--json").stdout)["state"] == "running"
    # The first guest's logger outlived its fork server; stop still collects it.
    ctx("stop", "first", "--timeout", "1")
    ctx("stop", "second", "--timeout", "1")
    assert left_behind("first", ctx) == [] and left_behind("second", ctx) == []


def test_a_start_that_fails_is_undone(ctx: Contextd, guest_tree: Path) -> None:
    ctx("create", "broken", "--from", str(guest_tree), "--init", "/bin/no-such-init")
    assert ctx.proc is not None
    ctx("create", "warm", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "warm")  # the fork server and the daemon's own fds settle first
    ctx("stop", "warm")
    # The daemon's reaper holds a pidfd of each guest's processes until it has reaped them.
    assert wait_for(lambda: _pidfds(ctx.proc.pid) == 0)  # type: ignore[union-attr]
    fds_before = len(os.listdir(f"/proc/{ctx.proc.pid}/fd"))
    for _ in range(3):
        result = ctx("start", "broken", check=False)
        assert result.returncode == 1 and "init did not start" in result.stderr
        assert result.stderr.count("\n") == 1
    # Mount, cgroup, state and console logger undone; nothing left open in the daemon.
    assert left_behind("broken", ctx) == []
    assert _holding_open(ctx.base / "log" / "broken.console.log") == []
    assert wait_for(lambda: _pidfds(ctx.proc.pid) == 0)  # type: ignore[union-attr]
    assert len(os.listdir(f"/proc/{ctx.proc.pid}/fd")) == fds_before


def test_guests_started_and_stopped_at_once(ctx: Contextd, guest_tree: Path) -> None:
    # Concurrent starts share the fork server: each gets its own mount, logger and context.
    from concurrent.futures import ThreadPoolExecutor

    names = [f"many{i}" for i in range(6)]
    for name in names:
        ctx("create", name, "--from", str(guest_tree), "--init", SLEEPER)
    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(lambda name: ctx("start", name), names))
    for name in names:
        status = json.loads(ctx("status", name, "--json").stdout)
        assert status["state"] == "running" and status["processes"] == 1
        assert "booted" in ctx("logs", name).stdout
    mounts = [json.loads(p.read_text()) for p in Path("/run/cowfs/mounts").glob("*.json")]
    served = {m["mountpoint"].rpartition("/")[2] for m in mounts}
    assert set(names) <= served
    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(lambda name: ctx("stop", name, "--timeout", "1"), names))
    for name in names:
        assert left_behind(name, ctx) == []


def test_a_running_guest_is_not_cloned(ctx: Contextd, guest_tree: Path) -> None:
    # An fd the guest opened for writing before a clone would write into the clone.
    ctx("create", "busy", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "busy")
    root = Path(ctx.env["COWFS_ROOT"]) / "guests"
    result = ctx("create", "copy", "--from", str(root / "busy"), check=False)
    assert result.returncode == 1 and "in use (mounted at" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
    assert not (root / "copy").exists() and not (ctx.base / "etc" / "copy.toml").exists()
    ctx("stop", "busy")
    ctx("create", "copy", "--from", str(root / "busy"))


def test_a_boot_that_fails_at_once_is_a_failed_start(ctx: Contextd, guest_tree: Path) -> None:
    ctx(
        "create",
        "bad",
        "--from",
        str(guest_tree),
        "--init",
        # a colour and a title sequence too: the message goes to the admin's terminal
        "/bin/sh -c 'printf \"\\033[31mno-such-disk\\033]0;t\\007\\n\"; exit 7'",
    )
    result = ctx("start", "bad", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "init exited with status 7 within 0.5 s of its start" in result.stderr
    assert "console: no-such-disk?]0;t?\n" in result.stderr and "\x1b" not in result.stderr
    assert left_behind("bad", ctx) == []
    status = guest_status(ctx, "bad")
    assert status["state"] == "failed" and status["last_end"].startswith(
        "init exited with status 7"
    )
    assert status["last_console"] == ["\x1b[31mno-such-disk\x1b]0;t\x07"]  # JSON: as written


def test_the_end_of_init_is_noticed_at_once(ctx: Contextd, guest_tree: Path) -> None:
    ctx("create", "brief", "--from", str(guest_tree), "--init", "/bin/sh -c 'sleep 1; exit 3'")
    ctx("start", "brief")
    assert guest_status(ctx, "brief")["state"] == "running"
    # Cleaned up by the daemon within moments of init's end: nothing left, and why it ended.
    assert wait_for(lambda: left_behind("brief", ctx) == [], 5), left_behind("brief", ctx)
    status = guest_status(ctx, "brief")
    assert status["state"] == "failed" and status["last_end"].startswith(
        "init exited with status 3"
    )
    assert '"guest ended"' in ctx.log() and "brief" in ctx("status").stdout


def test_halt_and_reboot_inside_stop_and_restart_the_guest(ctx: Contextd, guest_tree: Path) -> None:
    # busybox init with the template's inittab, stopped by its ctrlaltdel action
    ctx("create", "box", "--from", str(guest_tree), "--init", "/sbin/init")
    ctx("start", "box")
    first = guest_status(ctx, "box")["init_pid"]
    ctx("exec", "box", "--", "/sbin/reboot")
    assert wait_for(
        lambda: (
            guest_status(ctx, "box")["state"] == "running"
            and guest_status(ctx, "box")["init_pid"] != first
        )
    ), ctx.log()
    # (logged once the start's boot check is over, after the run state shows it running)
    assert wait_for(lambda: '"rebooted"' in ctx.log(), 5), ctx.log()
    ctx("exec", "box", "--", "/sbin/poweroff")
    assert wait_for(lambda: left_behind("box", ctx) == []), left_behind("box", ctx)
    status = guest_status(ctx, "box")
    assert status["state"] == "stopped" and status["last_end"].startswith("init asked for a halt")
    assert "guest init stopping" in ctx("logs", "box").stdout  # its shutdown actions ran
    # and stop asks busybox init to shut down (SIGINT: its ctrlaltdel action), not SIGKILL
    ctx("start", "box")
    ctx("stop", "box", "--timeout", "10")
    assert ctx("logs", "box").stdout.count("guest init stopping") == 3  # reboot, poweroff, stop


def test_a_guest_whose_init_ends_while_the_daemon_is_away(ctx: Contextd, guest_tree: Path) -> None:
    ctx("create", "alone", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "alone")
    init = guest_status(ctx, "alone")["init_pid"]
    ctx.kill(signal.SIGKILL)
    os.kill(init, signal.SIGKILL)
    # Its supervisor reaps it and records the end: no zombie waits for a daemon.
    assert wait_for(lambda: not Path(f"/proc/{init}").exists(), 5)
    ctx.serve()
    status = guest_status(ctx, "alone")
    assert status["state"] == "failed" and status["last_end"].startswith(
        "init was killed by SIGKILL"
    )
    assert left_behind("alone", ctx) == []


def _host_ids(pid: int) -> tuple[int, int]:
    """A process's real uid and gid as the host sees them."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
    gid = re.search(r"^Gid:\s+(\d+)", status, re.M)
    assert uid and gid
    return int(uid.group(1)), int(gid.group(1))


def test_a_user_namespaced_guest_is_root_inside_and_nobody_outside(
    ctx: Contextd, guest_tree: Path
) -> None:
    """The default: guest ids 0..65535 are host ids (xid+16)*65536.., its tree keeps 0.."""
    ctx("create", "ns", "--from", str(guest_tree), "--init", SLEEPER, "--xid", "40")
    base = (40 + 16) * 65536
    ctx("start", "ns")
    inside = ctx(
        "exec", "ns", "--", "/bin/sh", "-c",
        "id -u; id -g; cat /proc/self/uid_map /proc/1/gid_map; touch /root/made;"
        " chown 1000:50 /root/made; stat -c %u:%g /bin/busybox /home/alice",
    ).stdout.split()  # fmt: skip
    assert inside == ["0", "0", "0", str(base), "65536", "0", str(base), "65536", "0:0",
                      "1000:1000"]  # fmt: skip
    init_pid = json.loads(ctx("status", "ns", "--json").stdout)["init_pid"]
    assert _host_ids(init_pid) == (base, base)  # its root is nobody on the host
    tree = Path(ctx.env["COWFS_ROOT"]) / "guests" / "ns"
    made = tree / "root" / "made"
    for _ in range(50):  # the guest's changes reach its tree as they leave the mount's cache
        if made.exists():
            break
        time.sleep(0.1)
    assert (made.stat().st_uid, made.stat().st_gid) == (1000, 50)  # the tree keeps guest ids
    # The config says so, and a second guest's range does not overlap.
    assert "userns = true" in (ctx.base / "etc" / "ns.toml").read_text()
    ctx("create", "ns2", "--from", str(guest_tree), "--init", SLEEPER, "--xid", "41")
    ctx.configure("ns2", security={"userns": True, "id_base": base + 65535})
    result = ctx("start", "ns2", check=False)
    assert result.returncode != 0 and "overlap guest ns" in result.stderr
    # ns2's bad file keeps ns2 from starting, not ns from being stopped.
    ctx("stop", "ns")
    assert left_behind("ns", ctx) == []


def test_records_and_consoles_are_root_only(ctx: Contextd, guest_tree: Path) -> None:
    # exit records keep the last lines of a guest's console, as its log does
    ctx("create", "quiet", "--from", str(guest_tree), "--init", "/bin/sh -c 'sleep 1; exit 3'")
    ctx("start", "quiet")
    assert wait_for(lambda: guest_status(ctx, "quiet")["state"] == "failed", 10)
    assert (ctx.base / "run" / "guests" / "quiet.exit.json").exists()
    for directory in ("run", "log"):
        assert (ctx.base / directory).stat().st_mode & 0o777 == 0o700, directory


def test_a_root_given_as_a_symlink_is_refused_and_nothing_is_made_through_it(
    ctx: Contextd, guest_tree: Path, tmp_path: Path
) -> None:
    # Where the link leads may be anywhere (a directory host users can reach): create
    # must not clone a guest there through it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for target in (elsewhere / "g", elsewhere):  # dangling, and to a directory
        link = tmp_path / "link"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        result = ctx(
            "create", "linked", "--from", str(guest_tree), "--root", str(link), check=False
        )
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert f"{link}: already exists" in result.stderr
        assert not (ctx.base / "etc" / "linked.toml").exists()
        assert sorted(os.listdir(elsewhere)) == []


def test_create_refuses_an_existing_name_and_changes_nothing(
    ctx: Contextd, guest_tree: Path, tmp_path: Path
) -> None:
    # The guest's root is elsewhere: a second create of its name would clone a tree of its
    # own at the default place, and write its file over the first guest's.
    ctx("create", "gapdup", "--from", str(guest_tree), "--root", str(tmp_path / "gapdup-root"),
        "--init", SLEEPER)  # fmt: skip
    config = ctx.base / "etc" / "gapdup.toml"
    written = config.read_text()
    guests = Path(ctx.env["COWFS_ROOT"]) / "guests"
    for options in ([], ["--xid", "900"], ["--root", str(tmp_path / "other-root")]):
        result = ctx("create", "gapdup", "--from", str(guest_tree), *options, check=False)
        assert (result.returncode, result.stderr) == (
            1,
            f"contextd: error: guest 'gapdup' exists already ({config})\n",
        ), options
        assert config.read_text() == written
        assert not (guests / "gapdup").exists() and not (tmp_path / "other-root").exists()
    # A file of that name whose guest calls itself otherwise is that name's file all the same.
    other = ctx.base / "etc" / "gapfile.toml"
    other.write_text(f'name = "gaprenamed"\nxid = 901\nroot = "{tmp_path / "gapfile-root"}"\n')
    written = other.read_text()
    result = ctx("create", "gapfile", "--from", str(guest_tree), check=False)
    assert (result.returncode, result.stderr) == (
        1,
        f"contextd: error: guest 'gapfile' exists already ({other})\n",
    )
    assert other.read_text() == written and not (guests / "gapfile").exists()
    # and the refused creates left the first guest whole: it starts on its own root
    other.unlink()
    ctx("start", "gapdup")
    assert guest_status(ctx, "gapdup")["state"] == "running"
    ctx("stop", "gapdup")
    assert left_behind("gapdup", ctx) == []


def test_guests_created_at_once_get_xids_and_id_ranges_of_their_own(
    ctx: Contextd, guest_tree: Path
) -> None:
    # Each create picks the next free xid from the files written so far, and writes its
    # own after its clone: creates running side by side must not pick the same one (two
    # guests with one id range; and every guest refused until one file goes).
    names = [f"gapsame{i}" for i in range(4)]
    creates = [
        subprocess.Popen(
            [CONTEXTD, "create", name, "--from", str(guest_tree), "--init", SLEEPER],
            env=ctx.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    for create in creates:
        assert create.wait(timeout=120) == 0, create.stderr.read() if create.stderr else ""
    configs = [tomllib.loads((ctx.base / "etc" / f"{name}.toml").read_text()) for name in names]
    xids = [c["xid"] for c in configs]
    assert len(set(xids)) == len(names), xids
    bases = [c["security"]["id_base"] for c in configs]
    assert len(set(bases)) == len(names), bases
    assert ctx("status").returncode == 0


def test_a_file_that_is_not_toml_is_named_in_one_line_and_changes_nothing(
    ctx: Contextd, guest_tree: Path
) -> None:
    ctx("create", "gapsyn", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "gapsyn")
    bad = ctx.base / "etc" / "gapbroken.toml"
    bad.write_text('xid = \nroot = "/x"\n')
    said = f"contextd: error: {bad}: not valid TOML: "
    for verb in (["status"], ["start", "gapbroken"],
                 ["create", "gapnew", "--from", str(guest_tree)]):  # fmt: skip
        result = ctx(*verb, check=False)
        assert result.returncode == 1, verb
        assert result.stderr.startswith(said) and result.stderr.count("\n") == 1, result.stderr
    assert not (ctx.base / "etc" / "gapnew.toml").exists()
    assert not (Path(ctx.env["COWFS_ROOT"]) / "guests" / "gapnew").exists()
    # Another guest's broken file keeps this one from neither its report nor its stop.
    assert guest_status(ctx, "gapsyn")["state"] == "running"
    ctx("stop", "gapsyn")
    assert left_behind("gapsyn", ctx) == []
