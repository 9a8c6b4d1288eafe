"""Linux capabilities by name, util-vserver's default set, and dropping the rest."""

from __future__ import annotations

from native import syscalls

CAPABILITIES: dict[str, int] = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4,
    "KILL": 5, "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9,
    "NET_BIND_SERVICE": 10, "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13,
    "IPC_LOCK": 14, "IPC_OWNER": 15, "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18,
    "SYS_PTRACE": 19, "SYS_PACCT": 20, "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23,
    "SYS_RESOURCE": 24, "SYS_TIME": 25, "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28,
    "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30, "SETFCAP": 31, "MAC_OVERRIDE": 32,
    "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35, "BLOCK_SUSPEND": 36, "AUDIT_READ": 37,
    "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}  # fmt: skip

# What a guest's root may still do: util-vserver's default set without SYS_PTRACE
# and DAC_READ_SEARCH, which Docker's default set drops too (docs/contextd.md,
# "Security model", compares the three). SYS_PTRACE would let a guest trace
# processes that are not its own to trace; DAC_READ_SEARCH opens files by handle
# (open_by_handle_at, the "shocker" escape), and DAC_OVERRIDE already covers
# what it adds to reading and searching. SYS_BOOT is kept: in a PID namespace
# reboot(2) only ends that namespace's init (halt, poweroff and reboot inside
# stop or restart the guest), and kexec, its other use, is refused by seccomp.
# SETPCAP is kept (as Docker does): a distribution's systemd drops capabilities
# from its services' bounding sets; it can only take away within the guest's set.
DEFAULT_KEEP: tuple[str, ...] = (
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETUID", "SETGID", "SETPCAP",
    "NET_BIND_SERVICE", "SYS_CHROOT", "SYS_BOOT", "SYS_TTY_CONFIG", "LEASE", "SETFCAP",
    "AUDIT_WRITE",
)  # fmt: skip


# A user-namespaced guest's root: every capability, over what its namespaces own
# (which is all a capability there reaches), but the network's own: with them
# it could change its addresses or send forged packets on the host's bridge.
# Those that only the host's root could use are dropped too, as LXC drops them
# for unprivileged containers: a distribution's boot then skips what needs them
# (systemd's debugfs and tracefs mounts ask for SYS_RAWIO) rather than fail.
_USERNS_DROP = ("NET_ADMIN", "NET_RAW", "SYS_RAWIO", "SYS_MODULE", "SYS_TIME", "MAC_ADMIN",
                "MAC_OVERRIDE")  # fmt: skip
USERNS_KEEP: tuple[str, ...] = tuple(name for name in CAPABILITIES if name not in _USERNS_DROP)


def last_cap() -> int:
    """The highest capability number this kernel knows."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def mask(names: list[str] | tuple[str, ...]) -> int:
    """The bit mask of capabilities by name."""
    result = 0
    for name in names:
        result |= 1 << CAPABILITIES[name]
    return result


def drop_all_but(keep: list[str] | tuple[str, ...]) -> None:
    """Limit this process and everything it execs to keep: bounding, permitted,
    effective and inheritable sets, and no ambient capabilities.

    Root's capabilities after execve are its bounding set, so the bounding set
    is what confines a guest's root; the others make it hold now, before exec.
    """
    drop_bounding_but(keep)
    limit_held_to(keep)


def drop_bounding_but(keep: list[str] | tuple[str, ...]) -> None:
    """Drop every capability but keep from the bounding set (needs CAP_SETPCAP)."""
    keep_mask = mask(keep)
    for number in range(last_cap() + 1):
        if not keep_mask >> number & 1:
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, number)


def limit_held_to(keep: list[str] | tuple[str, ...]) -> None:
    """Keep no capability but those of keep in the effective and permitted sets, none
    inheritable, no ambient ones."""
    keep_mask = mask(keep)
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    effective, permitted, _inheritable = syscalls.capget()
    syscalls.capset(effective & keep_mask, permitted & keep_mask, 0)
