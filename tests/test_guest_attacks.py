"""Attacks from a root shell inside a running guest, each tried for real.

Each test performs an attack end to end with a real guest (busybox, started
by contextd), real attack programs (tests/attacks/*.c, built static and put
in the guest's /attack) and, where the target is the admin, a real pty. It
checks the specific outcome (an errno, what reached the admin's terminal)
and has a control that shows the attack works where its defence is absent,
so that it cannot pass because the attack never ran.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run
from contextd_harness import (
    CONTEXTD,
    SLEEPER,
    Contextd,
    fuse_server_of,
    running_contextd,
    wait_for,
)

ATTACKS = Path(__file__).parent / "attacks"

# The capabilities a guest keeps by default, written out (docs/contextd.md,
# "Security model"): numbers from linux/capability.h.
DEFAULT_CAPABILITIES = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETPCAP": 8,
    "SETUID": 7, "NET_BIND_SERVICE": 10, "SYS_CHROOT": 18, "SYS_BOOT": 22, "SYS_TTY_CONFIG": 26,
    "LEASE": 28,
    "AUDIT_WRITE": 29, "SETFCAP": 31,
}  # fmt: skip
DEFAULT_MASK = sum(1 << n for n in DEFAULT_CAPABILITIES.values())
# A user-namespaced guest's root keeps all but these (over its own namespaces only).
USERNS_DROPPED = {
    "NET_ADMIN": 12, "NET_RAW": 13, "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_TIME": 25,
    "MAC_OVERRIDE": 32, "MAC_ADMIN": 33,
}  # fmt: skip
ALL_CAPABILITIES = (1 << int(Path("/proc/sys/kernel/cap_last_cap").read_text()) + 1) - 1
USERNS_MASK = ALL_CAPABILITIES & ~sum(1 << n for n in USERNS_DROPPED.values())
CAP_SYS_PTRACE = 19
CAP_MKNOD = 27

x86_64_only = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the attack programs poke x86_64 registers and calls"
)


@pytest.fixture(scope="session")
def attack_programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/attacks/*.c built static (a busybox guest has no libc)."""
    out = tmp_path_factory.mktemp("attacks")
    for source in ATTACKS.glob("*.c"):
        run("gcc", "-static", "-O2", "-Wall", "-o", out / source.stem, source)
    return out


@pytest.fixture(params=["privileged", "userns"])
def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Contextd]:
    """Each attack is tried on a guest of each mode (docs/contextd.md, SECURITY MODEL)."""
    with running_contextd(tmp_path / "contextd", guest_mode=request.param) as daemon:
        yield daemon


@pytest.fixture
def armed_tree(guest_tree: Path, attack_programs: Path) -> Path:
    """The busybox guest with the attack programs in /attack and a /mnt to mount on."""
    (guest_tree / "attack").mkdir()
    for program in attack_programs.iterdir():
        shutil.copy2(program, guest_tree / "attack" / program.name)
    (guest_tree / "mnt").mkdir(exist_ok=True)
    (guest_tree / "guest-marker").write_text("the guest's root\n")
    return guest_tree


def start_guest(ctx: Contextd, tree: Path, name: str, **settings: object) -> Path:
    """Create and start guest name from tree; its backing tree (where its /tmp is seen)."""
    ctx("create", name, "--from", str(tree), "--init", SLEEPER, f"--{ctx.guest_mode}")
    if settings:
        ctx.configure(name, **settings)
    ctx("start", name)
    return Path(ctx.env["COWFS_ROOT"]) / "guests" / name


def guest_try(ctx: Contextd, name: str, *operation: str) -> str:
    """What tests/attacks/try.c says of an operation tried as root in the guest."""
    result = ctx("exec", name, "--", "/attack/try", *operation, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def capabilities_of(status_text: str) -> dict[str, int]:
    return {
        key: int(value, 16)
        for key, value in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status_text, re.M)
    }


# -- what root in a guest holds ----------------------------------------------


