"""The contextd daemon: a control socket (root only) in front of the runtime.

``contextd serve`` listens on /run/contextd/contextd.sock (mode 0600; each
peer's credentials are checked: uid 0 only). A request is one JSON line,
``{"verb": ..., "name": ..., ...}``, the answer one JSON line, ``{"ok": true,
...}`` or ``{"ok": false, "error": "..."}``. Guests do not depend on the
daemon: it can stop or crash, and a restarted daemon adopts the running ones
(their state is in /run/contextd/guests/) and cleans up after those that died.
Logs are structured: one JSON object a line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import socket
import struct
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from contextd import config as configs
from contextd import hostids, procfs, restarts, runstate, runtime
from contextd.cgroups import Cgroup
from contextd.oci import roots as oci_roots
from contextd.paths import run_dir, socket_path
from cowfs.errors import CowfsError
from cowfs.host.paths import state_root
from cowfs.host.treelock import remove_tree
from cowfs.unify.clone import clone

log = logging.getLogger("contextd")


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, message and any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _event(message: str, **fields: object) -> None:
    log.info(message, extra={"fields": fields})


class Daemon:
    """The verbs, each run under its guest's lock, and a watch on each running guest."""

    def __init__(self, config_dir: Path, guests: runtime.Runtime, nursery: trio.Nursery):
        self.config_dir = config_dir
        self.runtime = guests
        self.nursery = nursery
        self.locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self.pending_restarts: dict[str, trio.CancelScope] = {}
        self.image_lock = trio.Lock()
        # Creates one at a time: each picks the next free xid (and id range, addresses)
        # from the files written so far, and writes its own only after its clone.
        self.create_lock = trio.Lock()

    def watch(self, state: runstate.RunState) -> None:
        """Notice at once when the guest's init ends (its supervisor does then)."""
        self.nursery.start_soon(_guarded, self._watch, state)

    async def _watch(self, state: runstate.RunState) -> None:
        name = state.name
        supervisor = None
        if (
            state.supervisor_pid
            and procfs.start_time(state.supervisor_pid) == state.supervisor_start
        ):
            with contextlib.suppress(ProcessLookupError):
                supervisor = os.pidfd_open(state.supervisor_pid)
        if supervisor is not None:
            try:
                await trio.lowlevel.wait_readable(supervisor)
                with contextlib.suppress(ChildProcessError):  # ours if the fork server died
                    os.waitid(os.P_PIDFD, supervisor, os.WEXITED | os.WNOHANG)
            finally:
                os.close(supervisor)
        async with self.locks[name]:
            current = runstate.load(name)
            if current is None or current.supervisor_pid != state.supervisor_pid:
                return  # stopped (or started again) by a verb meanwhile
            record = runstate.load_exit(name)
            if record is None:  # it died before init: init is killed with the guest below
                record = {"failure": "its supervisor died", "ended": time.time()}
            cgroup = Cgroup(name)
            if record.get("signal") == 9 and cgroup.exists() and cgroup.stats().memory_limit_hits:
                record["oom"] = True
            try:
                config = self._config(name)
                # Decided and recorded first: `status` never shows a guest to be
                # restarted as failed meanwhile.
                plan = self._record_policy(config, record, current.restarts)
                await trio.to_thread.run_sync(self.runtime.stop, config, 0, False)
            except CowfsError as e:
                log.error("cleaning up after %s: %s", name, e)
                return
            tail = record.get("console_tail")
            _event(
                "guest ended",
                guest=name,
                how=runstate.describe_exit(record),
                console=tail[-5:] if isinstance(tail, list) else [],
            )
            self._carry_out(name, plan)

    def apply_policy(
        self, config: configs.GuestConfig, record: dict[str, Any], recent: list[float]
    ) -> None:
        """After a guest ended as record says (and was cleaned up): start it again later
        if its restart policy says so, or record why not (contextd.restarts)."""
        self._carry_out(config.name, self._record_policy(config, record, recent))

    def _record_policy(
        self, config: configs.GuestConfig, record: dict[str, Any], recent: list[float]
    ) -> tuple[restarts.Decision, list[float]]:
        """The restart policy's decision, written into the guest's exit record."""
        now = time.time()
        decision = restarts.decide(config, record, recent, now)
        recent = restarts.within_interval(config, recent, now)
        if not decision.restart:
            if decision.why:
                record["gave_up"] = decision.why
        elif decision.counted:
            recent.append(now + decision.delay)
            record["restart_at"] = now + decision.delay
        runstate.save_exit(config.name, record)
        return decision, recent

    def _carry_out(self, name: str, plan: tuple[restarts.Decision, list[float]]) -> None:
        decision, recent = plan
        if not decision.restart:
            if decision.why:
                _event("not restarted", guest=name, why=decision.why)
            return
        event = "restarted by its policy" if decision.counted else "rebooted"
        self._restart_later(name, decision.delay, recent, event)

    def _restart_later(self, name: str, delay: float, recent: list[float], event: str) -> None:
        """Start the guest again in delay seconds, unless a verb has started, stopped or
        deleted it meanwhile (_cancel_restart)."""
        scope = trio.CancelScope()
        self.pending_restarts[name] = scope
        self.nursery.start_soon(_guarded, self._restart, name, delay, recent, scope, event)

    async def _restart(
        self, name: str, delay: float, recent: list[float], scope: trio.CancelScope, event: str
    ) -> None:
        with scope:
            if delay:
                _event("restarting", guest=name, delay=delay)
                await trio.sleep(delay)
            async with self.locks[name]:
                if self.pending_restarts.get(name) is not scope:
                    return
                del self.pending_restarts[name]
                try:
                    config = self._config(name, with_others=True)
                    new = await trio.to_thread.run_sync(self.runtime.start, config, recent)
                except CowfsError as e:
                    log.error("restart of %s failed: %s", name, e)
                    self._after_failed_restart(name, str(e), recent)
                    return
                _event(event, guest=name, init_pid=new.init_pid)
                self.watch(new)

    def _after_failed_restart(self, name: str, error: str, recent: list[float]) -> None:
        """A restart that failed is a failure of its own: tried again as the policy says."""
        record = runstate.load_exit(name) or {"ended": time.time()}
        record.setdefault("failure", f"its restart failed: {error}")
        with contextlib.suppress(CowfsError):
            self.apply_policy(self._config(name), record, recent)

    def _cancel_restart(self, name: str) -> bool:
        """Drop a pending automatic restart of the guest; True if there was one."""
        scope = self.pending_restarts.pop(name, None)
        if scope is None:
            return False
        scope.cancel()
        record = runstate.load_exit(name)
        if record is not None and record.pop("restart_at", None) is not None:
            runstate.save_exit(name, record)
        return True

    def _config(self, name: str, with_others: bool = False) -> configs.GuestConfig:
        """A guest's configuration; with_others: checked against every other guest's too
        (what a start needs). A bad file of another guest does not keep this one from
        being stopped, entered or reported."""
        path = self.config_dir / f"{name}.toml"
        if not path.is_file():  # (handle() has checked the name)
            raise runtime.GuestError(f"unknown guest {name!r} (no {path})")
        if with_others:
            return configs.load_all(self.config_dir)[name]
        config = configs.parse(path)
        if config.name != name:
            raise runtime.GuestError(f"{path}: name: {config.name!r}, not {name!r}")
        return config

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        verb = request.get("verb")
        handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = getattr(
            self, f"do_{verb}", None
        )
        if not isinstance(verb, str) or handler is None:
            raise runtime.GuestError(f"unknown request {verb!r}")
        if request.get("name") is None:
            return await handler(request)
        # Checked before anything is done with it: a name becomes file and cgroup names.
        name = configs.check_name(request["name"])
        async with self.locks[name]:
            return await handler(request)

    async def do_ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid()}

    async def do_list(self, request: dict[str, Any]) -> dict[str, Any]:
        guests = await trio.to_thread.run_sync(self._all_status)
        return {"guests": guests}

    def _all_status(self) -> list[dict[str, Any]]:
        guests = [runtime.status(c) for c in configs.load_all(self.config_dir).values()]
        containers = [oci_roots.status(r) for r in oci_roots.recorded()]
        return [dataclasses.asdict(s) for s in guests + containers]

    async def do_status(self, request: dict[str, Any]) -> dict[str, Any]:
        config = self._config(request["name"])
        status = await trio.to_thread.run_sync(runtime.status, config)
        return {
            "status": dataclasses.asdict(status),
            "capabilities": config.capabilities,
            "environment": config.environment,
            "console_log": str(runtime.log_dir() / f"{config.name}.console.log"),
        }

    async def do_attach(self, request: dict[str, Any]) -> dict[str, Any]:
        """What contextd exec and enter need to enter a running guest (contextd.attach)."""
        config = self._config(request["name"])
        state = runstate.load(config.name)
        if state is None or not runstate.is_running(state):
            raise runtime.GuestError(f"guest {config.name} is not running")
        return {
            "init_pid": state.init_pid,
            "init_start": state.init_start,
            "capabilities": config.capabilities,
            "environment": config.environment,
            "cgroup_dirs": [str(d) for d in Cgroup(config.name).join_dirs(state.init_pid)],
            "userns": config.security.userns,
        }

    async def do_start(self, request: dict[str, Any]) -> dict[str, Any]:
        config = self._config(request["name"], with_others=True)
        self._cancel_restart(config.name)
        state = await trio.to_thread.run_sync(self.runtime.start, config)
        _event("started", guest=config.name, xid=config.xid, init_pid=state.init_pid)
        self.watch(state)
        return {"init_pid": state.init_pid}

    async def do_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        config = self._config(request["name"])
        timeout = request.get("timeout")
        cancelled = self._cancel_restart(config.name)
        try:
            await trio.to_thread.run_sync(self.runtime.stop, config, timeout)
        except runtime.GuestError as e:
            if not cancelled or "is not running" not in str(e):
                raise
        _event("stopped", guest=config.name)
        return {}

    async def do_restart(self, request: dict[str, Any]) -> dict[str, Any]:
        config = self._config(request["name"], with_others=True)
        self._cancel_restart(config.name)
        state = runstate.load(config.name)
        if state is not None and runstate.is_running(state):
            await trio.to_thread.run_sync(self.runtime.stop, config, request.get("timeout"))
        new = await trio.to_thread.run_sync(self.runtime.start, config)
        _event("restarted", guest=config.name, init_pid=new.init_pid)
        self.watch(new)
        return {"init_pid": new.init_pid}

    async def do_create(self, request: dict[str, Any]) -> dict[str, Any]:
        async with self.create_lock:
            return await self._create(request)

    async def _create(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request["name"]
        template = request["template"]
        existing = configs.load_all(self.config_dir)
        path = self.config_dir / f"{name}.toml"
        # The file too: one whose guest calls itself otherwise would be written over.
        if name in existing or os.path.lexists(path):
            where = existing[name].path if name in existing else path
            raise runtime.GuestError(f"guest {name!r} exists already ({where})")
        xid = request.get("xid") or max([c.xid for c in existing.values()] + [100]) + 1
        if any(c.xid == xid for c in existing.values()):
            owner = next(c.name for c in existing.values() if c.xid == xid)
            raise runtime.GuestError(f"xid {xid} is used by guest {owner}")
        root = request.get("root") or str(state_root() / "guests" / name)
        config = configs.GuestConfig(
            name=name,
            xid=int(xid),
            root=root,
            path=path,
            hostname=name,
            security=configs.Security(userns=bool(request.get("userns", True))),
        )
        if config.security.userns:  # recorded: its files' owners on the host stay put
            size = configs.ID_RANGE
            taken = [(c.id_base(), size) for c in existing.values() if c.security.userns]
            base = hostids.free_base(config.id_base(), size, taken)
            if base is None:
                raise runtime.GuestError(f"no free range of {size} host ids is left")
            config.security.id_base = base
        if request.get("init"):
            config.init = configs.Command(request["init"])
        config.net = configs.NetConfig()
        if request.get("bridge"):
            config.net.bridge = str(request["bridge"])
        if request.get("addresses"):
            config.net.mode = "isolated"
            config.net.addresses = configs.guest_addresses(config.net, request["addresses"], path)
        # Validate the file we would write, with the others, before cloning anything.
        check = path.with_suffix(".check")
        configs.write(msgspec.structs.replace(config, path=check))
        try:
            config = msgspec.structs.replace(configs.parse(check), path=path)
            configs.check_networks({**existing, name: config})
            configs.check_id_ranges({**existing, name: config})
        finally:
            check.unlink(missing_ok=True)
        await trio.to_thread.run_sync(clone, template, root)
        configs.write(config)
        _event("created", guest=name, xid=config.xid, root=root, template=template)
        return {"xid": config.xid, "root": root, "config": str(path)}

    async def do_delete(self, request: dict[str, Any]) -> dict[str, Any]:
        config = self._config(request["name"])
        state = runstate.load(config.name)
        if state is not None and runstate.is_running(state):
            raise runtime.GuestError(f"guest {config.name} is running: stop it first")
        self._cancel_restart(config.name)
        if request.get("remove_root"):  # first: a tree in use is refused, the guest kept
            await trio.to_thread.run_sync(remove_tree, config.root)
        config.path.unlink()
        _event("deleted", guest=config.name, root_removed=bool(request.get("remove_root")))
        return {}

    # -- OCI containers (contextd.oci): their roots; the engine runs the rest ------

    async def do_oci_prepare(self, request: dict[str, Any]) -> dict[str, Any]:
        """Make and mount the cowfs root of a container being created (contextd-oci)."""
        async with self.image_lock:  # two containers of a new image: one copy of it
            record = await trio.to_thread.run_sync(oci_roots.prepare, self.runtime, request)
        _event("oci container prepared", guest=record.name, id=record.id, engine=record.engine)
        return {"root": record.mountpoint, "xid": record.xid}

    async def do_oci_started(self, request: dict[str, Any]) -> dict[str, Any]:
        await trio.to_thread.run_sync(
            oci_roots.started,
            self.runtime,
            request["name"],
            int(request["pid"]),
            int(request["pid_start"]),
        )
        return {}

    async def do_oci_release(self, request: dict[str, Any]) -> dict[str, Any]:
        """Unmount and remove a deleted container's root; nothing if it has none."""
        record = oci_roots.load(request["name"])
        if record is not None:
            await trio.to_thread.run_sync(oci_roots.release, record)
            _event("oci container released", guest=record.name, id=record.id)
        return {}


async def _guarded(task: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run a background task of the daemon; a bug in it is logged, not the daemon's end."""
    try:
        await task(*args)
    except Exception:
        log.exception("%s failed", getattr(task, "__name__", task))


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


async def _serve_client(daemon: Daemon, stream: Any) -> None:
    async with stream:
        if _peer_uid(stream.socket) != 0:  # type: ignore[arg-type]
            await stream.send_all(b'{"ok": false, "error": "contextd serves root only"}\n')
            return
        buffer = b""
        while b"\n" not in buffer:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buffer += chunk
        try:
            request = json.loads(buffer.split(b"\n", 1)[0])
            if not isinstance(request, dict):
                raise ValueError("not an object")
            answer = {"ok": True, **(await daemon.handle(request))}
        except (CowfsError, OSError, KeyError, ValueError, TimeoutError) as e:
            message = str(e) if not isinstance(e, KeyError) else f"missing {e}"
            answer = {"ok": False, "error": message}
            _event("request failed", request=buffer.decode(errors="replace").strip(), error=message)
        except Exception as e:  # a bug: said in one line, logged whole; the daemon goes on
            message = f"internal error ({type(e).__name__}: {e}); see the daemon's log"
            answer = {"ok": False, "error": message}
            log.exception("request failed: %s", buffer.decode(errors="replace").strip())
        await stream.send_all(json.dumps(answer).encode() + b"\n")


def adopt_or_clean(
    config_dir: Path, guests: runtime.Runtime
) -> list[tuple[configs.GuestConfig, runstate.RunState]]:
    """At start: keep running guests, clean up after those that died while we were away
    (theirs returned, for their restart policies)."""
    all_configs = configs.load_all(config_dir)
    ended = []
    for name in runstate.recorded():
        state = runstate.load(name)
        if state is None:
            continue
        if runstate.is_running(state):
            _event("adopted", guest=state.name, init_pid=state.init_pid)
            continue
        config = all_configs.get(state.name)
        if config is not None:
            try:
                guests.stop(config, timeout=0, asked=False)
                ended.append((config, state))
            except CowfsError as e:
                log.error("cleaning up %s: %s", state.name, e)
        else:
            Cgroup(state.name).kill_all()
            Cgroup(state.name).remove()
            runstate.drop(state.name)
        _event("cleaned up after a guest that died", guest=state.name)
    for name, config in all_configs.items():
        if runstate.load(name) is None and runtime.half_started(config):
            # A start cut short by our own death, before its run state was saved.
            try:
                guests.stop(config, timeout=0, asked=False)
            except CowfsError as e:
                log.error("cleaning up %s: %s", name, e)
            _event("cleaned up after a start that was cut short", guest=name)
    return ended


PR_SET_CHILD_SUBREAPER = 36


async def _reap_children() -> None:
    """Reap guests' inits and first FUSE servers that ended: the daemon is their
    subreaper while it runs.

    Only those: waitpid(-1) would take the exit status of the helpers
    that the verbs wait for themselves. Each is watched by a pidfd from the
    moment its run state is seen, so that one that ends with its guest (whose
    run state is gone by the next look) is reaped all the same.
    """
    watched: dict[int, int] = {}  # pid -> its pidfd
    while True:
        await trio.sleep(0.5)
        for name in runstate.recorded():
            state = runstate.load(name)
            if state is None:
                continue
            for pid in (state.init_pid, state.fuse_server_pid):  # (a dead server: resumed)
                if pid and pid not in watched:
                    with contextlib.suppress(OSError):
                        watched[pid] = os.pidfd_open(pid)
        for record in oci_roots.recorded():  # their inits are their engines' to reap
            if record.fuse_server_pid and record.fuse_server_pid not in watched:
                with contextlib.suppress(OSError):
                    watched[record.fuse_server_pid] = os.pidfd_open(record.fuse_server_pid)
        for pid, pidfd in list(watched.items()):
            if _reaped(pidfd):
                os.close(pidfd)
                del watched[pid]


def _reaped(pidfd: int) -> bool:
    """Reap the process if it is an ended child of ours; whether there is no more to do."""
    try:
        return os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is not None
    except ChildProcessError:  # not (yet) ours: someone else reaps it once it has ended
        return bool(select.select([pidfd], [], [], 0)[0])


async def serve(config_dir: Path, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until cancelled."""
    # Orphaned guest inits become our children (reaped at once) rather than the
    # host init's; if we die, they pass on to it and keep running.
    from native import syscalls

    syscalls.prctl(PR_SET_CHILD_SUBREAPER, 1)
    configs.load_all(config_dir)  # a bad file stops the daemon with its message
    guests = runtime.Runtime()
    ended = await trio.to_thread.run_sync(adopt_or_clean, config_dir, guests)
    async with trio.open_nursery() as nursery:
        daemon = Daemon(config_dir, guests, nursery)
        for config, gone in ended:
            daemon.apply_policy(config, runstate.load_exit(config.name) or {}, gone.restarts)
        for name in runstate.recorded():
            adopted = runstate.load(name)
            if adopted is not None:
                daemon.watch(adopted)
        for config in configs.load_all(config_dir).values():
            state = runstate.load(config.name)
            if config.autostart and (state is None or not runstate.is_running(state)):
                try:
                    await daemon.handle({"verb": "start", "name": config.name})
                except CowfsError as e:
                    log.error("autostart of %s failed: %s", config.name, e)
        run_dir()  # made root's alone
        path = socket_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await listener.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        listener.listen(64)
        _event("listening", socket=str(path), pid=os.getpid(), started=time.time())
        task_status.started()
        listeners = [trio.SocketListener(listener)]
        nursery.start_soon(_reap_children)
        # Ready before the first start asks for it (it imports for ~0.3 s).
        nursery.start_soon(trio.to_thread.run_sync, guests.helpers.start)
        await trio.serve_listeners(lambda stream: _serve_client(daemon, stream), listeners)
