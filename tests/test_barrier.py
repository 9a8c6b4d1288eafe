"""The barrier: host users other than root cannot reach guest trees, mounts or the store.

Attacks are made for real by an unprivileged host user (setpriv, no groups):
running a guest's setuid-root copy of id and a copy of cat with a file
capability, reading a guest user's file as the host user of the same uid,
writing a shared inode of the backing tree. Each attack runs twice: behind the
barrier (it must fail with EACCES) and, as the control that proves it is real,
in a layout opened on purpose with --allow-reachable (it must succeed).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import COWFS, ROOT, Mounts, cowfs, is_marked, run, snapshot

from cowfs.host.barrier import exposure

NOBODY = 65534
ALICE = 1000  # alice in the guest, and the host user with the same uid
SECRET = "alice's secret\n"
OVERRIDE = "(or --allow-reachable, which lets host users run its setuid files)"

# Runs as the attacking host user: tries each attempt, reports what happened.
ATTACKER = r"""
import errno, json, subprocess, sys

def attempt(kind, path, arg):
    try:
        if kind == "exec":
            done = subprocess.run([path, *arg], capture_output=True, text=True, timeout=30)
            return {"exit": done.returncode, "out": done.stdout}
        if kind == "read":
            with open(path) as f:
                return {"read": f.read()}
        with open(path, "a") as f:
            f.write(arg)
        return {"appended": True}
    except OSError as e:
        return {"errno": errno.errorcode[e.errno]}

