"""Restart policies: what contextd.restarts.decide says for each way a guest ends."""

from __future__ import annotations

from pathlib import Path

import pytest

from contextd.config import GuestConfig, parse
from contextd.restarts import MAX_DELAY, decide

Record = dict[str, object]

CRASH: Record = {"exit_status": 1, "signal": None, "asked": None}
CLEAN: Record = {"exit_status": 0, "signal": None, "asked": None}
KILLED: Record = {"exit_status": None, "signal": 9, "asked": None}
LOST_ROOT: Record = {
    "exit_status": None,
    "signal": 9,
    "asked": None,
    "failure": "its cowfs server...",
}
HALT: Record = {"exit_status": None, "signal": 2, "asked": "halt"}
REBOOT: Record = {"exit_status": None, "signal": 1, "asked": "reboot"}
STOPPED: Record = {"exit_status": None, "signal": 15, "asked": None, "stopped": True}


def _config(tmp_path: Path, policy: str, **more: object) -> GuestConfig:
    extra = "".join(f"{k} = {v}\n" for k, v in more.items())
    path = tmp_path / "g.toml"
    path.write_text(f'xid = 7\nroot = "/srv/g"\nrestart = "{policy}"\n{extra}')
    return parse(path)


@pytest.mark.parametrize(
    ("policy", "record", "restart"),
    [
        ("no", CRASH, False),
        ("no", LOST_ROOT, False),
        ("no", REBOOT, True),  # asked for inside: always honoured
        ("on-failure", CRASH, True),
        ("on-failure", KILLED, True),
        ("on-failure", LOST_ROOT, True),
        ("on-failure", CLEAN, False),
        ("on-failure", HALT, False),
        ("on-failure", STOPPED, False),
        ("always", CLEAN, True),
        ("always", CRASH, True),
        ("always", HALT, False),  # the guest asked to stay down
    ],
)
def test_each_policy_for_each_end(
    tmp_path: Path, policy: str, record: Record, restart: bool
) -> None:
    assert decide(_config(tmp_path, policy), record, [], 1000.0).restart is restart


def test_a_failure_left_as_is_says_why(tmp_path: Path) -> None:
    decision = decide(_config(tmp_path, "no"), CRASH, [], 1000.0)
    assert decision.why == "restart policy is 'no'"
    assert decide(_config(tmp_path, "on-failure"), CLEAN, [], 1000.0).why == ""


def test_delays_double_within_the_interval_up_to_the_limit(tmp_path: Path) -> None:
    config = _config(tmp_path, "on-failure", restart_delay=2, restart_limit=3, restart_interval=60)
    now = 1000.0
    delays = [decide(config, CRASH, [now - 1] * n, now).delay for n in range(3)]
    assert delays == [2.0, 4.0, 8.0]
    over = decide(config, CRASH, [now - 3, now - 2, now - 1], now)
    assert not over.restart
    assert over.why == "restart limit reached: 3 automatic restarts within 60 s"
    # restarts older than the interval no longer count
    assert decide(config, CRASH, [now - 61] * 3, now).delay == 2.0


def test_the_delay_has_a_ceiling(tmp_path: Path) -> None:
    config = _config(tmp_path, "always", restart_delay=30, restart_limit=10)
    assert decide(config, CRASH, [999.0] * 5, 1000.0).delay == MAX_DELAY


def test_a_reboot_is_not_counted_against_the_limit(tmp_path: Path) -> None:
    decision = decide(_config(tmp_path, "no"), REBOOT, [999.0] * 10, 1000.0)
    assert decision.restart and not decision.counted and decision.delay == 0
