"""Inside a new context: the guest's root, /proc, /sys, /dev, pivot_root, hostname, capabilities.

These functions run in the child that becomes the guest's PID 1 (``setup_root``)
or in a process joining a running guest (contextd.attach). They use only system calls
(native/ and os), never threads or the event loop: they run between fork and exec.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
import struct

from contextd.capabilities import drop_all_but
from contextd.seccomp import GuestFilter
from native import syscalls as sc

# Files of /proc that would tell or let a guest do too much: covered with an empty
# read-only file.
MASKED_PROC_FILES = (
    "kcore", "keys", "key-users", "sysrq-trigger", "timer_list", "sched_debug",
    "latency_stats", "kallsyms", "kpagecount", "kpageflags", "kpagecgroup", "config.gz",
)  # fmt: skip
# Directories of /proc a guest must not see into: covered with an empty read-only tmpfs.
MASKED_PROC_DIRS = ("acpi", "scsi", "asound", "firmware")
# Read-only views: kernel tunables are the host's.
READONLY_PROC = ("sys", "irq", "bus", "fs")

DEVICES = (  # name, major, minor
    ("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9),
    ("tty", 5, 0),
)  # fmt: skip


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    sc.mount(source, target, fstype, flags, data)


def bind_readonly(path: str) -> None:
    _mount(path, path, None, sc.MS_BIND | sc.MS_REC)
    _mount(None, path, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV)


def setup_root(root: str, idmap: dict[str, int] | None = None) -> tuple[int, int]:
    """Make root (the guest's cowfs mount) this mount namespace's /, with its own /proc,
    a read-only /sys, a minimal /dev and tmpfs /run, and detach the host's tree; the
    console's pty (master, slave), /dev/console being the slave.

    idmap: the guest has a user namespace (owning this mount namespace), and we
    are still host root in it, an id it does not map: the guest's root is
    reached as that (host users, guest root among them, cannot pass the host's
    0700 directories above it), then we become the namespace's root, who can
    own what is made in the guest's new tmpfs mounts. Device nodes are then
    bound from the host's /dev rather than made, and /sys, when the network
    namespace is the host's, is the host's bound read-only.
    """
    enter_root_tree(root)
    if idmap is not None:
        become_namespace_root()
    for sub in ("proc", "sys", "dev"):
        if not os.path.isdir(sub) or os.path.islink(sub):
            raise RuntimeError(f"the guest has no /{sub} directory")
    mount_proc("proc")
    mount_sys("sys")
    mount_cgroup("sys/fs/cgroup")
    console = _make_dev("dev", bind_devices=idmap is not None)
    _mount_run(".")
    pivot_into_root()
    return console


def enter_root_tree(root: str) -> None:
    """Make root (a mount point or not) a mount of its own in this (new, private) mount
    namespace and our cwd: what is mounted for the new root is mounted relative to it."""
    _mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    # A bind of the root onto itself: pivot_root needs a mount point, and it keeps
    # the guest's mounts below inside its own tree.
    _mount(root, root, None, sc.MS_BIND | sc.MS_REC)
    os.chdir(root)


def pivot_into_root() -> None:
    """The cwd (enter_root_tree's root) becomes /, and the host's tree is detached."""
    sc.pivot_root(".", ".")  # the old root is stacked on the new one ...
    sc.umount2(".", sc.MNT_DETACH)  # ... and detached: the host's tree is gone
    os.chdir("/")


def mount_proc(proc: str, sysctls: dict[str, str] | None = None) -> None:
    """A new /proc at proc, its dangerous files and directories masked and the kernel's
    tunables read-only; sysctls (those the context's own namespaces own) set first."""
    empty = _empty_read_only_file(proc)
    try:
        _mount("proc", proc, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
        for name in MASKED_PROC_FILES:
            with contextlib.suppress(FileNotFoundError):
                if os.path.isfile(f"{proc}/{name}"):
                    _mount(f"/proc/self/fd/{empty}", f"{proc}/{name}", None, sc.MS_BIND)
    finally:
        os.close(empty)
    for name in MASKED_PROC_DIRS:
        if os.path.isdir(f"{proc}/{name}"):
            _mount(
                "tmpfs",
                f"{proc}/{name}",
                "tmpfs",
                sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV,
                "size=0",
            )
    for key, value in (sysctls or {}).items():
        with open(f"{proc}/sys/{key.replace('.', '/')}", "w") as f:
            f.write(value)
    for name in READONLY_PROC:
        if os.path.isdir(f"{proc}/{name}"):
            bind_readonly(f"{proc}/{name}")


def become_namespace_root() -> None:
    """Become root of the user namespace we are in (host root there has no id), without
    the host's supplementary groups."""
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def mount_sys(target: str) -> None:
    """sysfs, read-only (the host's, bound read-only, where a new one may not be made)."""
    flags = sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
    try:
        _mount("sysfs", target, "sysfs", flags)
    except PermissionError:  # a user namespace that does not own the network namespace
        _mount("/sys", target, None, sc.MS_BIND | sc.MS_REC)
        _mount(None, target, None, sc.MS_REMOUNT | sc.MS_BIND | flags)


def mount_cgroup(target: str) -> None:
    """The guest's own part of the cgroup hierarchy a distribution's systemd keeps its
    units in: the cgroup namespace made before this shows the guest's cgroup as its
    root. On hosts with cgroup v1's systemd hierarchy, that one at
    /sys/fs/cgroup/systemd (on a tmpfs); on hosts with the unified hierarchy only
    (cgroup v2), that one at /sys/fs/cgroup."""
    if not os.path.isdir(target):
        return
    with open("/proc/self/cgroup") as f:
        hierarchies = [line.split(":")[1] for line in f if line.count(":") >= 2]
    flags = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
    if hierarchies == [""]:  # the unified hierarchy alone
        try:
            _mount("cgroup2", target, "cgroup2", flags)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            # /sys bound from the host's (a user namespace's guest): the host's cgroup2
            # mount, its whole tree, came along. It cannot be unmounted there (locked
            # to /sys), nor have the same filesystem mounted on it (EBUSY): covered by
            # an empty read-only tmpfs, which the guest's cgroup2 then covers.
            _mount("tmpfs", target, "tmpfs", flags | sc.MS_RDONLY, "size=0,mode=755")
            _mount("cgroup2", target, "cgroup2", flags)
        return
    if "name=systemd" not in hierarchies:
        return
    _mount("tmpfs", target, "tmpfs", flags, "mode=755,size=64k")
    os.mkdir(f"{target}/systemd", 0o755)
    _mount("cgroup", f"{target}/systemd", "cgroup", flags, "none,name=systemd")
    _mount(None, target, None, sc.MS_REMOUNT | sc.MS_RDONLY | flags, "mode=755,size=64k")


def _mount_run(root: str) -> None:
    """/run and /run/lock as tmpfs, as a booting distribution expects them."""
    run = f"{root}/run"
    if not os.path.isdir(run) or os.path.islink(run):
        return
    _mount("tmpfs", run, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=755,size=20%")
    os.mkdir(f"{run}/lock", 0o755)
    _mount(
        "tmpfs",
        f"{run}/lock",
        "tmpfs",
        sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
        "mode=1777,size=5M",
    )


def _empty_read_only_file(directory: str) -> int:
    """An O_PATH fd of an empty file on a read-only tmpfs mounted on directory (then
    covered by what is mounted there next): what masks /proc files. Reading it gives
    nothing and opening it for writing fails with EROFS; /dev/null would take writes."""
    flags = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
    _mount("tmpfs", directory, "tmpfs", flags, "size=4k,mode=555")
    path = f"{directory}/empty"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
    _mount(None, directory, None, sc.MS_REMOUNT | sc.MS_RDONLY | flags, "size=4k,mode=555")
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def _make_dev(dev: str, bind_devices: bool) -> tuple[int, int]:
    """A minimal /dev on tmpfs; the console's pty (master, slave)."""
    _mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_STRICTATIME, "mode=755,size=65536k")
    make_device_nodes(dev, bind_devices)
    old_umask = os.umask(0)
    try:
        os.mkdir(f"{dev}/pts", 0o755)
        _mount(
            "devpts",
            f"{dev}/pts",
            "devpts",
            sc.MS_NOSUID | sc.MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        )
        os.symlink("pts/ptmx", f"{dev}/ptmx")
        os.mkdir(f"{dev}/shm", 0o1777)
        _mount("tmpfs", f"{dev}/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777")
        os.mkdir(f"{dev}/mqueue", 0o1777)
        make_dev_links(dev)
        return make_console(dev)
    finally:
        os.umask(old_umask)


def make_device_nodes(dev: str, bind_devices: bool) -> None:
    """The devices every context has (DEVICES) in the directory dev; bind_devices: in a
    user namespace, which may not mknod, the host's own nodes bound there."""
    old_umask = os.umask(0)
    try:
        for name, major, minor in DEVICES:
            node = f"{dev}/{name}"
            if bind_devices:
                os.close(os.open(node, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
                _mount(f"/dev/{name}", node, None, sc.MS_BIND)
            else:
                os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    finally:
        os.umask(old_umask)


def make_dev_links(dev: str) -> None:
    """/dev/fd, stdin, stdout, stderr and core, as symlinks into /proc."""
    for name, target in (
        ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"), ("core", "/proc/kcore"),
    ):  # fmt: skip
        with contextlib.suppress(FileExistsError):
            os.symlink(target, f"{dev}/{name}")


TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441


def make_console(dev: str) -> tuple[int, int]:
    """/dev/console: a pty of the guest's own devpts, bound there; (master, slave).

    Its master goes to the supervisor, which keeps the console log from it: a
    distribution's init writes its boot to /dev/console and gives it to
    whatever it runs there.
    """
    master, slave = make_pty(f"{dev}/pts/ptmx")
    number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
    os.close(os.open(f"{dev}/console", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    _mount(f"{dev}/pts/{number}", f"{dev}/console", None, sc.MS_BIND)
    return master, slave


def make_pty(ptmx: str) -> tuple[int, int]:
    """A new pty of the devpts whose ptmx this is: (master, slave), neither our
    controlling terminal."""
    master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    return master, slave


def close_fds(keep: tuple[int, ...] = ()) -> None:
    """Close every fd from 3 up but those in keep."""
    start = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > start:
            os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, 1 << 20)


def become_guest(hostname: str | None, capabilities: list[str], guest_filter: GuestFilter) -> None:
    """The last steps before a process may be seen by the guest: hostname (a new UTS
    namespace only), the seccomp filter, no securebits, only the guest's capabilities.

    The filter is loaded while CAP_SYS_ADMIN is still held, so that it needs no
    no_new_privs (which would disable setuid programs in the guest). Securebits
    are the kernel's defaults (root is root, setuid works), never whatever the
    admin's shell or contextd's service manager set.
    """
    if hostname is not None:
        sc.sethostname(hostname)
    os.umask(0o022)
    guest_filter.load()
    sc.prctl(sc.PR_SET_SECUREBITS, 0)
    drop_all_but(capabilities)


def reset_signals() -> None:
    """Default dispositions and an empty mask, as a freshly booted program expects."""
    for number in range(1, signal.NSIG):
        if number in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