print(json.dumps([attempt(*a) for a in json.loads(sys.argv[1])]))
"""


def attack(uid: int, attempts: list[tuple[str, Path, object]]) -> list[dict[str, object]]:
    """Run attempts as host uid:uid with no supplementary groups; one outcome each."""
    done = run(
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--",
        "/usr/bin/python3",
        "-c",
        ATTACKER,
        json.dumps([(kind, str(path), arg) for kind, path, arg in attempts]),
        cwd="/",
    )
    outcomes: list[dict[str, object]] = json.loads(done.stdout)
    return outcomes


def plant(template: Path) -> None:
    """What a guest's root could leave in its tree, and a guest user's files."""
    (template / "bin").mkdir(parents=True)
    shutil.copy("/usr/bin/id", template / "bin" / "id-suid")
    os.chmod(template / "bin" / "id-suid", 0o4755)
    shutil.copy("/usr/bin/cat", template / "bin" / "cat-cap")
    run("setcap", "cap_dac_read_search+ep", template / "bin" / "cat-cap")
    shutil.copy("/bin/busybox", template / "bin" / "busybox")  # static: runs in a chroot
    home = template / "home" / "alice"
    home.mkdir(parents=True)
    (home / "secret").write_text(SECRET)
    os.chmod(home / "secret", 0o600)
    (home / "notes").write_text("shared notes\n")
    for path in (home, home / "secret", home / "notes"):
        os.chown(path, ALICE, ALICE)


@dataclass
class Site:
    """A template, two guests cloned from it and web1 mounted."""

    barrier: bool
    template: Path
    web1: Path
    web2: Path
    mnt: Path


@pytest.fixture(params=["barrier", "open"])
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    """Behind the barrier, or opened on purpose with --allow-reachable (the control).

    In a directory every host user can reach: the template and the mountpoint
    in a directory the admin made root-only, the guests in base/guests, which
    cowfs clone makes (root-only) as it is missing. In the control, both are
    made open (0755) beforehand.
    """
    barrier = request.param == "barrier"
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="cowfs-barrier-"))
    mounts = Mounts()
    try:
        os.chmod(base, 0o755)
        (base / "admin").mkdir(mode=0o700 if barrier else 0o755)
        extra = [] if barrier else ["--allow-reachable"]
        if not barrier:
            (base / "guests").mkdir(mode=0o755)
        s = Site(
            barrier,
            base / "admin" / "template",
            base / "guests" / "web1",
            base / "guests" / "web2",
            base / "admin" / "mnt",
        )
        plant(s.template)
        cowfs("clone", *extra, s.template, s.web1)
        cowfs("clone", *extra, s.template, s.web2)
        mounts.mount(s.web1, s.mnt, *extra)
        yield s
    finally:
        mounts.cleanup()
        shutil.rmtree(base)


def test_preconditions_of_the_attacks(site: Site) -> None:
    """What the attacks rely on is there, so that a refusal cannot come from elsewhere."""
    for tree in (site.web1, site.mnt):
        st = (tree / "bin" / "id-suid").stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o4755)
        caps = run("getcap", tree / "bin" / "cat-cap").stdout
        assert "cap_dac_read_search" in caps, caps
        st = (tree / "home" / "alice" / "secret").stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (ALICE, 0o600)
    notes = site.web1 / "home" / "alice" / "notes"
    assert is_marked(notes) and notes.stat().st_nlink == 3  # template, web1, web2
    assert notes.stat().st_ino == (site.web2 / "home" / "alice" / "notes").stat().st_ino
    # the guest itself is not hurt by the barrier: alice reads her file inside it
    inside = run(
        "chroot", "--userspec=1000:1000", site.mnt, "/bin/busybox", "cat", "/home/alice/secret"
    )
    assert inside.stdout == SECRET


def test_host_user_cannot_run_a_guests_setuid_or_capability_files(site: Site) -> None:
    outcomes = attack(
        NOBODY,
        [
            ("exec", site.web1 / "bin" / "id-suid", ["-u"]),
            ("exec", site.mnt / "bin" / "id-suid", ["-u"]),
            ("exec", site.web1 / "bin" / "cat-cap", ["/etc/shadow"]),
            ("exec", site.mnt / "bin" / "cat-cap", ["/etc/shadow"]),
        ],
    )
    if site.barrier:
        assert outcomes == [{"errno": "EACCES"}] * 4
    else:  # the control: the attack is real where host users can reach the tree
        as_root = {"exit": 0, "out": "0\n"}
        assert outcomes[:2] == [as_root, as_root]
        for shadow in outcomes[2:]:
            assert shadow["exit"] == 0 and str(shadow["out"]).startswith("root:"), shadow


def test_host_user_cannot_read_or_write_guest_users_files(site: Site) -> None:
    notes = site.web1 / "home" / "alice" / "notes"
    outcomes = attack(
        ALICE,
        [
            ("read", site.web1 / "home" / "alice" / "secret", None),
            ("read", site.mnt / "home" / "alice" / "secret", None),
            ("append", notes, "written from the host\n"),  # the shared inode itself
            ("append", site.mnt / "home" / "alice" / "notes", "through the mount\n"),
        ],
    )
    web2_notes = (site.web2 / "home" / "alice" / "notes").read_text()
    if site.barrier:
        assert outcomes == [{"errno": "EACCES"}] * 4
        assert web2_notes == "shared notes\n"
    else:  # the control
        assert outcomes == [
            {"read": SECRET},
            {"read": SECRET},
            {"appended": True},
            {"appended": True},
        ]
        # the write to web1's backing file went into every guest's (and the template's) inode
        assert web2_notes == "shared notes\nwritten from the host\n"


# -- the commands refuse what host users can reach ---------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every host user can reach (pytest's own tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="cowfs-open-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def _tree(path: Path, content: str = "same content, long enough to hashify\n") -> Path:
    (path / "usr" / "bin").mkdir(parents=True)
    (path / "usr" / "bin" / "tool").write_text(content)
    return path


def _refusal(what: str, path: Path, parent: Path) -> str:
    return (
        f"cowfs: error: {what} {path}: {parent} is mode 0755: host users can reach {path};"
        f" chmod 0700 {parent} {OVERRIDE}\n"
    )


@pytest.mark.parametrize(
    "case",
    [
        "mount-backing",
        "mount-mountpoint",
        "clone-template",
        "clone-new",
        "hashify-guest",
        "hashify-store",
    ],
)
def test_commands_refuse_a_reachable_path_and_change_nothing(
    tmp_path: Path, open_dir: Path, mounts: Mounts, case: str
) -> None:
    private = tmp_path  # under pytest's basetemp, mode 0700
    command, _, role = case.partition("-")
    reachable = open_dir / role
    if command == "mount":
        backing = _tree(reachable if role == "backing" else private / "backing")
        point = reachable if role == "mountpoint" else private / "mnt"
        point.mkdir()
        mounts.points.append(point)  # unmounted at the end, should it ever be mounted
        args: list[str | Path] = ["mount", backing, point]
        what = {"backing": "backing tree", "mountpoint": "mountpoint"}[role]
    elif command == "clone":
        template = _tree(reachable if role == "template" else private / "template")
        new = reachable if role == "new" else private / "new"
        args = ["clone", template, new]
        what = {"template": "template", "new": "destination"}[role]
    else:
        g1 = _tree(reachable if role == "guest" else private / "g1")
        g2 = _tree(private / "g2")
        store = reachable if role == "store" else private / "store"
        args = ["hashify", "--ignore-mtime", "--store", store, g1, g2]
        what = role
    before = (snapshot(private), snapshot(open_dir))
    refused = cowfs(*args, check=False)
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == _refusal(what, reachable, open_dir)
    assert (snapshot(private), snapshot(open_dir)) == before
    tools = [*private.rglob("tool"), *open_dir.rglob("tool")]
    assert tools and not any(is_marked(t) for t in tools)  # (snapshot leaves the mark out)
    mounted = run("findmnt", "-rn", "-o", "TARGET").stdout.split()
    assert not [m for m in mounted if m.startswith((str(private), str(open_dir)))]
    # told otherwise, the same command does its work
    cowfs(*args[:1], "--allow-reachable", *args[1:])
    if command == "mount":
        assert (point / "usr" / "bin" / "tool").exists()
    elif command == "clone":
        assert (new / "usr" / "bin" / "tool").stat().st_ino == (
            template / "usr" / "bin" / "tool"
        ).stat().st_ino
    else:
        assert (g1 / "usr" / "bin" / "tool").stat().st_ino == (
            g2 / "usr" / "bin" / "tool"
        ).stat().st_ino


def test_a_symlink_is_judged_by_where_it_leads(tmp_path: Path, open_dir: Path) -> None:
    template = _tree(tmp_path / "template")
    (open_dir / "guests").mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(open_dir / "guests")  # a private name for an open place
    refused = cowfs("clone", template, tmp_path / "link" / "web1", check=False)
    assert refused.returncode == 1
    real = open_dir / "guests" / "web1"
    assert f"{open_dir / 'guests'} is mode 0755: host users can reach {real};" in refused.stderr
    assert not real.exists()
    (open_dir / "private").mkdir(mode=0o700)
    (open_dir / "private" / "guests").mkdir(mode=0o755)
    (open_dir / "to-private").symlink_to(
        open_dir / "private" / "guests"
    )  # an open name, private place
    cowfs("clone", template, open_dir / "to-private" / "web1")
    assert (open_dir / "private" / "guests" / "web1" / "usr" / "bin" / "tool").exists()


# -- what "reachable" means: the check against the kernel ----------------------


def _can_stat(uid: int, gid: int, path: Path) -> str:
    """ "ok" or the errno name of stat(path) as uid:gid (no other groups)."""
    done = run(
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--",
        "/usr/bin/python3",
        "-c",
        "import errno, os, sys\ntry:\n os.stat(sys.argv[1]); print('ok')\n"
        "except OSError as e:\n print(errno.errorcode[e.errno])",
        str(path),
        cwd="/",
    )
    return done.stdout.strip()


@pytest.mark.parametrize(
    "case, why, user",
    [
        ("root 0700", None, None),
        ("root 0755", "is mode 0755", (NOBODY, NOBODY)),
        ("root 0711", "is mode 0711", (NOBODY, NOBODY)),
        ("root:staff 0750", "is mode 0750: group 50 may search it", (1234, 50)),
        (
            "root 0700 + acl user 1000",
            "is mode 0710 with an ACL letting user 1000 search it",
            (1000, 1000),
        ),
        (
            "root 0700 + acl group 60",
            "is mode 0710 with an ACL letting group 60 search it",
            (4321, 60),
        ),
        ("root 0700 + acl mask without search", None, None),
        ("uid 1000 0700", "is owned by uid 1000 (mode 0700)", (1000, 1000)),
    ],
)
def test_reachable_means_a_host_user_can_get_there(
    open_dir: Path, case: str, why: str | None, user: tuple[int, int] | None
) -> None:
    """exposure() says reachable exactly when the kernel lets some named host user in."""
    gate = open_dir / "gate"
    gate.mkdir()
    target = gate / "guest"
    target.mkdir(mode=0o755)
    os.chmod(gate, 0o700)
    if case == "root 0755":
        os.chmod(gate, 0o755)
    elif case == "root 0711":
        os.chmod(gate, 0o711)
    elif case == "root:staff 0750":
        os.chown(gate, 0, 50)
        os.chmod(gate, 0o750)
    elif case == "root 0700 + acl user 1000":
        run("setfacl", "-m", "u:1000:x", gate)
    elif case == "root 0700 + acl group 60":
        run("setfacl", "-m", "g:60:x", gate)
    elif case == "root 0700 + acl mask without search":
        run("setfacl", "-m", "u:1000:x,m::-", gate)
    elif case == "uid 1000 0700":
        os.chown(gate, 1000, 1000)
    found = exposure(target)
    if why is None:
        assert found is None
        for uid, gid in ((NOBODY, NOBODY), (1000, 1000), (1234, 50), (4321, 60)):
            assert _can_stat(uid, gid, target) == "EACCES", (uid, gid)
    else:
        assert found is not None and (found.path, found.directory, found.why) == (
            str(target),
            str(gate),
            why,
        )
        assert user is not None and _can_stat(*user, target) == "ok"


@pytest.mark.parametrize(
    "path, message",
    [
        (
            "/srv/guests-of-a-test/web1",  # its parent does not exist: it would be made 0700
            None,
        ),
        (
            "/srv/template-of-a-test",
            "/srv is mode 0755: host users can reach /srv/template-of-a-test; move it into a"
            " directory only root may search (e.g. install -d -m 0700 /srv/vservers)",
        ),
        (
            "/",
            "/ is the root directory: host users can reach /; move it into a directory only"
            " root may search (e.g. install -d -m 0700 /vservers)",
        ),
    ],
)
def test_errors_never_advise_closing_a_shared_directory(path: str, message: str | None) -> None:
    st = os.stat("/srv")  # as Debian ships it
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    assert path == "/" or not os.path.exists(path)
    assert not os.path.exists("/srv/guests-of-a-test")
    found = exposure(path)
    assert (found and f"{found}; {found.remedy}") == message


def test_one_closed_directory_anywhere_above_is_enough(open_dir: Path) -> None:
    (open_dir / "closed").mkdir(mode=0o700)
    deep = open_dir / "closed" / "a" / "b"
    deep.mkdir(parents=True)
    os.chmod(open_dir / "closed" / "a", 0o755)
    os.chmod(deep, 0o755)
    assert exposure(deep / "guest") is None
    assert _can_stat(NOBODY, NOBODY, deep) == "EACCES"


# -- the host layout ---------------------------------------------------------

# The whole layout while a connection has the database open (WAL mode)
ROOT_ONLY_LAYOUT = {
    ".": "0700",
    "guests": "0700",
    "store": "0700",
    "state.db": "0600",
    "state.db-wal": "0600",
    "state.db-shm": "0600",
}


def _modes(root: Path) -> dict[str, str]:
    names = ["", "guests", "store", "state.db", "state.db-wal", "state.db-shm"]
    return {
        name or ".": f"{stat.S_IMODE((root / name).stat().st_mode):04o}"
        for name in names
        if (root / name).exists()
    }


def _in_layout(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(COWFS, *args, env={**os.environ, "COWFS_ROOT": str(root)}, check=False)


def test_the_host_layout_is_made_root_only(open_dir: Path) -> None:
    root = open_dir / "var" / "lib" / "cowfs"  # nothing of it exists; open_dir is 0755
    done = _in_layout(root, "limit", "show", "--json")
    assert done.returncode == 0, done.stderr
    assert _modes(root) == {".": "0700", "guests": "0700", "state.db": "0600"}
    assert {(root / n).stat().st_uid for n in ("", "guests", "state.db")} == {0}
    # two guests in the layout, hashified into its default store
    guests = [_tree(root / "guests" / "g"), _tree(root / "guests" / "h")]
    done = _in_layout(root, "hashify", *map(str, guests))
    assert done.returncode == 0, done.stderr
    assert _modes(root)["store"] == "0700"
    # while the database is open (a mount holds it so), its WAL and SHM are 0600 too
    db = sqlite3.connect(root / "state.db")
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("SELECT count(*) FROM guests").fetchall()
        assert _modes(root) == ROOT_ONLY_LAYOUT
    finally:
        db.close()


def test_an_opened_host_layout_is_repaired(open_dir: Path) -> None:
    root = open_dir / "layout"
    assert _in_layout(root, "limit", "show").returncode == 0
    (root / "store").mkdir(mode=0o700)
    db = sqlite3.connect(root / "state.db")  # keeps the WAL and SHM files in place
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("SELECT count(*) FROM guests").fetchall()
        for name in ("", "guests", "store"):
            os.chmod(root / name, 0o755)
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            os.chmod(root / name, 0o644)
        assert exposure(root / "guests" / "x") is not None  # opened, as an admin might
        done = _in_layout(root, "limit", "show")
        assert done.returncode == 0, done.stderr
        assert _modes(root) == ROOT_ONLY_LAYOUT
        assert f"host layout: {root} was mode 0755, now 0700" in done.stderr
        assert f"host layout: {root / 'state.db'} was mode 0644, now 0600" in done.stderr
    finally:
        db.close()


def test_a_host_layout_owned_by_a_user_is_refused(open_dir: Path) -> None:
    root = open_dir / "layout"
    root.mkdir(mode=0o700)
    os.chown(root, 1000, 1000)
    done = _in_layout(root, "limit", "show")
    assert done.returncode == 1
    assert done.stderr == (
        f"cowfs: error: host layout {root}: owned by uid 1000, who can reach every guest;"
        f" chown root:root {root}\n"
    )
    assert os.listdir(root) == []


def test_install_makes_and_repairs_the_host_layout(open_dir: Path) -> None:
    root = open_dir / "layout"
    env = {**os.environ, "COWFS_ROOT": str(root)}
    run(ROOT / "tools" / "install.sh", env=env)
    assert _modes(root) == {".": "0700", "guests": "0700"}
    (root / "store").mkdir(mode=0o755)
    (root / "state.db").write_text("")
    os.chmod(root / "state.db", 0o644)
    os.chmod(root, 0o755)
    os.chown(root / "guests", 1000, 1000)
    run(ROOT / "tools" / "install.sh", env=env)
    assert _modes(root) == {".": "0700", "guests": "0700", "store": "0700", "state.db": "0600"}
    assert {(root / n).stat().st_uid for n in ("", "guests", "store", "state.db")} == {0}


def test_the_run_and_log_directories_are_root_only(open_dir: Path) -> None:
    """Mount records name guests' trees, a successor server trusts its session journal,
    mount logs name guests' files: a host user can reach none of them."""
    root = open_dir / "layout"
    env = {
        **os.environ,
        "COWFS_ROOT": str(root),
        "COWFS_RUN_DIR": str(open_dir / "run"),
        "COWFS_LOG_DIR": str(open_dir / "log"),
    }
    (open_dir / "run").mkdir(mode=0o777)  # opened, as a umask of 0 once made it
    os.chmod(open_dir / "run", 0o777)
    (open_dir / "run" / "mounts").mkdir(mode=0o777)
    os.chmod(open_dir / "run" / "mounts", 0o777)
    assert _in_layout(root, "limit", "show").returncode == 0
    backing = _tree(root / "guests" / "g")
    mountpoint = root / "mnt"
    mountpoint.mkdir()
    done = run(COWFS, "mount", backing, mountpoint, env=env, check=False)
    assert done.returncode == 0, done.stderr
    try:
        for directory in ("run", "log"):
            assert stat.S_IMODE((open_dir / directory).stat().st_mode) == 0o700
        records = list((open_dir / "run" / "mounts").glob("*.json"))
        assert len(records) == 1
        assert _can_stat(NOBODY, NOBODY, records[0]) == "EACCES"
        assert _can_stat(NOBODY, NOBODY, open_dir / "log") == "ok"
        assert _can_stat(NOBODY, NOBODY, next((open_dir / "log").iterdir())) == "EACCES"
    finally:
        run(COWFS, "umount", mountpoint, env=env, check=False)
    os.chown(open_dir / "run", 1000, 1000)
    refused = run(COWFS, "mount", backing, mountpoint, env=env, check=False)
    assert refused.returncode == 1
    assert f"{open_dir / 'run'}: owned by uid 1000" in refused.stderr
