"""The helper that creates a guest's context: ``python -m contextd.spawn``.

Run in a process of its own (forked by contextd's fork server: no threads, no
event loop), it unshares the namespaces, forks the guest's PID 1 and reports
on stdout:

    <- stdin:  one JSON line: root, hostname, init, environment, capabilities, net
    -> stdout: the new PID 1's pid (as the host sees it)
    <- stdin:  "go" once contextd has put that pid into the guest's cgroup
    -> stdout: "ok" once init is exec'd, or "error: ..." (nothing is left running)

The guest's console (stdout and stderr of init) is the fd named console_fd. The
helper exits; PID 1 passes to contextd, its subreaper while it runs (else to
the host's init), so a guest outlives contextd.
"""

from __future__ import annotations

import json
import os
import sys

from contextd import namespace
from contextd.seccomp import GuestFilter
from native import syscalls as sc


def _child(request: dict[str, object], go_r: int, err_w: int) -> None:
    """The guest's PID 1 until it execs init: nothing else of the guest exists yet."""
    try:
        guest_filter = GuestFilter()  # libseccomp is loaded here, while the host's root is ours
        if os.read(go_r, 16) != b"go":
            os._exit(1)
        os.close(go_r)
        os.setsid()
        sc.join_new_session_keyring()
        namespace.setup_root(str(request["root"]))
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        console = int(request["console_fd"])  # type: ignore[call-overload]
        os.dup2(console, 1)
        os.dup2(console, 2)
        namespace.close_fds(keep=(err_w,))
        namespace.become_guest(
            str(request["hostname"]),
            list(request["capabilities"]),  # type: ignore[call-overload]
            guest_filter,
        )
        namespace.reset_signals()
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "container": "contextd",
            "TERM": "linux",
        }
        env.update(dict(request["environment"]))  # type: ignore[call-overload]
        argv = list(request["init"])  # type: ignore[call-overload]
        os.execve(argv[0], argv, env)
    except BaseException as e:  # reported to contextd; the guest does not start
        try:
            os.write(err_w, f"{type(e).__name__}: {e}".encode()[:4000])
        finally:
            os._exit(127)


def main() -> None:
    request = json.loads(sys.stdin.readline())
    flags = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWPID
    if request.get("net") == "isolated":
        flags |= sc.CLONE_NEWNET
    sc.unshare(flags)
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.close(err_r)
        _child(request, go_r, err_w)
    os.close(go_r)
    os.close(err_w)
    print(pid, flush=True)
    if sys.stdin.readline().strip() != "go":
        os.kill(pid, 9)
        sys.exit(1)
    os.write(go_w, b"go")
    os.close(go_w)
    error = b""
    while chunk := os.read(err_r, 4096):
        error += chunk
    if error:
        os.waitpid(pid, 0)
        print("error: " + error.decode(errors="replace").replace("\n", " "), flush=True)
        sys.exit(1)
    print("ok", flush=True)


if __name__ == "__main__":
    main()
