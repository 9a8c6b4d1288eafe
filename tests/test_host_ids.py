"""A user-namespaced guest's host ids are nobody else's on the host.

A host user may become the ids /etc/subuid and /etc/subgid give it (newuidmap:
`unshare --map-users`, rootless podman) and is the id of its account. Were a
guest's range among them, that user's processes would be the guest's root as
the kernel sees it (signals, ptrace, /proc/PID/root). `contextd create` picks a
range no one has; `contextd start` refuses a guest whose range someone got
since (useradd hands out subordinate ranges by itself).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import have
from contextd_harness import Contextd, guest_status, left_behind, running_contextd

USER = "cowfs-idtest"
RANGE = 65536


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Contextd]:
    with running_contextd(tmp_path / "contextd") as daemon:
        yield daemon


@pytest.fixture
def host_user() -> Iterator[str]:
    """A host user of the test's own; /etc/subuid and /etc/subgid put back afterwards."""
    if not have("newuidmap"):
        pytest.skip("newuidmap is not installed (tools/install.sh installs uidmap)")
    kept = [*_SUBORDINATE, *(path.with_name(path.name + "-") for path in _SUBORDINATE)]
    saved = {path: path.read_bytes() if path.exists() else None for path in kept}
    subprocess.run(["userdel", USER], capture_output=True, check=False)  # a last run's
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True
    )
    try:
        yield USER
    finally:
        subprocess.run(["userdel", USER], check=True)
        for path, content in saved.items():
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(content)


_SUBORDINATE = (Path("/etc/subuid"), Path("/etc/subgid"))


def give(user: str, first: int, count: int) -> None:
    """Give user these subordinate uids and gids, as useradd or usermod --add-subuids do."""
    for path in _SUBORDINATE:
        with path.open("a") as f:
            f.write(f"{user}:{first}:{count}\n")


def recorded_id_base(ctx: Contextd, name: str) -> int:
    data = tomllib.loads((ctx.base / "etc" / f"{name}.toml").read_text())
    return int(data["security"]["id_base"])


def owner_of_a_file_made_as(user: str, host_id: int, directory: Path) -> int:
    """The host uid of a file user makes in its own user namespace, as the id its
    subordinate range maps to host_id (newuidmap checks that range is the user's)."""
    made = directory / "made"
    subprocess.run(
        ["runuser", "-u", user, "--", "unshare", f"--map-users={host_id},0,1",
         f"--map-groups={host_id},0,1", "--setuid", "0", "--setgid", "0", "--",
         "touch", str(made)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return made.stat().st_uid


def test_start_refuses_a_guest_whose_ids_a_host_user_got(
    ctx: Contextd, guest_tree: Path, host_user: str
) -> None:
    ctx("create", "g", "--from", str(guest_tree), "--xid", "300", "--userns")
    base = recorded_id_base(ctx, "g")
    give(host_user, base - 100, RANGE)  # given to the user after the guest was made
    # The precondition: the user can be the guest's root id on the host.
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:  # one the user can reach
        os.chmod(shared, 0o1777)
        assert owner_of_a_file_made_as(host_user, base, Path(shared)) == base
    started = ctx("start", "g", check=False)
    assert started.returncode == 1, started.stdout
    assert started.stderr == (
        f"contextd: error: guest g: its host ids {base}..{base + RANGE - 1} are not its own:"
        f" /etc/subuid gives {base - 100}..{base - 101 + RANGE} to {host_user} (and 1 more),"
        " whose processes could act as the guest's users; give the guest a free"
        " security.id_base or take those ids back\n"
    )
    assert guest_status(ctx, "g")["state"] == "stopped"
    assert left_behind("g", ctx) == []


def test_start_refuses_a_guest_whose_ids_include_a_host_account(
    ctx: Contextd, guest_tree: Path, host_user: str
) -> None:
    ctx("create", "g", "--from", str(guest_tree), "--xid", "301", "--userns")
    base = recorded_id_base(ctx, "g")
    subprocess.run(["usermod", "--uid", str(base + 1000), host_user], check=True)
    started = ctx("start", "g", check=False)
    assert started.returncode == 1
    assert f"host user {host_user} has id {base + 1000}, whose processes" in started.stderr
    assert left_behind("g", ctx) == []


def test_create_gives_a_guest_ids_no_host_user_has(
    ctx: Contextd, guest_tree: Path, host_user: str
) -> None:
    default = (302 + 16) * RANGE  # what the xid alone would give it
    give(host_user, default + 10, 3 * RANGE)  # into the next two ranges too
    ctx("create", "g", "--from", str(guest_tree), "--xid", "302", "--userns")
    base = recorded_id_base(ctx, "g")
    assert base == default + 4 * RANGE  # the first whole range past the user's
    ctx("start", "g")
    init = int(guest_status(ctx, "g")["init_pid"])
    status = Path(f"/proc/{init}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert {int(uid) for uid in uids} == {base}  # its root is the range's first id
    assert os.stat(f"/proc/{init}").st_uid == base
