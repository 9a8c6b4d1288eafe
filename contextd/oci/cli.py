"""``contextd-oci``: runc's command line, for engines (podman, containerd, CRI-O) to call.

Register it as a runtime (docs/contextd-oci.md); every container then runs on
a cowfs clone of its image, in a context made as contextd makes a guest's.
The contextd daemon must be running (create and delete ask it for the root).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from contextd import __version__
from contextd.oci import container, spec
from contextd.oci.state import DEFAULT_ROOT, ContainerError, StateStore
from cowfs.errors import CowfsError


class _Runtime(click.Group):
    """Errors as one line on stderr and, with --log-format json, as the engines read them
    from --log: the last {"level": "error", "msg": ...} line."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (ContainerError, spec.SpecError, CowfsError, OSError) as e:
            message = str(e)
            options = ctx.obj or {}
            log = options.get("log")
            if log:
                entry: dict[str, Any] = {"level": "error", "msg": message, "time": _now()}
                line = json.dumps(entry) if options.get("log_format") == "json" else message
                try:
                    with open(log, "a") as f:
                        f.write(line + "\n")
                except OSError:
                    pass
            click.echo(f"contextd-oci: {message}", err=True)
            sys.exit(1)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _store(ctx: click.Context) -> StateStore:
    return StateStore(Path(ctx.obj["root"]))


@click.group(cls=_Runtime, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="contextd-oci")
@click.option("--root", default=str(DEFAULT_ROOT), show_default=True,
              help="Directory of the containers' state.")  # fmt: skip
