"""The first process of a new context: forked into new namespaces by a throwaway child.

A new PID namespace applies to the children of the process that made it, and
a process that joins or makes namespaces should not be the one that stays
behind in the host's: so a throwaway child joins the namespaces given by fd,
makes the new ones (a user namespace first, the caller writing its id maps from
outside), forks the context's first process into them and ends. That process
then passes to the nearest subreaper above us: contextd's supervisor for a
guest (which is one), the engine's conmon or containerd-shim for an OCI
container (contextd.oci: they learn its exit status only as its parent).

Used by contextd.supervisor and contextd.oci.container: one way to make a context.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NoReturn

from native import syscalls as sc


class SpawnError(Exception):
    """The context's namespaces could not be made."""


def fork_into_namespaces(
    flags: int,
    become: Callable[[], NoReturn],
    close_in_child: tuple[int, ...] = (),
    join: tuple[int, ...] = (),
    idmap: dict[str, int] | None = None,
) -> int:
    """Fork become() as the first process of new namespaces (flags: CLONE_NEW*), after
    joining those of the namespace fds in join; its pid as the host sees it.

    close_in_child: our ends of the caller's pipes, closed in the throwaway child.
    idmap: make a user namespace first, mapping ids 0..count-1 to base.. (users and
    groups), written by us from outside it.
    """
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    child = os.fork()
    if child == 0:  # the throwaway child
        try:
            for fd in (*close_in_child, to_child_w, from_child_r):
                os.close(fd)
            for fd in join:
                sc.setns(fd, 0)
            if idmap:
                sc.unshare(sc.CLONE_NEWUSER)
                os.write(from_child_w, b"u")
                if os.read(to_child_r, 1) != b"m":
                    os._exit(1)
            sc.unshare(flags)
            pid = os.fork()
            if pid == 0:
                os.close(to_child_r)
                os.close(from_child_w)
                become()
            os.write(from_child_w, b"p" + pid.to_bytes(8, "little"))
        except BaseException as e:
            os.write(from_child_w, b"e" + f"{type(e).__name__}: {e}".encode()[:1000])
        finally:
            os._exit(0)
    os.close(to_child_r)
    os.close(from_child_w)
    try:
        if idmap:
            if os.read(from_child_r, 1) != b"u":
                raise SpawnError("the user namespace was not made")
            write_id_maps(child, idmap)
            os.write(to_child_w, b"m")
        answer = os.read(from_child_r, 1024)
        if answer[:1] == b"e":
            raise SpawnError(f"namespaces not made: {answer[1:].decode(errors='replace')}")
        if len(answer) != 9 or answer[:1] != b"p":
            raise SpawnError("the namespaces were not made")
        return int.from_bytes(answer[1:], "little")
    finally:
        os.close(to_child_w)
        os.close(from_child_r)
        _reap(child)  # its child passes to the subreaper above us


def fail(errors_w: int, error: BaseException, status: int = 127) -> NoReturn:
    """In a context's process before its exec: tell the one that made it what went
    wrong (one line on its error pipe), and end."""
    try:
        os.write(errors_w, f"{type(error).__name__}: {error}".encode()[:4000])
    finally:
        os._exit(status)


def write_id_maps(pid: int, idmap: dict[str, int]) -> None:
    """Ids 0..count-1 in the user namespace of pid are host ids base..base+count-1,
    for users and groups."""
    line = f"0 {idmap['base']} {idmap['count']}\n"
    for kind in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{kind}", "w") as f:
            f.write(line)


def wait_exit_code(pid: int) -> int:
    """Wait for a child to end; its exit code as a shell gives it (128 + N if killed by
    signal N)."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return
