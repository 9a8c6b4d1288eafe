"""The ``contextd`` command: the daemon (serve) and its client verbs."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
import click.shell_completion

from contextd import __version__
from contextd.client import request
from cowfs.errors import CowfsError
from cowfs.units import format_bytes


def _guest_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[click.shell_completion.CompletionItem]:
    """Tab completion of guest names: the configuration files' (no daemon asked)."""
    from contextd.config import config_dir

    try:
        names = sorted(p.stem for p in config_dir().glob("*.toml"))
    except OSError:
        return []
    return [click.shell_completion.CompletionItem(n) for n in names if n.startswith(incomplete)]


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (CowfsError, OSError) as e:  # one line, never a traceback
            message = f"contextd: error: {e}"
            if sys.stderr.isatty():  # it may quote a guest's file names or console
                from contextd.relay import TerminalFilter

                shown = TerminalFilter()
                message = (shown.feed(message.encode()) + shown.flush()).decode(errors="replace")
            click.echo(message, err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="contextd")
def main() -> None:
    """contextd: boot, stop, enter and account guests in isolated contexts.

    Linux-VServer's vserver and vserver-stat on namespaces, cgroups and
    capabilities; each guest runs on its cowfs root. The verbs talk to the
    daemon (contextd serve) over /run/contextd/contextd.sock, as root.
    """


@main.command()
@click.option(
    "--config-dir",
    type=click.Path(path_type=Path),
    help="Guest configurations (default /etc/contextd).",
)
@click.option(
    "--log", "log_file", type=click.Path(path_type=Path), help="Log file (default: stderr)."
)
@click.option(
    "--metrics",
    metavar="[ADDRESS:]PORT",
    help="Serve every guest's metrics in the Prometheus text format at"
    " http://ADDRESS:PORT/metrics (a bare port: loopback only). Off by default.",
)
def serve(config_dir: Path | None, log_file: Path | None, metrics: str | None) -> None:
    """Run the daemon: the control socket, autostart, adoption of running guests."""
    if os.geteuid() != 0:  # it mounts, makes namespaces and cgroups, and serves root only
        raise CowfsError("contextd serve must run as root")
    # Imported here, not at the top: the client's commands start faster without them.
    import logging

    import trio

    from contextd.config import config_dir as default_config_dir
    from contextd.server import JsonFormatter
    from contextd.server import serve as run_server

    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    )
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    directory = config_dir or default_config_dir()
    exporter = None
    if metrics is not None:
        from contextd import metrics as guest_metrics

        exporter = guest_metrics.serve(directory, metrics)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_server, directory)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    logging.getLogger("contextd").info("stopping (guests keep running)")
                    nursery.cancel_scope.cancel()
                    return

    try:
        trio.run(run)
    finally:
        if exporter is not None:
            exporter.shutdown()


@main.command()
@click.argument("name")
@click.option(
    "--from", "template", required=True, type=click.Path(), help="Template tree to clone."
)
@click.option(
    "--xid", type=click.IntRange(2, 65535), help="Context id (default: the next free one)."
)
@click.option(
    "--root", type=click.Path(), help="Backing tree (default /var/lib/cowfs/guests/NAME)."
)
@click.option(
    "--init", help="Init command instead of the guest's /sbin/init (a shell command line)."
)
@click.option(
    "--address",
    "addresses",
    multiple=True,
    metavar="IP",
    help="An address of the guest's own (repeatable): gives it an isolated network"
    " on the bridge (default ctx0: 10.77.0.1/24, fd00:77::1/64).",
)
@click.option("--bridge", help="The host bridge for --address (default ctx0).")
@click.option(
    "--userns/--privileged",
    default=True,
    show_default=True,
    help="A user namespace of its own, whose root is an unprivileged host id (its 65536"
    " ids are host ids (xid+16)*65536.., or the next range no host user holds), or"
    " Linux-VServer's way: guest root is host root"
    " with fewer capabilities (less isolated: see docs/contextd.md, SECURITY MODEL).",
)
def create(
    name: str,
    template: str,
    xid: int | None,
    root: str | None,
    init: str | None,
    addresses: tuple[str, ...],
    bridge: str | None,
    userns: bool,
) -> None:
    """Create guest NAME: a cowfs clone of TEMPLATE and its configuration file.

    Without --address the guest shares the host's network (Linux-VServer's
    plain mode); edit [net] in its file for other bridge subnets.
    """
    import os
    import shlex

    answer = request(
        "create",
        name=name,
        template=os.path.abspath(template),
        xid=xid,
        root=os.path.abspath(root) if root else None,
        init=shlex.split(init) if init else None,
        addresses=list(addresses),
        bridge=bridge,
        userns=userns,
    )
    click.echo(
        f"created {name}: xid {answer['xid']}, root {answer['root']}, config {answer['config']}"
    )


@main.command()
@click.argument("name", shell_complete=_guest_names)
def start(name: str) -> None:
    """Boot guest NAME."""
    answer = request("start", name=name)
    click.echo(f"started {name} (init pid {answer['init_pid']})")


@main.command()
@click.argument("name", shell_complete=_guest_names)
@click.option(
    "--timeout", type=click.FloatRange(min=0), help="Seconds before SIGKILL (default: the guest's)."
)
def stop(name: str, timeout: float | None) -> None:
    """Stop guest NAME: its stop signal, then SIGKILL to everything left."""
    request("stop", name=name, timeout=timeout)
    click.echo(f"stopped {name}")


@main.command()
@click.argument("name", shell_complete=_guest_names)
@click.option("--timeout", type=click.FloatRange(min=0), help="Seconds before SIGKILL.")
def restart(name: str, timeout: float | None) -> None:
    """Stop (if running) and start guest NAME."""
    answer = request("restart", name=name, timeout=timeout)
    click.echo(f"restarted {name} (init pid {answer['init_pid']})")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))