@click.option("--log", type=click.Path(dir_okay=False), help="Append errors to this file.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="How --log is written (json: as runc).")  # fmt: skip
@click.option("--systemd-cgroup", is_flag=True,
              help="Refused: contextd keeps containers in its own cgroups (cgroupfs).")  # fmt: skip
@click.option("--debug", is_flag=True, hidden=True)
@click.pass_context
def main(
    ctx: click.Context, root: str, log: str | None, log_format: str, systemd_cgroup: bool,
    debug: bool,
) -> None:  # fmt: skip
    """contextd-oci: an OCI runtime whose containers run on cowfs roots.

    podman (conmon), containerd (containerd-shim-runc-v2) and CRI-O call it as
    they call runc. Each container's root is a copy-on-write clone of its
    image, served by cowfs and kept by the contextd daemon, which must be
    running; its process runs in new PID, mount, UTS, IPC and cgroup
    namespaces under contextd's seccomp filter and the spec's capabilities.
    """
    ctx.obj = {"root": root, "log": log, "log_format": log_format}
    # A host user would otherwise hear of a container they may not see that it does
    # not exist; `features` and `spec` only print.
    if os.geteuid() != 0 and ctx.invoked_subcommand not in ("features", "spec"):
        raise ContainerError("contextd-oci runs containers as root only: run it as root")
    if systemd_cgroup:
        raise ContainerError("--systemd-cgroup is not supported: use the cgroupfs manager")


@main.command()
@click.option("-b", "--bundle", default=".", type=click.Path(file_okay=False),
              help="The bundle: config.json and (usually) the root.")  # fmt: skip
@click.option("--pid-file", type=click.Path(dir_okay=False), help="Write the init's pid here.")
@click.option("--console-socket", help="Send the pty's master to this AF_UNIX socket.")
@click.option("--no-pivot", is_flag=True, help="Accepted; contextd always pivots.")
@click.option("--no-new-keyring", is_flag=True, help="Accepted; each container gets its own.")
@click.option("--preserve-fds", type=int, default=0, help="Refused unless 0.")
@click.argument("container_id")
@click.pass_context
def create(
    ctx: click.Context, bundle: str, pid_file: str | None, console_socket: str | None,
    no_pivot: bool, no_new_keyring: bool, preserve_fds: int, container_id: str,
) -> None:  # fmt: skip
    """Set a container up from its bundle; its process waits for `start`."""
    if preserve_fds:
        raise ContainerError("--preserve-fds is not supported")
    container.create(
        _store(ctx), container_id, Path(bundle), Path(pid_file) if pid_file else None,
        console_socket,
    )  # fmt: skip


@main.command()
@click.argument("container_id")
@click.pass_context
def start(ctx: click.Context, container_id: str) -> None:
    """Let a created container's process run."""
    container.start(_store(ctx), container_id)


@main.command()
@click.argument("container_id")
@click.pass_context
def state(ctx: click.Context, container_id: str) -> None:
    """The container's state, as the OCI specification's JSON."""
    click.echo(json.dumps(container.oci_state(_store(ctx), container_id), indent=2))


@main.command()
@click.option("-a", "--all", "every_process", is_flag=True, help="Every process of the container.")
@click.argument("container_id")
@click.argument("signal", default="SIGTERM")
@click.pass_context
def kill(ctx: click.Context, every_process: bool, container_id: str, signal: str) -> None:
    """Send a signal (number or name; SIGTERM by default) to the container's init."""
    container.kill(_store(ctx), container_id, container.parse_signal(signal), every_process)


@main.command()
@click.option("-f", "--force", is_flag=True, help="Kill it if running; no error if unknown.")
@click.argument("container_id")
@click.pass_context
def delete(ctx: click.Context, force: bool, container_id: str) -> None:
    """Remove a stopped container: its cowfs root and tree, its cgroup, its state."""
    container.delete(_store(ctx), container_id, force)


@main.command(name="exec", context_settings={"allow_interspersed_args": False})
@click.option("-p", "--process", "process_file", type=click.Path(dir_okay=False),
              help="process.json: what to run.")  # fmt: skip
@click.option("-d", "--detach", is_flag=True, help="Leave the process running; exit at once.")
@click.option("--pid-file", type=click.Path(dir_okay=False), help="Write its pid here.")
@click.option("-t", "--tty", is_flag=True, help="Give it a pty (with --console-socket).")
@click.option("--console-socket", help="Send the pty's master to this AF_UNIX socket.")
@click.argument("container_id")
@click.argument("command", nargs=-1)
@click.pass_context
def exec_(
    ctx: click.Context, process_file: str | None, detach: bool, pid_file: str | None,
    tty: bool, console_socket: str | None, container_id: str, command: tuple[str, ...],
) -> None:  # fmt: skip
    """Run a process in a running container (process.json, or a command)."""
    if process_file is not None:
        process = spec.load_process(Path(process_file))
    elif command:
        process = spec.Process(args=list(command), env=[f"PATH={spec.PATH}"], terminal=tty)
    else:
        raise ContainerError("exec: give --process or a command")
    code = container.exec_process(
        _store(ctx), container_id, process, Path(pid_file) if pid_file else None, detach,
        console_socket,
    )  # fmt: skip
    sys.exit(code)


@main.command()
@click.option("-f", "--format", "output", type=click.Choice(["table", "json"]), default="table")
@click.argument("container_id")
@click.argument("ps_args", nargs=-1)
@click.pass_context
def ps(ctx: click.Context, output: str, container_id: str, ps_args: tuple[str, ...]) -> None:
    """The container's processes (host pids)."""
    pids = container.ps(_store(ctx), container_id)
    if output == "json":
        click.echo(json.dumps(pids))
        return
    click.echo("PID")
    for pid in pids:
        click.echo(str(pid))


@main.command()
def features() -> None:
    """What this runtime supports, as JSON (runc features)."""
    click.echo(json.dumps(container.features(), indent=2))


@main.command(name="spec")
@click.option("-b", "--bundle", default=".", type=click.Path(file_okay=False))
def spec_(bundle: str) -> None:
    """Write a minimal config.json into the bundle (refused if one is there)."""
    path = Path(bundle) / "config.json"
    if path.exists():
        raise ContainerError(f"{path} exists already")
    path.write_text(spec.default_spec() + "\n")
