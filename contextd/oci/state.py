"""What the runtime keeps of a container: ``ROOT/ID/state.json`` and ``ROOT/ID/exec.fifo``.

ROOT is runc's ``--root`` (/run/contextd-oci unless the engine says otherwise:
containerd passes /run/containerd/runc/NAMESPACE), root's alone. The fifo
exists from create until start: the container's init waits to open it for
writing, start opens it for reading and removes it (runc's scheme). A
container is `created` while its init lives and the fifo is there, `running`
while its init lives after that, `stopped` once its init has ended (a zombie
its engine has not reaped yet has) or its pid is another process's.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from contextd import procfs
from cowfs.atomicfile import write_atomically

DEFAULT_ROOT = Path("/run/contextd-oci")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


class ContainerError(Exception):
    """A verb that cannot be done; one line, with runc's words where engines match them
    ("does not exist", "not running")."""


def check_id(container_id: str) -> str:
    """The id, if it may name a directory; else ContainerError."""
    if not _ID.fullmatch(container_id):
        raise ContainerError(f"invalid container id {container_id!r}")
    return container_id


def guest_name(container_id: str) -> str:
    """The name contextd knows the container by (its cgroup, root, `contextd list`)."""
    return "oci-" + re.sub(r"[^a-z0-9-]", "-", container_id.lower())[:12]


@dataclass
class ContainerState:
    """A container as its state.json records it."""

    id: str
    bundle: str
    rootfs: str  # its cowfs root's mount point
    name: str  # contextd's name of it (guest_name)
    pid: int = 0
    pid_start: int = 0
    created: float = field(default_factory=time.time)
    annotations: dict[str, str] = field(default_factory=dict)

    def status(self, directory: Path) -> str:
        """created, running or stopped (see the module docstring)."""
        if not procfs.is_running(self.pid, self.pid_start):
            return "stopped"
        return "created" if (directory / "exec.fifo").exists() else "running"

    def as_oci(self, directory: Path) -> dict[str, object]:
        """The specification's state, with runc's extra fields."""
        status = self.status(directory)
        return {
            "ociVersion": "1.0.2",
            "id": self.id,
            "pid": self.pid if status != "stopped" else 0,
            "status": status,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "annotations": self.annotations,
            "owner": "",
        }


class StateStore:
    """The containers under one --root."""

    def __init__(self, root: Path):
        self.root = root

    def directory(self, container_id: str) -> Path:
        return self.root / check_id(container_id)

    def make(self, state: ContainerState) -> Path:
        """A new container's directory, with its state; ContainerError if the id is taken."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory = self.directory(state.id)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            raise ContainerError(f"container {state.id} exists already") from None
        self.save(state)
        return directory

    def save(self, state: ContainerState) -> None:
        write_atomically(self.directory(state.id) / "state.json", json.dumps(asdict(state)))

    def load(self, container_id: str) -> ContainerState:
        """The container's state; ContainerError "does not exist" if there is none."""
        path = self.directory(container_id) / "state.json"
        try:
            return ContainerState(**json.loads(path.read_text()))
        except (FileNotFoundError, NotADirectoryError):
            raise ContainerError(f"container {container_id} does not exist") from None
        except (ValueError, TypeError) as e:
            raise ContainerError(f"container {container_id}: bad state file {path}: {e}") from None

    def remove(self, container_id: str) -> None:
        shutil.rmtree(self.directory(container_id))
