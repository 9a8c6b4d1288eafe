"""The state database's schema version: a database of an older cowfs is migrated, a newer one
refused, a new one made at the newest version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cowfs.host.statedb import SchemaError, StateDB

# The schema as cowfs made it before versions were kept (version 1, user_version 0),
# written out: the migration must take this very database, whatever SCHEMA becomes.
VERSION_1 = """
CREATE TABLE guests (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, name TEXT NOT NULL);
CREATE TABLE usage (
    guest_id INTEGER PRIMARY KEY REFERENCES guests(id) ON DELETE CASCADE,
    bytes INTEGER NOT NULL, inodes INTEGER NOT NULL, shared_bytes INTEGER NOT NULL,
    shared_inodes INTEGER NOT NULL, stale INTEGER NOT NULL, updated REAL NOT NULL
);
CREATE TABLE owner_usage (
    guest_id INTEGER NOT NULL REFERENCES guests(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('user', 'group')), owner INTEGER NOT NULL,
    bytes INTEGER NOT NULL, inodes INTEGER NOT NULL, PRIMARY KEY (guest_id, kind, owner)
);
CREATE TABLE limits (
    guest_id INTEGER PRIMARY KEY REFERENCES guests(id) ON DELETE CASCADE,
    space INTEGER, inodes INTEGER, reserved_percent REAL NOT NULL DEFAULT 0
);
CREATE TABLE quotas (
    guest_id INTEGER NOT NULL REFERENCES guests(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('user', 'group')), owner INTEGER NOT NULL,
    space_soft INTEGER, space_hard INTEGER, inodes_soft INTEGER, inodes_hard INTEGER,
    grace INTEGER NOT NULL, space_over_since REAL, inodes_over_since REAL,
    PRIMARY KEY (guest_id, kind, owner)
);
CREATE TABLE limit_hits (
    guest_id INTEGER NOT NULL REFERENCES guests(id) ON DELETE CASCADE,
    what TEXT NOT NULL, count INTEGER NOT NULL, last REAL NOT NULL,
    PRIMARY KEY (guest_id, what)
);
INSERT INTO guests VALUES (1, '/g/web1', 'web1');
INSERT INTO usage VALUES (1, 4096, 3, 8192, 2, 0, 1000.0);
INSERT INTO owner_usage VALUES (1, 'user', 1000, 4096, 1);
INSERT INTO limits VALUES (1, 1048576, 100, 5.0);
INSERT INTO quotas VALUES (1, 'user', 1000, 10, 20, NULL, NULL, 604800, NULL, NULL);
INSERT INTO limit_hits VALUES (1, 'space', 7, 1000.0);
"""


def _version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_a_version_1_database_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(VERSION_1)
    conn.close()
    db = StateDB(path)
    try:
        guest = db.guest("/g/web1", create=False)
        assert guest is not None and (guest.id, guest.name) == (1, "web1")
        limits = db.limits(1)
        assert (limits.space, limits.inodes, limits.reserved_percent) == (1048576, 100, 5.0)
        assert db.owner_usage(1) == {("user", 1000): (4096, 1)}
        assert [(q.owner, q.space_soft, q.space_hard) for q in db.quotas(1)] == [(1000, 10, 20)]
        assert db.hits(1) == {"space": 7}
        usage = db.usage(1)
        # The counters were kept, but the next mount recomputes them (the list of
        # marked files the scan charged did not exist before).
        assert usage is not None and (usage.bytes, usage.stale) == (4096, True)
        assert db.own_marked(1) == set()
    finally:
        db.close()
    assert _version(path) == 2
    StateDB(path).close()  # opened again: nothing left to do
    assert _version(path) == 2


def test_a_new_database_is_made_at_the_newest_version(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    StateDB(path).close()
    assert _version(path) == 2


def test_a_database_of_a_newer_cowfs_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    StateDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(SchemaError, match="schema version 99, newer than this cowfs knows"):
        StateDB(path)
    assert path.read_bytes() == before and _version(path) == 99


def test_an_unversioned_database_that_has_own_marked_already_is_taken_as_version_2(
    tmp_path: Path,
) -> None:
    """cowfs of just before versions were kept made own_marked without a version."""
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        VERSION_1 + "CREATE TABLE own_marked (guest_id INTEGER NOT NULL, dev INTEGER NOT NULL,"
        " ino INTEGER NOT NULL, PRIMARY KEY (guest_id, dev, ino));"
        "INSERT INTO own_marked VALUES (1, 5, 6);"
    )
    conn.close()
    db = StateDB(path)
    try:
        assert db.own_marked(1) == {(5, 6)}
        usage = db.usage(1)
        assert usage is not None and usage.stale is False  # nothing to recompute
    finally:
        db.close()
    assert _version(path) == 2
