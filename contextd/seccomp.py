"""The system calls a guest may not make: a seccomp filter, built with libseccomp (pyseccomp).

The list follows Docker's default profile (moby's profiles/seccomp/default.json),
the reference most container runtimes share, restricted to what a guest's
reduced capability set does not already refuse, plus io_uring, which Docker
also refuses. The filter is installed in every process that enters a guest
(init, exec, enter) and passes to everything they run.

Refused calls fail with ENOSYS, "this kernel has no such call", which no
capability check returns, so that programs take the fallbacks they have for
older kernels (systemd without keyrings, glibc's clone without clone3,
mount(2) without the new mount API) and tests can tell the filter's refusal
from the kernel's. Creating a user namespace is refused with EPERM (as if
unprivileged user namespaces were off), because clone(2) itself must work.

The filter is built (and libseccomp loaded) before the process leaves the
host's root; it is loaded while the process still holds CAP_SYS_ADMIN, so
that no_new_privs is not needed and setuid programs keep working inside.
"""

from __future__ import annotations

import errno
import os

import pyseccomp as seccomp

from native.syscalls import CLONE_NEWUSER

# What a guest never needs and what has been the way out of containers, by group.
REFUSED: dict[str, tuple[str, ...]] = {
    # The kernel keyrings are not namespaced: root's user keyring is the same
    # keyring for every uid-0 process on the host.
    "kernel keyrings": ("add_key", "keyctl", "request_key"),
    # Replacing or extending the running kernel.
    "kernel replacement": (
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
        "create_module", "get_kernel_syms", "query_module",
    ),
    # Large kernel attack surfaces a guest has no use for.
    "kernel attack surface": (
        "bpf", "perf_event_open", "userfaultfd", "lookup_dcookie", "uselib", "ustat",
        "sysfs", "_sysctl", "nfsservctl", "vm86", "vm86old", "io_uring_setup",
        "io_uring_enter", "io_uring_register",
    ),
    # Opening any file of a filesystem by its handle (the "shocker" escape).
    "file handles": ("open_by_handle_at", "name_to_handle_at"),
    # The new mount API: mount(2) is what the capability checks were written for.
    "mount API": (
        "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    ),
    # The host's clock, swap, accounting and I/O ports.
    "host state": (
        "clock_adjtime", "clock_settime", "settimeofday", "stime", "adjtimex", "swapon",
        "swapoff", "acct", "iopl", "ioperm", "quotactl", "quotactl_fd",
    ),
    # clone3 passes its flags in memory, where a filter cannot check them.
    "unfilterable clone": ("clone3",),
}  # fmt: skip


def _extra_architectures() -> tuple[int, ...]:
    """The other ABIs this machine's kernel runs (32-bit binaries use other call numbers)."""
    machine = os.uname().machine
    if machine == "x86_64":
        return (seccomp.Arch.X86, seccomp.Arch.X32)
    if machine == "aarch64":
        return (seccomp.Arch.ARM,)
    return ()


class GuestFilter:
    """A guest's seccomp filter, built now, loaded later (load) in the entering process."""

    def __init__(self) -> None:
        self._filter = seccomp.SyscallFilter(seccomp.ALLOW)
        # libseccomp sets no_new_privs by default; setuid programs must keep working.
        self._filter.set_attr(seccomp.Attr.CTL_NNP, 0)
        for arch in _extra_architectures():
            self._filter.add_arch(arch)
        for names in REFUSED.values():
            for name in names:
                # Calls of the other ABIs only (vm86, stime) have negative numbers
                # here, which libseccomp places where they exist; -1 is unknown.
                number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
                if number == -1:
                    continue
                self._filter.add_rule(seccomp.ERRNO(errno.ENOSYS), number)
        for name in ("clone", "unshare"):
            self._filter.add_rule(
                seccomp.ERRNO(errno.EPERM),
                name,
                seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER),
            )

    def load(self) -> None:
        """Install the filter on this process and everything it starts (irrevocable)."""
        self._filter.load()


def refused_calls() -> list[str]:
    """Every refused call's name, for the docs and tests."""
    return [name for names in REFUSED.values() for name in names]
