"""Restart policies: whether contextd starts a guest again by itself once it has ended.

As systemd's Restart= and Incus's boot.autorestart: "no" never, "on-failure"
after a fault (init killed or exiting non-zero, the guest's root lost with its
FUSE server, init killed for memory), "always" after any end but a halt the
guest asked for. A reboot the guest asked for is always honoured at once and
not counted. Automatic restarts wait restart_delay seconds, doubled for each
restart within restart_interval (at most MAX_DELAY), and stop at restart_limit
restarts within restart_interval: the guest is then left failed, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from contextd.config import GuestConfig
from contextd.runstate import is_failure

MAX_DELAY = 60.0


@dataclass(frozen=True)
class Decision:
    """What to do after a guest ended."""

    restart: bool
    delay: float = 0.0  # seconds to wait first
    counted: bool = True  # counts against restart_limit (a reboot does not)
    why: str = ""  # why not, when it is a failure left as is


def decide(
    config: GuestConfig, record: dict[str, object], recent: list[float], now: float
) -> Decision:
    """The decision for a guest that ended as record says, restarted at the times in
    recent (by its policy)."""
    asked = record.get("asked")
    if asked == "reboot" and not record.get("failure"):
        return Decision(restart=True, counted=False)
    if asked == "halt" and not record.get("failure"):
        return Decision(restart=False)
    failed = is_failure(record)
    if config.restart == "no" or (config.restart == "on-failure" and not failed):
        return Decision(restart=False, why="restart policy is 'no'" if failed else "")
    within = within_interval(config, recent, now)
    if len(within) >= config.restart_limit:
        return Decision(
            restart=False,
            why=f"restart limit reached: {len(within)} automatic restarts within"
            f" {config.restart_interval:g} s",
        )
    return Decision(restart=True, delay=min(MAX_DELAY, config.restart_delay * 2 ** len(within)))


def within_interval(config: GuestConfig, recent: list[float], now: float) -> list[float]:
    """The restart times that count against the limit now."""
    return [t for t in recent if now - t < config.restart_interval]
