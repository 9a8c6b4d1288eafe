"""The state database (sqlite, WAL): guests, their usage, limits, quotas and limit hits.

One file (``/var/lib/cowfs/state.db``) shared by the admin commands and the
FUSE processes, with a schema version (SCHEMA_VERSION): an older database is
migrated when first opened, a newer one refused. A mount keeps its usage
counters in memory, writes them back every few seconds and at unmount, and
marks them ``stale`` while it runs: a mount that finds them stale (its
predecessor died) recomputes them by a scan.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cowfs.errors import CowfsError
from cowfs.host.barrier import create_private_file, make_private_dirs
from cowfs.host.paths import state_root

SCHEMA = """
CREATE TABLE guests (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,
    name TEXT NOT NULL
);
CREATE TABLE usage (
    guest_id INTEGER PRIMARY KEY REFERENCES guests(id) ON DELETE CASCADE,
    bytes INTEGER NOT NULL,
    inodes INTEGER NOT NULL,
    shared_bytes INTEGER NOT NULL,
    shared_inodes INTEGER NOT NULL,
    stale INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE owner_usage (
    guest_id INTEGER NOT NULL REFERENCES guests(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('user', 'group')),
    owner INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    inodes INTEGER NOT NULL,
    PRIMARY KEY (guest_id, kind, owner)
);
CREATE TABLE own_marked (
    guest_id INTEGER NOT NULL REFERENCES guests(id) ON DELETE CASCADE,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    PRIMARY KEY (guest_id, dev, ino)
);
CREATE TABLE limits (
    guest_id INTEGER PRIMARY KEY REFERENCES guests(id) ON DELETE CASCADE,
    space INTEGER,
    inodes INTEGER,
    reserved_percent REAL NOT NULL DEFAULT 0
);
CREATE TABLE quotas (
    guest_id INTEGER NOT NULL REFERENCES guests(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('user', 'group')),
    owner INTEGER NOT NULL,
    space_soft INTEGER,
    space_hard INTEGER,
    inodes_soft INTEGER,
    inodes_hard INTEGER,
    grace INTEGER NOT NULL,
    space_over_since REAL,
    inodes_over_since REAL,
    PRIMARY KEY (guest_id, kind, owner)
);
CREATE TABLE limit_hits (
    guest_id INTEGER NOT NULL REFERENCES guests(id) ON DELETE CASCADE,
    what TEXT NOT NULL,
    count INTEGER NOT NULL,
    last REAL NOT NULL,
    PRIMARY KEY (guest_id, what)
);
"""

# The schema's version (PRAGMA user_version): SCHEMA is the newest. A database of an
# older version is brought up to date by the steps from its version on, in order;
# databases made before versions were kept have none (0) and the tables of version 1
# (or, from just before, of version 2).
SCHEMA_VERSION = 2
MIGRATIONS: dict[int, str] = {
    # 1 -> 2: the marked files each guest's last scan charged (a charge is given back
    # only from that list). Every guest's usage is recomputed by its next mount.
    1: """
    CREATE TABLE own_marked (
        guest_id INTEGER NOT NULL REFERENCES guests(id) ON DELETE CASCADE,
        dev INTEGER NOT NULL,
        ino INTEGER NOT NULL,
        PRIMARY KEY (guest_id, dev, ino)
    );
    UPDATE usage SET stale = 1;
    """,
}


class SchemaError(CowfsError):
    """A state database this cowfs cannot use."""


def _bring_up_to_date(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema in a new database, or migrate an older one, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others then see it done
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            tables = {
                name
                for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if "guests" not in tables:
                for statement in _statements(SCHEMA):
                    conn.execute(statement)
                version = SCHEMA_VERSION
            else:  # cowfs of just before versions were kept made own_marked already
                version = 2 if "own_marked" in tables else 1
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"state database {path} has schema version {version}, newer than this"
                f" cowfs knows ({SCHEMA_VERSION}): use a newer cowfs"
            )
        while version < SCHEMA_VERSION:
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            version += 1
        conn.execute(f"PRAGMA user_version = {version}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]


def default_path() -> Path:
    """The host layout's state database."""
    return state_root() / "state.db"


@dataclass
class GuestRow:
    """A guest the database knows."""

    id: int
    path: str
    name: str


@dataclass
class UsageRow:
    """A guest's private and shared usage as last written."""

    bytes: int
    inodes: int
    shared_bytes: int
    shared_inodes: int
    stale: bool
    updated: float


@dataclass
class LimitRow:
    """A guest's disk limits (None: unlimited)."""

    space: int | None = None
    inodes: int | None = None
    reserved_percent: float = 0.0


@dataclass
class QuotaRow:
    """A per-user or per-group quota inside a guest."""

    kind: str
    owner: int
    space_soft: int | None
    space_hard: int | None
    inodes_soft: int | None
    inodes_hard: int | None
    grace: int
    space_over_since: float | None = None
    inodes_over_since: float | None = None


class StateDB:
    """A connection to the state database."""

    def __init__(self, path: Path | None = None):
        self.path = path or default_path()
        make_private_dirs(self.path.parent)
        create_private_file(self.path)  # before sqlite makes it 0644; its WAL and SHM follow
        # (a mount's books are written from a worker thread, one call at a time)
        self.conn = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        if self.conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            _bring_up_to_date(self.conn, self.path)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- guests -----------------------------------------------------------

    def guest(self, path: str, name: str | None = None, create: bool = True) -> GuestRow | None:
        """The row of the guest whose backing tree is path (made if create)."""
        row = self.conn.execute(
            "SELECT id, path, name FROM guests WHERE path = ?", (path,)
        ).fetchone()
        if row is None and create:
            with self.transaction() as c:
                c.execute(
                    "INSERT OR IGNORE INTO guests (path, name) VALUES (?, ?)",
                    (path, name or Path(path).name),
                )
            row = self.conn.execute(
                "SELECT id, path, name FROM guests WHERE path = ?", (path,)
            ).fetchone()
        return GuestRow(*row) if row else None

    def guests(self) -> list[GuestRow]:
        """Every guest known, by name."""
        rows = self.conn.execute("SELECT id, path, name FROM guests ORDER BY name, path")
        return [GuestRow(*r) for r in rows]

    # -- usage ------------------------------------------------------------

    def usage(self, guest_id: int) -> UsageRow | None:
        """The guest's last written usage."""
        row = self.conn.execute(
            "SELECT bytes, inodes, shared_bytes, shared_inodes, stale, updated"
            " FROM usage WHERE guest_id = ?",
            (guest_id,),
        ).fetchone()
        if row is None:
            return None
        return UsageRow(row[0], row[1], row[2], row[3], bool(row[4]), row[5])

    def owner_usage(self, guest_id: int) -> dict[tuple[str, int], tuple[int, int]]:
        """{(kind, uid or gid): (bytes, inodes)} of the guest's private files."""
        rows = self.conn.execute(
            "SELECT kind, owner, bytes, inodes FROM owner_usage WHERE guest_id = ?", (guest_id,)
        )
        return {(k, o): (b, i) for k, o, b, i in rows}

    def own_marked(self, guest_id: int) -> set[tuple[int, int]]:
        """(dev, ino) of the marked inodes the guest's usage charges (usage.py)."""
        rows = self.conn.execute("SELECT dev, ino FROM own_marked WHERE guest_id = ?", (guest_id,))
        return {(dev, ino) for dev, ino in rows}

    def write_usage(
        self,
        guest_id: int,
        usage: UsageRow,
        owners: dict[tuple[str, int], tuple[int, int]] | None,
        own_marked: set[tuple[int, int]] | None = None,
    ) -> None:
        """Store a guest's usage (and, if given, its per-owner usage and own
        marked inodes) in one transaction."""
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO usage VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    guest_id,
                    usage.bytes,
                    usage.inodes,
                    usage.shared_bytes,
                    usage.shared_inodes,
                    int(usage.stale),
                    usage.updated,
                ),
            )
            if owners is not None:
                c.execute("DELETE FROM owner_usage WHERE guest_id = ?", (guest_id,))
                c.executemany(
                    "INSERT INTO owner_usage VALUES (?, ?, ?, ?, ?)",
                    [(guest_id, k, o, b, i) for (k, o), (b, i) in owners.items() if b or i],
                )
            if own_marked is not None:
                c.execute("DELETE FROM own_marked WHERE guest_id = ?", (guest_id,))
                c.executemany(
                    "INSERT INTO own_marked VALUES (?, ?, ?)",
                    [(guest_id, dev, ino) for dev, ino in own_marked],
                )

    def mark_stale(self, guest_id: int, stale: bool) -> None:
        """Flag the guest's usage as possibly wrong (a mount is running) or exact."""
        with self.transaction() as c:
            c.execute("UPDATE usage SET stale = ? WHERE guest_id = ?", (int(stale), guest_id))

    # -- limits and quotas ------------------------------------------------

    def limits(self, guest_id: int) -> LimitRow:
        """The guest's limits (all None if none are set)."""
        row = self.conn.execute(
            "SELECT space, inodes, reserved_percent FROM limits WHERE guest_id = ?", (guest_id,)
        ).fetchone()
        return LimitRow(*row) if row else LimitRow()

    def set_limits(self, guest_id: int, limits: LimitRow) -> None:
        """Replace the guest's limits."""
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO limits VALUES (?, ?, ?, ?)",
                (guest_id, limits.space, limits.inodes, limits.reserved_percent),
            )

    def clear_limits(self, guest_id: int) -> bool:
        """Remove the guest's limits; False if it had none."""
        with self.transaction() as c:
            return c.execute("DELETE FROM limits WHERE guest_id = ?", (guest_id,)).rowcount > 0

    def quotas(self, guest_id: int) -> list[QuotaRow]:
        """The guest's per-user and per-group quotas."""
        rows = self.conn.execute(
            "SELECT kind, owner, space_soft, space_hard, inodes_soft, inodes_hard, grace,"
            " space_over_since, inodes_over_since FROM quotas WHERE guest_id = ?"
            " ORDER BY kind DESC, owner",
            (guest_id,),
        )
        return [QuotaRow(*r) for r in rows]

    def set_quota(self, guest_id: int, quota: QuotaRow) -> None:
        """Replace one quota (keeping its grace clocks if it existed)."""
        with self.transaction() as c:
            old = c.execute(
                "SELECT space_over_since, inodes_over_since FROM quotas"
                " WHERE guest_id = ? AND kind = ? AND owner = ?",
                (guest_id, quota.kind, quota.owner),
            ).fetchone()
            since = old or (None, None)
            c.execute(
                "INSERT OR REPLACE INTO quotas VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    guest_id,
                    quota.kind,
                    quota.owner,
                    quota.space_soft,
                    quota.space_hard,
                    quota.inodes_soft,
                    quota.inodes_hard,
                    quota.grace,
                    since[0],
                    since[1],
                ),
            )

    def clear_quota(self, guest_id: int, kind: str, owner: int) -> bool:
        """Remove one quota; False if there was none."""
        with self.transaction() as c:
            cursor = c.execute(
                "DELETE FROM quotas WHERE guest_id = ? AND kind = ? AND owner = ?",
                (guest_id, kind, owner),
            )
            return cursor.rowcount > 0

    def write_grace(self, guest_id: int, quotas: list[QuotaRow]) -> None:
        """Store when each quota went over its soft limits (the grace clocks)."""
        with self.transaction() as c:
            c.executemany(
                "UPDATE quotas SET space_over_since = ?, inodes_over_since = ?"
                " WHERE guest_id = ? AND kind = ? AND owner = ?",
                [
                    (q.space_over_since, q.inodes_over_since, guest_id, q.kind, q.owner)
                    for q in quotas
                ],
            )

    # -- limit hits -------------------------------------------------------

    def add_hits(self, guest_id: int, hits: dict[str, int]) -> None:
        """Count how often each limit refused an operation."""
        now = time.time()
        with self.transaction() as c:
            for what, count in hits.items():
                c.execute(
                    "INSERT INTO limit_hits VALUES (?, ?, ?, ?) ON CONFLICT (guest_id, what)"
                    " DO UPDATE SET count = count + excluded.count, last = excluded.last",
                    (guest_id, what, count, now),
                )

    def hits(self, guest_id: int) -> dict[str, int]:
        """{limit: times it refused an operation} for the guest."""
        rows = self.conn.execute(
            "SELECT what, count FROM limit_hits WHERE guest_id = ?", (guest_id,)
        )
        return dict(rows.fetchall())


def usage_changed(roots: list[str]) -> None:
    """Files of these guest trees became shared (hashify, clone): their stored usage is not exact.

    Their next mount counts it again by a scan.
    """
    if not default_path().exists():
        return  # no guest has usage stored
    db = StateDB()
    try:
        for root in roots:
            row = db.guest(root, create=False)
            if row is not None:
                db.mark_stale(row.id, True)
    finally:
        db.close()