def test_guest_root_holds_the_default_capabilities_only(ctx: Contextd, armed_tree: Path) -> None:
    start_guest(ctx, armed_tree, "caps")
    mask = DEFAULT_MASK if ctx.guest_mode == "privileged" else USERNS_MASK
    for pid in ("self", "1"):
        text = ctx("exec", "caps", "--", "/bin/cat", f"/proc/{pid}/status").stdout
        caps = capabilities_of(text)
        assert caps["CapBnd"] == mask, pid
        assert caps["CapPrm"] == mask and caps["CapEff"] == mask, pid
        assert caps["CapInh"] == 0 and caps["CapAmb"] == 0, pid
        assert re.search(r"^Seccomp:\s+2$", text, re.M), pid  # the filter is on
        assert re.search(r"^NoNewPrivs:\s+0$", text, re.M), pid  # setuid programs work
    assert not DEFAULT_MASK >> CAP_SYS_PTRACE & 1
    ctx("stop", "caps")
    ctx.configure("caps", capabilities=["CHOWN", "KILL"])
    ctx("start", "caps")
    caps = capabilities_of(ctx("exec", "caps", "--", "/bin/cat", "/proc/self/status").stdout)
    assert caps["CapBnd"] == 1 << 0 | 1 << 5


# A user-namespaced guest's root may mount and name its host in its own namespaces;
# what it cannot do there is the kernel's refusal (EACCES: the host's files are not
# its own), not only ours.
USERNS_OUTCOMES = {
    ("mount", "/mnt"): "ok",
    ("sethostname",): "ok",
    ("write", "/proc/sys/vm/drop_caches"): "EACCES",
    ("write", "/sys/kernel/mm/transparent_hugepage/enabled"): "EACCES",
}


