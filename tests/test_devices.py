"""The guest's device list on cgroup v2: the BPF device program, on this host's cgroup2 mount.

(On cgroup v1 hosts the guests' own tests check the v1 list: test_guest_attacks.)
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from contextd import devices


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    return None


@pytest.fixture
def device_cgroup() -> Iterator[Path]:
    """A cgroup v2 directory of the test's own with the guests' device program attached."""
    mount = _cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 hierarchy is mounted on this host")
    directory = mount / f"contextd-test-devices-{os.getpid()}"
    directory.mkdir()
    try:
        devices.attach_v2(str(directory))
        yield directory
    finally:
        directory.rmdir()


def _inside(cgroup: Path, script: str) -> str:
    """What a shell moved into cgroup before it runs prints."""
    result = subprocess.run(
        ["/bin/sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && {script}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.stdout + result.stderr


def test_the_device_program_allows_the_guests_devices_only(
    device_cgroup: Path, tmp_path: Path, host_disk: tuple[Path, int, int]
) -> None:
    disk, major, minor = host_disk
    read_disk = f"head -c 512 {disk} | wc -c"
    # Control: outside, root reads the host's disk and makes any node.
    assert (
        subprocess.run(["/bin/sh", "-c", read_disk], capture_output=True, text=True).stdout
        == "512\n"
    )
    inside = _inside(device_cgroup, f"{read_disk}; head -c 3 /dev/zero | wc -c")
    assert "Operation not permitted" in inside and inside.startswith("0\n3\n"), inside
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    made = _inside(
        device_cgroup,
        f"mknod {nodes}/null c 1 3 && echo null-made;"
        f" mknod {nodes}/mem c 1 1 || echo mem-refused;"
        f" mknod {nodes}/disk b {major} {minor} || echo disk-refused;"
        f" mknod {nodes}/pty c 136 9 && echo pty-made",
    )
    assert "null-made" in made and "pty-made" in made, made
    assert "mem-refused" in made and "disk-refused" in made, made
    assert sorted(p.name for p in nodes.iterdir()) == ["null", "pty"]


def test_the_v1_rules_are_the_same_list() -> None:
    assert devices.v1_rules() == [
        "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",
        "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm",
    ]  # fmt: skip