@main.command()
@click.argument("name", shell_complete=_guest_names, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status(name: str | None, as_json: bool) -> None:
    """vserver-stat: xid, state, init pid, processes, memory, CPU, uptime, disk, limit hits."""
    guests = [request("status", name=name)["status"]] if name else request("list")["guests"]
    if as_json:
        click.echo(json.dumps(guests if not name else guests[0]))
        return
    click.echo(
        f"{'NAME':14} {'XID':>5} {'STATE':10} {'INIT':>7} {'PROCS':>5} {'RSS':>9} {'USER':>8}"
        f" {'SYS':>8} {'UPTIME':>11} {'DISK':>9} HITS"
    )
    for g in guests:
        hits = ",".join(f"{k}:{v}" for k, v in g["limit_hits"].items()) or "-"
        click.echo(
            f"{g['name']:14} {g['xid']:>5} {g['state']:10} {g['init_pid'] or '-':>7}"
            f" {g['processes']:>5}"
            f" {format_bytes(g['memory_bytes']) if g['memory_bytes'] is not None else '-':>9}"
            f" {_secs(g['cpu_user_seconds']):>8} {_secs(g['cpu_system_seconds']):>8}"
            f" {_duration(g['uptime_seconds']):>11}"
            f" {format_bytes(g['disk_bytes']) if g['disk_bytes'] is not None else '-':>9} {hits}"
        )
    for g in guests:
        if g.get("engine"):
            click.echo(f"{g['name']}: OCI container {g['container_id']} of {g['engine']},"
                       f" bundle {g['bundle']}")  # fmt: skip
    for g in guests:
        if g["net_mode"] == "isolated":
            click.echo(f"{g['name']}: {_network(g)}")
    for g in guests:
        if g.get("last_end") and g["state"] != "running":
            click.echo(f"{g['name']}: {g['last_end']}")
        if g.get("root_server_replacements"):
            click.echo(
                f"{g['name']}: its root's cowfs server died and was replaced"
                f" {g['root_server_replacements']} times"
            )
        if g.get("restarts"):
            click.echo(f"{g['name']}: restarted {g['restarts']} times by its restart policy lately")


def _network(g: dict[str, Any]) -> str:
    line = f"bridge {g['bridge']}, " + (" ".join(g["addresses"]) or "loopback only")
    traffic = g["traffic"]
    if traffic:
        line += (
            f"; received {format_bytes(traffic['rx_bytes'])} ({traffic['rx_packets']} packets),"
            f" sent {format_bytes(traffic['tx_bytes'])} ({traffic['tx_packets']} packets)"
        )
    return line


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


@main.command("list")
def list_command() -> None:
    """Guest names and states."""
    for g in request("list")["guests"]:
        oci = f" (OCI container of {g['engine']}: {g['container_id']})" if g.get("engine") else ""
        click.echo(f"{g['name']} {g['state']}{oci}")


def _target(name: str) -> Any:
    from contextd.attach import Target

    answer = request("attach", name=name)
    return Target(
        name=name,
        init_pid=answer["init_pid"],
        init_start=answer["init_start"],
        capabilities=answer["capabilities"],
        environment=answer["environment"],
        cgroup_dirs=answer["cgroup_dirs"],
        userns=bool(answer.get("userns")),
    )


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("name", shell_complete=_guest_names)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec(name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in guest NAME (contextd exec NAME -- CMD ARGS); its exit code is ours.

    From a terminal the command gets a pty of the guest's own; otherwise pipes,
    and what it prints to a terminal has its control characters shown, not
    obeyed. It never gets our terminal, fds, session or keyring.
    """
    from contextd import attach

    target = _target(name)
    sys.stdout.flush()
    sys.exit(attach.run(target, list(command), use_pty=attach.stdin_is_terminal()))


@main.command()
@click.argument("name", shell_complete=_guest_names)
@click.option("--shell", default="/bin/sh", show_default=True, help="Shell to run.")
def enter(name: str, shell: str) -> None:
    """An interactive shell in guest NAME, on a fresh pty of its own, in a new session."""
    from contextd import attach

    sys.exit(attach.run(_target(name), [shell, "-l"], use_pty=True))


@main.command()
@click.argument("name", shell_complete=_guest_names)
@click.option("-n", "--lines", type=int, default=0, help="Only the last N lines.")
@click.option(
    "--raw",
    is_flag=True,
    help="Print the log's bytes as they are, also to a terminal (by default line ends"
    " are plain newlines and a terminal gets control characters shown as ^X, colours"
    " excepted).",
)
def logs(name: str, lines: int, raw: bool) -> None:
    """The guest's console: init's output."""
    import os

    from contextd.relay import TerminalFilter

    path = Path(request("status", name=name)["console_log"])
    if not path.exists():
        raise CowfsError(f"guest {name} has no console log yet")
    data = path.read_bytes()
    if not raw:  # the console is a pty: its lines end in CR LF
        data = data.replace(b"\r\n", b"\n")
    if lines:
        data = b"".join(data.splitlines(keepends=True)[-lines:])
    if not raw and os.isatty(1):
        terminal = TerminalFilter()
        data = terminal.feed(data) + terminal.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


@main.command()
@click.argument("name", shell_complete=_guest_names)
@click.option(
    "--remove-root",
    is_flag=True,
    help="Also delete the guest's backing tree (refused while the tree is in use, and when"
    " the configured root is itself a symlink: it may name a template or another guest).",
)
def delete(name: str, remove_root: bool) -> None:
    """Delete stopped guest NAME's configuration (and with --remove-root its tree)."""
    request("delete", name=name, remove_root=remove_root)
    click.echo(f"deleted {name}")
