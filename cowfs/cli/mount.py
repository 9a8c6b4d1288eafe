"""``cowfs mount`` and ``cowfs umount``."""

from __future__ import annotations

import os

import click

from cowfs.cli.options import allow_reachable_option
from cowfs.host.guests import resolve
from cowfs.serve.idmap import SAME_IDS, parse_id_map
from cowfs.serve.mount import MountOptions, mount, unmount


@click.command("mount")
@click.argument("backing", type=click.Path(file_okay=True, dir_okay=True))
@click.argument("mountpoint", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--xid", type=click.IntRange(min=1), help="Context id of the guest (for accounting).")
@click.option("-f", "--foreground", is_flag=True, help="Serve in this process until unmounted.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), help="Log file of the daemon.")
@click.option(
    "--cache-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds the kernel may cache names and attributes.",
)
@click.option("--dev", "allow_devices", is_flag=True, help="Allow device nodes to be opened.")
@click.option(
    "--max-node-fds",
    type=click.IntRange(min=16),
    help="Inodes to keep open (default 16384, at most 3/4 of the fd limit); others reopen "
    "by file handle.",
)
@click.option(
    "--sync-breaks/--no-sync-breaks",
    default=True,
    show_default=True,
    help="Make a private copy's data durable before it replaces a shared file (power-cut "
    "safety): written before the rename where the journal orders them, else fdatasync.",
)
@click.option(
    "--io-uring/--no-io-uring",
    default=True,
    show_default=True,
    help="Have the kernel do reads that miss the page cache and writes that may wait"
    " (io_uring) rather than threads.",
)
@click.option(
    "--passthrough/--no-passthrough",
    default=True,
    show_default=True,
    help="Have the kernel serve read-only opens of shared files from the shared inode"
    " (FUSE passthrough, Linux 6.9+): guests sharing a file share its page cache. While"
    " such an open lasts, changing the file's data fails with ETXTBSY.",
)
@click.option(
    "--id-map",
    "id_map_text",
    metavar="HOST_BASE:COUNT",
    help="The guest runs in a user namespace whose ids 0..COUNT-1 are host ids HOST_BASE..:"
    " show the tree's ids shifted so, and shift the guest's back (owners, chown, file"
    " capabilities, ACLs). The tree keeps the guest's own ids (0 is its root).",
)
@click.option("--debug", is_flag=True, help="Log every link break and more.")
@allow_reachable_option
def mount_command(
    backing: str,
    mountpoint: str,
    xid: int | None,
    foreground: bool,
    log_file: str | None,
    cache_timeout: float,
    allow_devices: bool,
    max_node_fds: int | None,
    sync_breaks: bool,
    io_uring: bool,
    passthrough: bool,
    id_map_text: str | None,
    debug: bool,
    allow_reachable: bool,
) -> None:
    """Serve the guest tree BACKING (a path, or a guest name) at MOUNTPOINT.

    Every operation passes through to BACKING, except that a file carrying the
    COW mark (a hard link shared with a template, other guests or the content
    store) is never modified in place: the first write, truncate, chmod,
    chown, utime or xattr change gives the guest a private copy.

    Returns once the mount is ready; the FUSE process keeps running in the
    background and logs to --log (default /var/log/cowfs/mount-*.log).
    Mounted with allow_other and default_permissions: the kernel checks
    permissions for every uid of the guest. Must run as root.

    Refused if host users other than root could reach BACKING or MOUNTPOINT
    (keep both inside a directory of mode 0700): they could run the guest's
    setuid files as root and read or write its users' files.
    """
    try:
        id_map = SAME_IDS if id_map_text is None else parse_id_map(id_map_text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--id-map") from None
    options = MountOptions(
        xid=xid,
        cache_timeout=cache_timeout,
        allow_devices=allow_devices,
        debug=debug,
        max_node_fds=max_node_fds,
        sync_breaks=sync_breaks,
        io_uring=io_uring,
        passthrough=passthrough,
        allow_reachable=allow_reachable,
        id_map=id_map,
    )
    if "/" not in backing and not os.path.exists(backing):
        backing = resolve(backing).path  # a guest name under /var/lib/cowfs/guests
    pid = mount(backing, mountpoint, options, foreground=foreground, log_file=log_file)
    if pid is not None:
        click.echo(f"mounted {backing} at {mountpoint} (pid {pid})")


@click.command("umount")
@click.argument("mountpoint", type=click.Path())
@click.option("-l", "--lazy", is_flag=True, help="Detach now even if busy; finish when unused.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the FUSE process to finish.",
)
def umount_command(mountpoint: str, lazy: bool, timeout: float) -> None:
    """Unmount the cowfs mount at MOUNTPOINT and wait for its process to finish."""
    unmount(mountpoint, lazy=lazy, timeout=timeout)
