"""What a hashify run is asked to do, and what it found and did."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cowfs.unify.excludes import Rules


@dataclass
class HashifyOptions:
    """What hashify unifies and how."""

    store: Path
    dry_run: bool = False
    ignore_mtime: bool = False
    min_size: int = 16
    rules: Rules = field(default_factory=lambda: Rules.build([], []))
    allow_reachable: bool = False  # guests or a store host users can reach (barrier.py): dangerous


@dataclass
class HashifyReport:
    """What a run found and did (or, dry, would do)."""

    guests: int = 0
    files_scanned: int = 0
    bytes_scanned: int = 0
    already_unified: int = 0
    candidates: int = 0
    files_hashed: int = 0
    bytes_hashed: int = 0
    unified_files: int = 0
    new_store_entries: int = 0
    bytes_saved: int = 0
    skipped_changed: int = 0
    errors: list[str] = field(default_factory=list)
    store_entries: int = 0
    store_bytes: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    actions: list[tuple[str, str]] = field(default_factory=list)  # (guest path, store entry)

    def as_dict(self) -> dict[str, object]:
        """The figures, for --json."""
        data = dict(self.__dict__)
        data["actions"] = [{"path": p, "entry": e} for p, e in self.actions]
        return data


# Called with the phase ("scanning", "hashing", "linking") and the report so far.
Progress = Callable[[str, HashifyReport], None]