@pytest.mark.parametrize(
    ("operation", "expected"),
    [
        (("mount", "/mnt"), "EPERM"),  # no CAP_SYS_ADMIN
        (("mknod", "8:0"), "EPERM"),  # no CAP_MKNOD (a user namespace's root never has it)
        (("sethostname",), "EPERM"),
        # CAP_SYS_BOOT is kept, and a PID namespace's reboot(2) is its own: anything but
        # halt, power-off or restart (which end the guest's init) is EINVAL there.
        (("reboot",), "EINVAL"),
        (("raw-socket",), "EPERM"),  # no CAP_NET_RAW: no spoofed packets on a shared network
        (("unshare-user",), "EPERM"),  # the filter: no user namespace to regain capabilities in
        (("settimeofday",), "ENOSYS"),
        (("clock_settime",), "ENOSYS"),
        # Targets that exist on this kernel, and harmless if a write went through.
        (("write", "/proc/sys/vm/drop_caches"), "EROFS"),
        (("write", "/proc/timer_list"), "EROFS"),  # masked by an empty read-only file
        (("write", "/sys/kernel/mm/transparent_hugepage/enabled"), "EROFS"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else v,
)
def test_privileged_operations_are_refused(
    ctx: Contextd, armed_tree: Path, operation: tuple[str, ...], expected: str
) -> None:
    start_guest(ctx, armed_tree, "g")
    if ctx.guest_mode == "userns":
        expected = USERNS_OUTCOMES.get(operation, expected)
    before = (time.time(), socket.gethostname())
    assert guest_try(ctx, "g", *operation) == expected
    assert abs(time.time() - before[0]) < 60 and socket.gethostname() == before[1]
    if operation != ("sethostname",):
        assert ctx("exec", "g", "--", "/bin/hostname").stdout == "g\n"


def test_the_attack_program_does_succeed_with_privileges(attack_programs: Path) -> None:
    """The control for the test above: as root in throwaway namespaces of the host's,
    try.c's operations succeed, so a refusal in the guest is the guest's defences."""
    try_ = str(attack_programs / "try")
    assert run("unshare", "--uts", try_, "sethostname").stdout == "ok\n"
    assert run("unshare", "--mount", try_, "mount", "/mnt").stdout == "ok\n"
    assert run(try_, "unshare-user").stdout == "ok\n"
    assert run(try_, "write", "/proc/sys/vm/drop_caches").stdout == "ok\n"


# The filter's calls by x86_64 number (arch/x86/entry/syscalls/syscall_64.tbl).
FILTERED_CALLS = {
    "add_key": 248, "request_key": 249, "keyctl": 250, "kexec_load": 246,
    "kexec_file_load": 320, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "io_uring_setup": 425,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "clone3": 435, "swapon": 167,
    "acct": 163, "iopl": 172,
}  # fmt: skip


@x86_64_only
def test_calls_container_runtimes_refuse_are_refused(
    ctx: Contextd, armed_tree: Path, attack_programs: Path
) -> None:
    # Control: the calls this kernel has (no ENOSYS from the host's root; each is made
    # with zero arguments, which makes it fail harmlessly or do nothing).
    on_host = {
        name: run(attack_programs / "try", "syscall", str(number)).stdout.strip()
        for name, number in FILTERED_CALLS.items()
    }
    present = {name: FILTERED_CALLS[name] for name, answer in on_host.items() if answer != "ENOSYS"}
    assert {"keyctl", "bpf", "perf_event_open", "open_by_handle_at", "fsopen"} <= set(present)
    start_guest(ctx, armed_tree, "calls")
    script = "; ".join(f"/attack/try syscall {n}" for n in present.values())
    answers = ctx("exec", "calls", "--", "/bin/sh", "-c", script).stdout.split()
    assert dict(zip(present, answers, strict=True)) == dict.fromkeys(present, "ENOSYS")
    # fork and threads still work (glibc falls back from clone3 to clone)
    assert ctx("exec", "calls", "--", "/bin/sh", "-c", "echo $(echo forked)").stdout == "forked\n"


# -- entering a guest (exec, enter) -------------------------------------------


@x86_64_only
def test_a_process_entering_the_guest_is_never_seen_with_host_privileges(
    ctx: Contextd, armed_tree: Path
) -> None:
    """Guest root with CAP_SYS_PTRACE (an admin may grant it) waits for the next pid
    and injects an execve into it: whatever it catches holds the guest's credentials
    only (the entering process becomes visible after it has dropped everything)."""
    (armed_tree / "tmp" / "pwn.sh").write_text(
        "#!/bin/sh\ngrep -E '^Cap(Eff|Bnd)' /proc/self/status > /tmp/pwned\n"
    )
    with_ptrace = [*DEFAULT_CAPABILITIES, "SYS_PTRACE"]
    backing = start_guest(ctx, armed_tree, "target", capabilities=with_ptrace)
    guest_mask = DEFAULT_MASK | 1 << CAP_SYS_PTRACE
    ctx(
        "exec",
        "target",
        "--",
        "/bin/sh",
        "-c",
        "/attack/ptrace_next 6 </dev/null >/tmp/attack.log 2>&1 &",
    )
    log = backing / "tmp" / "attack.log"
    for _ in range(100):  # seen from the host: the guest's writes reach its tree later
        if any(b"/attack/ptrace_next" in line for line in _cmdlines()):
            break
        time.sleep(0.05)
    time.sleep(0.2)
    for _ in range(12):
        ctx("exec", "target", "--", "/bin/true", check=False)
    # Its log reaches the backing tree when it closes it (the mount caches writes).
    for _ in range(300):
        if "done" in log.read_text():
            break
        time.sleep(0.05)
    findings = log.read_text()
    pwned = backing / "tmp" / "pwned"
    if pwned.exists():  # it hijacked a process: one with the guest's credentials only
        caps = capabilities_of(pwned.read_text())
        assert caps["CapEff"] & ~guest_mask == 0, f"hijacked with {caps}"
        assert caps["CapBnd"] & ~guest_mask == 0, f"hijacked with {caps}"
    seen_caps = re.findall(r"^seen \d+ Cap(?:Eff|Bnd):\s+([0-9a-f]+)$", findings, re.M)
    beyond = [value for value in seen_caps if int(value, 16) & ~guest_mask]
    assert beyond == [], f"the guest saw processes holding more: {beyond}\n{findings}"
    # The attack did run: it saw the entering processes and, in privileged mode,
    # attached to some (in a user namespace, the kernel refuses it every one: they
    # hold a memory of the host's until they exec).
    assert seen_caps, findings
    assert "attached" in findings or ctx.guest_mode == "userns", findings


def _cmdlines() -> Iterator[bytes]:
    """The command line of every process of the host (and so of every guest)."""
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            yield path.read_bytes()


def _admin_terminal() -> tuple[int, int]:
    """A pty standing for the admin's terminal: (master, slave), slave in raw mode."""
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~(termios.ICANON | termios.ECHO)
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    return master, slave


def _as_controlling_terminal(fd: int) -> None:
    os.setsid()
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)


def _pending_input(fd: int, wait: float = 0.3) -> bytes:
    """What is waiting to be read from a terminal's input queue."""
    data = b""
    while select.select([fd], [], [], wait)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        wait = 0.05
    return data


@contextlib.contextmanager
def _tiocsti_allowed() -> Iterator[None]:
    """TIOCSTI on a process's own controlling terminal, as most hosts still allow it."""
    knob = Path("/proc/sys/dev/tty/legacy_tiocsti")
    old = knob.read_text() if knob.exists() else None
    if old is not None:
        knob.write_text("1")
    try:
        yield
    finally:
        if old is not None:
            knob.write_text(old)


def test_a_guest_cannot_type_into_the_admins_terminal(
    ctx: Contextd, armed_tree: Path, attack_programs: Path
) -> None:
    start_guest(ctx, armed_tree, "tty")
    master, slave = _admin_terminal()
    try:
        with _tiocsti_allowed():
            # Control: run by a process of the admin's terminal, TIOCSTI does type there.
            subprocess.run(
                [attack_programs / "tiocsti"],
                stdin=slave,
                stdout=subprocess.DEVNULL,
                preexec_fn=lambda: _as_controlling_terminal(slave),
                check=True,
            )
            assert _pending_input(slave) == b"echo pwned-by-guest\n"
            # The attack: the same program run by the admin in the guest, from that terminal.
            subprocess.run(
                [CONTEXTD, "exec", "tty", "--", "/attack/tiocsti"],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=ctx.env,
                preexec_fn=lambda: _as_controlling_terminal(slave),
                timeout=60,
                check=False,
            )
            typed = _pending_input(slave)
            # Later, from a process the command left behind, once exec has returned and
            # nothing of contextd reads the terminal any more, while the admin's shell
            # (the session's leader) goes on. (The terminal as its fd 3: sh gives a
            # background job /dev/null as its stdin.)
            later = "trap '' HUP; exec 3<&0; (sleep 1; /attack/tiocsti <&3 >/tmp/later 2>&1) &"
            admin_shell = subprocess.Popen(
                ["/bin/sh", "-c", shlex.join([CONTEXTD, "exec", "tty", "--", "/bin/sh", "-c",
                                              later]) + "; sleep 4"],
                stdin=slave, stdout=slave, stderr=slave, env=ctx.env,
                preexec_fn=lambda: _as_controlling_terminal(slave),
            )  # fmt: skip
            assert wait_for(lambda: ctx("exec", "tty", "--", "/bin/cat", "/tmp/later",
                                        check=False).stdout != "", 10)  # fmt: skip
            typed_later = _pending_input(slave)
            admin_shell.wait(timeout=30)
        shown = _pending_input(master)
    finally:
        os.close(master)
        os.close(slave)
    assert b"pushed" in shown or b"refused" in shown, shown  # it ran, on a pty of its own
    assert typed == b""
    assert typed_later == b""


def test_kill_of_its_process_group_does_not_reach_the_admins(
    ctx: Contextd, armed_tree: Path, tmp_path: Path
) -> None:
    start_guest(ctx, armed_tree, "killer")
    canary_pid = tmp_path / "canary"
    script = (
        f"sleep 60 >/dev/null 2>&1 & echo $! > {canary_pid}; "
        f"{CONTEXTD} exec killer -- /bin/kill -9 0; echo exec-returned-$?"
    )
    shell = subprocess.run(
        ["setsid", "/bin/sh", "-c", script],
        env=ctx.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "exec-returned-137" in shell.stdout, shell  # the guest's command was killed...
    canary = int(canary_pid.read_text())
    os.kill(canary, 0)  # ... and the admin's process group was not
    os.kill(canary, signal.SIGKILL)


@pytest.mark.parametrize("operation", ["leaked-read", "leaked-write"])
def test_a_leaked_host_fd_gives_a_user_namespaced_guest_nothing(
    ctx: Contextd, armed_tree: Path, tmp_path: Path, operation: str
) -> None:
    """Should a host directory's fd reach root in a guest (a bug of ours, a careless
    host daemon), its files stay the host's: a user-namespaced guest's root is no
    one to them. A privileged guest's root is host root: there the attack works
    (the control; docs/contextd.md lists it among that mode's limits)."""
    secrets = tmp_path / "host-secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "secret").write_text("the host's\n")
    os.chmod(secrets / "secret", 0o600)
    start_guest(ctx, armed_tree, "leak")  # on the host's network: its abstract sockets too
    name = f"contextd-test-leak-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind("\0" + name)
        server.listen(1)
        server.settimeout(30)
        attempt = subprocess.Popen(
            [CONTEXTD, "exec", "leak", "--", "/attack/try", operation, name],
            env=ctx.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        connection, _ = server.accept()
        directory = os.open(secrets, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            socket.send_fds(connection, [b"x"], [directory])
        finally:
            os.close(directory)
            connection.close()
        out, err = attempt.communicate(timeout=60)
    assert attempt.returncode == 0, err
    if ctx.guest_mode == "userns":
        assert out.strip() == "EACCES"
        assert (secrets / "secret").read_text() == "the host's\n"
    else:
        assert out.strip() == "ok"


def test_a_guest_gets_no_host_fd_through_exec(
    ctx: Contextd, armed_tree: Path, tmp_path: Path
) -> None:
    start_guest(ctx, armed_tree, "fds")
    host_file = tmp_path / "host-output"
    secret = tmp_path / "host-secret"
    secret.write_text("host secret\n")
    with open(host_file, "w") as out, open(secret) as extra:
        subprocess.run(
            [
                CONTEXTD, "exec", "fds", "--", "/bin/sh", "-c",
                "ls -l /proc/self/fd/; cat /proc/self/fd/3 /proc/self/fd/4 2>&1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=(extra.fileno(),),
            env=ctx.env,
            timeout=60,
            check=False,
        )  # fmt: skip
    listing = host_file.read_text()
    targets = re.findall(r"(\d+) -> (.*)$", listing, re.M)
    assert targets, listing
    for fd, target in targets:
        if fd in ("0", "1", "2"):
            assert target.startswith("pipe:["), listing  # never the admin's file
    assert str(tmp_path) not in listing and "host secret" not in listing


def test_keyrings_of_the_host_are_out_of_reach(
    ctx: Contextd, armed_tree: Path, attack_programs: Path
) -> None:
    start_guest(ctx, armed_tree, "keys")
    description = f"contextd-test-{os.getpid()}"
    key = run("keyctl", "add", "user", description, "s3cret", "@u").stdout.strip()
    try:
        # Control: any uid-0 process of the host finds and reads root's user keyring.
        host = run(attack_programs / "keys", description).stdout
        assert "search ok" in host and "read ok s3cret" in host, host
        assert description in Path("/proc/keys").read_text()
        listed = ctx("exec", "keys", "--", "/bin/cat", "/proc/keys", "/proc/key-users").stdout
        assert listed == ""  # masked
        # The attack, from an admin session that has a session keyring of its own.
        inside = run(
            "keyctl", "session", "-", CONTEXTD, "exec", "keys", "--",
            "/attack/keys", description, env=ctx.env,
        ).stdout  # fmt: skip
    finally:
        run("keyctl", "unlink", key, "@u", check=False)
    assert inside.splitlines() == ["session ENOSYS", "search ENOSYS"], inside


def test_a_chroot_escape_ends_at_the_guests_root(ctx: Contextd, armed_tree: Path) -> None:
    start_guest(ctx, armed_tree, "esc")
    marker = Path("/tmp", f"host-marker-{os.getpid()}")
    marker.write_text("host")
    try:
        script = (
            "mkdir -p /tmp/jail && cp /attack/try /tmp/jail/try && "
            "chroot /tmp/jail /try chroot-escape"
        )
        out = ctx("exec", "esc", "--", "/bin/sh", "-c", script).stdout.split()
    finally:
        marker.unlink()
    # It did escape its jail (CAP_SYS_CHROOT is kept), and found the guest's root.
    assert "guest-marker" in out and "attack" in out, out
    assert marker.name not in out and "pytest-of-root" not in out


# -- devices -------------------------------------------------------------------


def test_devices_outside_the_guests_list_cannot_be_made_or_opened(
    ctx: Contextd, armed_tree: Path, host_disk: tuple[Path, int, int]
) -> None:
    """Even a guest given CAP_MKNOD cannot make a node of the host's disk and read it."""
    _node, major, minor = host_disk
    start_guest(ctx, armed_tree, "dev", capabilities=[*DEFAULT_CAPABILITIES, "MKNOD"])
    assert guest_try(ctx, "dev", "mknod", f"{major}:{minor}") == "EPERM"
    # The guest's own devices work.
    out = ctx(
        "exec", "dev", "--", "/bin/sh", "-c", "echo x > /dev/null; head -c 4 /dev/zero | wc -c"
    )
    assert out.stdout.strip() == "4"


# -- what the admin's terminal shows -----------------------------------------

HOSTILE_OUTPUT = b"\x1b]0;pwned-title\x07\x1b]52;c;cHduZWQ=\x07\x1b[21t\x1b[31mred\x1b[0m ok\n"


def _on_a_terminal(argv: list[str], env: dict[str, str]) -> bytes:
    """What argv prints when its stdout is a terminal (stdin is not)."""
    master, slave = os.openpty()
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env
        )
        os.close(slave)
        output = b""
        while True:
            if not select.select([master], [], [], 30)[0]:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        process.wait(timeout=30)
        return output
    finally:
        os.close(master)


def test_guest_output_cannot_drive_the_admins_terminal(ctx: Contextd, armed_tree: Path) -> None:
    (armed_tree / "hostile").write_bytes(HOSTILE_OUTPUT)
    ctx(
        "create",
        "loud",
        "--from",
        str(armed_tree),
        "--init",
        "/bin/sh -c 'cat /hostile; exec sleep 1000000'",
        f"--{ctx.guest_mode}",
    )
    ctx("start", "loud")
    contextd = CONTEXTD
    for argv in (
        [contextd, "logs", "loud"],
        [contextd, "exec", "loud", "--", "/bin/cat", "/hostile"],
    ):
        shown = _on_a_terminal(argv, ctx.env)
        assert b"red" in shown and b" ok" in shown, shown
        assert b"\x1b]" not in shown and b"\x07" not in shown and b"\x1b[21t" not in shown, shown
        assert b"^[]0;pwned-title^G" in shown, shown  # shown, not obeyed
        assert b"\x1b[31m" in shown  # colours kept
    # Asked for, or not to a terminal, the bytes are the guest's.
    assert ctx("logs", "loud").stdout.encode() == HOSTILE_OUTPUT
    raw = _on_a_terminal([contextd, "logs", "--raw", "loud"], ctx.env)
    # (the console is a pty: the log holds its CR LF line ends, as written)
    assert raw.replace(b"\r", b"") == HOSTILE_OUTPUT


# -- what a guest makes its FUSE server do ----------------------------------


def _cgroup_usage(controller: str, path: str, file: str) -> int:
    return int(Path("/sys/fs/cgroup", controller, path.lstrip("/"), file).read_text())


def test_the_work_a_guest_gives_its_fuse_server_is_charged_to_the_guest(
    ctx: Contextd, armed_tree: Path
) -> None:
    if not Path("/sys/fs/cgroup/memory/cgroup.procs").exists():
        pytest.skip("checked on cgroup v1 hosts (this one has no v1 memory hierarchy)")
    start_guest(ctx, armed_tree, "busy", limits={"memory": "128M"})
    server = fuse_server_of("busy")
    groups = dict(
        line.split(":", 2)[1:] for line in Path(f"/proc/{server}/cgroup").read_text().splitlines()
    )
    for controller in ("memory", "cpu", "cpuacct"):
        assert groups[controller] == "/contextd/busy/cowfs", groups
    assert groups["pids"] == "/contextd/busy/cowfs"  # not under the guest's pids limit
    before = _cgroup_usage("cpuacct", "contextd/busy/cowfs", "cpuacct.usage")
    # Metadata work through the mount: every request is the FUSE server's CPU time.
    ctx(
        "exec",
        "busy",
        "--",
        "/bin/sh",
        "-c",
        # (some of /proc and /sys are unreadable to a user-namespaced guest's root)
        "for i in 1 2 3 4 5 6 7 8; do ls -lR / >/dev/null 2>&1; done; true",
    )
    spent = _cgroup_usage("cpuacct", "contextd/busy/cowfs", "cpuacct.usage") - before
    assert spent > 0
    # ... and inside the guest's own accounting and memory limit.
    assert _cgroup_usage("cpuacct", "contextd/busy", "cpuacct.usage") >= spent
    assert _cgroup_usage("memory", "contextd/busy", "memory.limit_in_bytes") == 128 << 20
    assert _cgroup_usage("memory", "contextd/busy/cowfs", "memory.usage_in_bytes") > 0
