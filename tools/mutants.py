#!/usr/bin/env python3
"""Deliberate bugs, one at a time, against the tests that should catch them.

Each mutant breaks one promise of docs/design.md, the README or a security
defence with a single textual change. For each, a scratch checkout of HEAD (a
git worktree under /var/tmp/cowfs-mutants, the built native modules copied in)
gets the change, and the tests named for it run there against that copy
(PYTHONPATH puts it before the installed project, for the CLIs and daemons the
tests start too). A mutant the tests fail on is killed; one they pass with is a
gap in the tests. First, as the control, the tests of every chosen mutant run on
the unchanged copy and must pass. Not run by CI (a minute or more per mutant); the last result
is in tests/MUTANTS.md. Run as root:

    .venv/bin/python tools/mutants.py [--only NAME ...] [--list] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = Path("/var/tmp/cowfs-mutants")


@dataclass(frozen=True)
class Mutant:
    name: str
    promise: str  # what the change breaks
    path: str  # the file changed, from the repository's root
    old: str  # the text replaced (it must occur exactly once)
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    # More changes of the same bug elsewhere (path, old, new): a defence made twice.
    more: tuple[tuple[str, str, str], ...] = ()
    # Its tests need the unified cgroup hierarchy (cgroup v2) and skip elsewhere: left
    # out on a cgroup v1 host; tools/vm.sh runs them in its VM (tests/MUTANTS.md).
    cgroup2: bool = False

    def edits(self) -> list[tuple[str, str, str]]:
        return [(self.path, self.old, self.new), *self.more]


# Cgroup v2 mutants' texts: the guest's cgroup namespace, as made (contextd/supervisor.py),
# and made at the host's root cgroup (init there for the unshare, then back); the
# delegated level dropped (contextd/cgroups.py: the namespace's root is then
# contextd/NAME/guest, where the pids limit is).
_CGROUPNS_MADE = (
    "        sc.unshare(sc.CLONE_NEWCGROUP)  # rooted at the guest's cgroup, where we are now\n"
)
_CGROUPNS_MADE_AT_HOST_ROOT = (
    '        own = Path("/proc/self/cgroup").read_text().split("::")[1].strip()\n'
    '        Path("/sys/fs/cgroup/cgroup.procs").write_text("0")\n'
    "        sc.unshare(sc.CLONE_NEWCGROUP)\n"
    '        Path(f"/sys/fs/cgroup{own}/cgroup.procs").write_text("0")\n'
)
_BEFORE_GO = (
    '        if os.read(go_r, 16) != b"go":  # contextd moves us into the cgroup meanwhile\n'
)
_NO_DELEGATED_LEVEL = (
    (
        "contextd/cgroups.py",
        '            return [self.dirs["unified"] / GUEST / DELEGATED]\n',
        '            return [self.dirs["unified"] / GUEST]\n',
    ),
    (
        "contextd/cgroups.py",
        '                _write(guest / "cgroup.subtree_control", V2_CONTROLLERS)\n',
        "",
    ),
    (
        "contextd/cgroups.py",
        '            ("unified", _v2_delegated_files(), Path(GUEST, DELEGATED)),\n',
        '            ("unified", _v2_delegated_files(), Path(GUEST)),\n',
    ),
)

MUTANTS = (
    Mutant(
        "guest-on-a-host-users-ids",
        "start refuses a user-namespaced guest whose host ids a host user holds",
        "contextd/runtime.py",
        "        _refuse_owned_ids(config)\n        if registry",
        "        if registry",
        ("tests/test_host_ids.py",),
    ),
    Mutant(
        "create-takes-a-host-users-ids",
        "create gives a guest a range of host ids no host user holds",
        "contextd/server.py",
        "base = hostids.free_base(config.id_base(), size, taken)",
        "base = config.id_base()",
        ("tests/test_host_ids.py::test_create_gives_a_guest_ids_no_host_user_has",),
    ),
    Mutant(
        "shared-server-dies-of-hangup",
        "cowfs limit's SIGHUP reaches a shared server's mounts; the server lives on",
        "cowfs/serve/host.py",
        "signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:",
        "signal.SIGTERM, signal.SIGINT) as signals:",
        (
            "tests/test_shared_server.py::test_shared_guests_outlive_a_daemon_restart_and_take_limits_at_once",
        ),
    ),
    Mutant(
        "shared-server-ends-all-with-one",
        "a mount of the shared server ends alone (its guest's stop ends no other)",
        "cowfs/serve/host.py",
        "                    tree.close(clean)\n",
        "                    tree.close(clean)\n"
        "                    for other in list(self.trees.values()):\n"
        "                        other.terminate()\n",
        ("tests/test_shared_server.py::test_guests_sharing_a_server_stay_apart_and_end_alone",),
    ),
    Mutant(
        "supervisor-stays-python",
        "a running guest's supervisor is contextd-supervise, not a Python process",
        "contextd/supervisor.py",
        "    if STEADY.exists():\n",
        "    if False:\n",
        ("tests/test_supervise.py::test_a_running_guests_supervisor_is_the_small_program",),
    ),
    Mutant(
        "break-copies-no-owner",
        "a private copy keeps the shared file's owner",
        "cowfs/tree/metadata.py",
        "        st.st_uid,\n        st.st_gid,\n",
        "        0,\n        0,\n",
        ("tests/test_cow.py",),
    ),
    Mutant(
        "shared-read-touches-atime",
        "reading a shared file leaves the shared inode untouched",
        "cowfs/serve/operations.py",
        "backing_flags |= os.O_NOATIME",
        "backing_flags |= 0",
        ("tests/test_cow.py",),
    ),
    Mutant(
        "passthrough-read-touches-atime",
        "reading a shared file through the kernel (passthrough) leaves its atime",
        "cowfs/serve/passthrough.py",
        "os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._mount",
        "os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=tree_fd",
        ("tests/test_cow.py::test_reading_a_shared_file_leaves_its_atime",),
    ),
    Mutant(
        "passthrough-writer-on-shared-inode",
        "no write open shares a shared file's passthrough readers' backing (ETXTBSY)",
        "cowfs/serve/passthrough.py",
        "        if entry.key != node.key or is_marked(node.fd):\n"
        "            raise FUSEError(errno.ETXTBSY)\n        self._written",
        "        self._written",
        ("tests/test_passthrough.py",),
    ),
    Mutant(
        "passthrough-writer-after-metadata-break",
        "a writer never shares readers' backing file that is no longer the node's inode",
        "cowfs/serve/passthrough.py",
        "        if entry.key != node.key or is_marked(node.fd):\n"
        "            raise FUSEError(errno.ETXTBSY)\n        self._written",
        "        if is_marked(node.fd):\n"
        "            raise FUSEError(errno.ETXTBSY)\n        self._written",
        ("tests/test_passthrough.py",),
    ),
    Mutant(
        "passthrough-data-change-under-readers",
        "a shared file's data never changes under its passthrough readers (ETXTBSY)",
        "cowfs/serve/passthrough.py",
        "        if entry is not None and (entry.key != node.key or is_marked(node.fd)):\n"
        "            raise FUSEError(errno.ETXTBSY)",
        "        pass",
        ("tests/test_passthrough.py",),
    ),
    Mutant(
        "successor-forgets-backing-ids",
        "a successor server reuses the backing ids of the open files it takes over",
        "cowfs/serve/openfiles.py",
        "self.passthrough.opened(node, record.backing_id, known=False)",
        "pass",
        ("tests/test_faults.py::test_a_guest_outlives_the_death_of_its_fuse_server",),
    ),
    Mutant(
        "no-break-on-write",
        "a write to a shared file never reaches the other sharers",
        "cowfs/serve/cow.py",
        "if not stat.S_ISREG(os.fstat(node.fd).st_mode) or not is_marked(node.fd):",
        "if True:",
        ("tests/test_cow.py", "-k", "modification_stays_private"),
    ),
    Mutant(
        "hard-link-names-forgotten",
        "a break through a hard link replaces a guest's name, never only an unnamed copy",
        "cowfs/serve/inodes.py",
        "        for parent_id, name in node.aliases or ():",
        "        for parent_id, name in ():",
        ("tests/test_cow.py", "-k", "hard_link"),
    ),
    Mutant(
        "handle-kept-after-break",
        "a node whose link broke, evicted, comes back as its private copy",
        "cowfs/serve/inodes.py",
        "        node._fd = fd\n        node.handle = None\n",
        "        node._fd = fd\n",
        ("tests/test_fd_budget.py", "-k", "private_copy"),
    ),
    Mutant(
        "mark-visible",
        "the COW mark is invisible and cannot be forged",
        "cowfs/tree/marks.py",
        "    return name.startswith(XATTR_PREFIX)",
        "    return False",
        ("tests/test_cow.py", "-k", "mark_is_invisible"),
    ),
    Mutant(
        "temporaries-visible",
        "cowfs's temporaries are never seen through a mount",
        "cowfs/tree/marks.py",
        "    return name.startswith(TEMP_PREFIX)",
        "    return False",
        ("tests/test_crash.py", "-k", "invisible"),
    ),
    Mutant(
        "no-crash-sweep",
        "a mount after a crash sweeps the leftovers of link breaks",
        "cowfs/serve/mounted.py",
        "swept = recovery.sweep_leftovers(self.root_fd)",
        "swept = 0",
        ("tests/test_crash.py",),
    ),
    Mutant(
        "hashify-keeps-leftovers",
        "hashify removes the temporaries a killed run left",
        "cowfs/unify/hashify/command.py",
        "remove_leftovers(found.leftovers, roots)",
        "pass",
        ("tests/test_hashify.py", "-k", "temporaries"),
    ),
    Mutant(
        "hashify-no-recheck",
        "hashify never replaces a file changed since it was scanned",
        "cowfs/unify/hashify/scan.py",
        '        """True if now, a stat of a name of this inode just taken, shows it as the scan'
        " saw it.",
        "        return True\n"
        '        """True if now, a stat of a name of this inode just taken, shows it as the scan'
        " saw it.",
        ("tests/test_hashify.py", "-k", "changed"),
    ),
    Mutant(
        "quota-ignored",
        "a user's quota stops their writes",
        "cowfs/accounting/limits.py",
        "        if self.quotas:\n            return self._quota_refusal(",
        "        if False:\n            return self._quota_refusal(",
        ("tests/test_limits.py", "-k", "quota"),
    ),
    Mutant(
        "grace-forever",
        "over the soft limit is refused once the grace period is over",
        "cowfs/accounting/limits.py",
        "        return now - over_since <= grace",
        "        return True",
        ("tests/test_limits.py", "-k", "quota"),
    ),
    Mutant(
        "grace-never-reset",
        "back under the soft limit, the grace clock stops and starts afresh",
        "cowfs/accounting/limits.py",
        "    if soft is None or used <= soft:\n        return None",
        "    if soft is None:\n        return None\n"
        "    if used <= soft:\n        return over_since",
        ("tests/test_limits.py", "-k", "grace_period_that_ends"),
    ),
    Mutant(
        "statfs-shows-the-disk",
        "df in a guest shows its limit as the size",
        "cowfs/accounting/limits.py",
        "            blocks = min(blocks, limit_blocks)",
        "            blocks = blocks",
        ("tests/test_limits.py", "-k", "df"),
    ),
    Mutant(
        "quota-change-not-told",
        "a quota set or cleared applies to a running mount at once",
        "cowfs/host/guests.py",
        "                os.kill(record.pid, signal.SIGHUP)",
        "                os.kill(record.pid, 0)",
        ("tests/test_limits.py", "-k", "reach_a_running"),
    ),
    Mutant(
        "truncate-charged-by-size",
        "a hole takes no space: a guest is charged what is allocated",
        "cowfs/accounting/accountant.py",
        "        delta = _allocated(after) - _allocated(before)",
        "        delta = after.st_size - before.st_size",
        ("tests/test_limits.py", "-k", "truncate or holes"),
    ),
    Mutant(
        "idmap-owner-unmapped",
        "a user-namespaced guest sees the tree's owners as its own",
        "cowfs/serve/operations.py",
        "        e.st_uid = self.ids.to_host(st.st_uid)",
        "        e.st_uid = st.st_uid",
        ("tests/test_idmap.py",),
    ),
    Mutant(
        "idmap-caller-unmapped",
        "what a user-namespaced guest makes keeps tree ids; its quota counts",
        "cowfs/serve/operations.py",
        "        return self.ids.to_tree(ctx.uid)",
        "        return ctx.uid",
        ("tests/test_idmap.py",),
    ),
    Mutant(
        "barrier-off",
        "cowfs refuses trees host users can reach",
        "cowfs/host/barrier.py",
        '    """A CowfsError if host users can reach path, unless allow; what names it'
        ' ("template")."""\n    if allow:',
        '    """A CowfsError if host users can reach path, unless allow; what names it'
        ' ("template")."""\n    if True:',
        ("tests/test_barrier.py",),
    ),
    Mutant(
        "no-seccomp",
        "a guest's calls pass the seccomp filter",
        "contextd/namespace.py",
        "    guest_filter.load()\n    sc.prctl(sc.PR_SET_SECUREBITS, 0)",
        "    sc.prctl(sc.PR_SET_SECUREBITS, 0)",
        ("tests/test_guest_attacks.py", "-k", "refused and privileged"),
    ),
    Mutant(
        "guest-keeps-every-capability",
        "guest root holds the kept capabilities only",
        "contextd/namespace.py",
        "    drop_all_but(capabilities)\n",
        "    pass\n",
        ("tests/test_guest_attacks.py", "-k", "default_capabilities and privileged"),
    ),
    Mutant(
        "userns-root-is-host-root",
        "a user-namespaced guest's root is an unprivileged host id",
        "contextd/spawn.py",
        "    line = f\"0 {idmap['base']} {idmap['count']}\\n\"",
        "    line = f\"0 0 {idmap['count']}\\n\"",
        ("tests/test_guest_attacks.py", "-k", "leaked and userns"),
    ),
    Mutant(
        "devices-all-allowed",
        "a guest opens and makes only the devices of contextd's list",
        "contextd/cgroups.py",
        '        _write(guest / "devices.deny", "a")',
        '        _write(guest / "devices.allow", "a")',
        ("tests/test_guest_attacks.py", "-k", "devices_outside and privileged"),
    ),
    Mutant(
        "fuse-server-not-charged",
        "the work a guest gives its FUSE server is charged to the guest",
        "contextd/runtime.py",
        "                cgroup.add_fuse_server(fuse_server)\n",
        "                pass\n",
        ("tests/test_guest_attacks.py", "-k", "charged_to_the_guest and privileged"),
    ),
    Mutant(
        "terminal-filter-off",
        "a guest's output cannot drive the admin's terminal",
        "contextd/relay.py",
        "            data = data[: partial.start()]\n        return self._clean(data)",
        "            data = data[: partial.start()]\n        return data",
        ("tests/test_guest_attacks.py", "-k", "drive_the_admins_terminal and privileged"),
    ),
    Mutant(
        "resumed-append-kept",
        "a write resent to a successor server is done once",
        "cowfs/serve/operations.py",
        "os.O_NOFOLLOW | os.O_DIRECT | os.O_APPEND\n",
        "os.O_NOFOLLOW | os.O_DIRECT\n",
        ("tests/test_faults.py", "-k", "append_the_dead_server"),
        # (the successor strips O_APPEND from what it adopts too: journals of older servers)
        more=(
            (
                "cowfs/serve/openfiles.py",
                "os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | os.O_APPEND",
                "os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY",
            ),
        ),
    ),
    Mutant(
        "hung-server-never-killed",
        "a guest's stop leaves no FUSE server behind, even a hung one",
        "cowfs/serve/mount.py",
        "        if not kill_late:\n            return False",
        "        if True:\n            return False",
        ("tests/test_faults.py", "-k", "stopped_fuse_server_of_an_idle_guest"),
    ),
    Mutant(
        "host-keyring-reachable",
        "root's keyrings are out of a guest's reach",
        "contextd/seccomp.py",
        '"kernel keyrings": ("add_key", "keyctl", "request_key"),',
        '"kernel keyrings": ("kcmp",),',
        ("tests/test_guest_attacks.py", "-k", "keyrings and privileged"),
        # (defended twice: the command that enters a guest gets a session keyring of its own)
        more=(("contextd/attach.py", "        syscalls.join_new_session_keyring()\n", ""),),
    ),
    Mutant(
        "guest-types-into-the-admins-terminal",
        "a command entering a guest cannot type into the admin's terminal (TIOCSTI)",
        "contextd/attach.py",
        "            master, slave = _guest_pty(target)\n",
        "            master, slave = os.dup(0), os.dup(0)\n",
        ("tests/test_guest_attacks.py", "-k", "type_into_the_admins_terminal and privileged"),
        # (defended three times: a pty of the guest's own, and two new sessions)
        more=(
            (
                "contextd/attach.py",
                "        os.setsid()  # out of the admin's session and process group\n",
                "",
            ),
            (
                "contextd/attach.py",
                "        os.setsid()\n        if use_pty:\n"
                "            fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n",
                "",
            ),
        ),
    ),
    Mutant(
        "oci-destination-on-the-host",
        "an OCI mount destination is made inside the container's root, never on the host",
        "contextd/oci/init.py",
        '    pending = [p for p in destination.split("/") if p and p != "."]\n',
        "    if directory:\n        os.makedirs(rootfs + destination, exist_ok=True)\n"
        "    return rootfs + destination\n"
        '    pending = [p for p in destination.split("/") if p and p != "."]\n',
        ("tests/test_oci.py", "-k", "symlink"),
    ),
    Mutant(
        "oci-keeps-every-capability",
        "an OCI container holds the spec's bounding set only",
        "contextd/oci/init.py",
        "    drop_bounding_but(keep)\n",
        "    pass\n",
        ("tests/test_oci.py", "-k", "capabilities"),
    ),
    Mutant(
        "oci-no-seccomp",
        "an OCI container's calls pass contextd's seccomp filter",
        "contextd/oci/init.py",
        "    guest_filter.load()\n",
        "    pass\n",
        ("tests/test_oci.py", "-k", "capabilities"),
    ),
    Mutant(
        "create-writes-over-a-guest",
        "a create of a name in use is refused and changes nothing",
        "contextd/server.py",
        "        if name in existing or os.path.lexists(path):\n",
        "        if False:\n",
        ("tests/test_contextd.py::test_create_refuses_an_existing_name_and_changes_nothing",),
    ),
    Mutant(
        "alias-is-another-guest",
        "a limit set through a symlink to a guest is the guest's own, at once",
        "cowfs/host/guests.py",
        "        path = os.path.realpath(spec)\n        return Guest(Path(path).name, path)\n",
        "        path = os.path.abspath(spec)\n        return Guest(Path(path).name, path)\n",
        ("tests/test_limits.py::test_a_guest_named_through_a_symlink_is_the_guest_itself",),
    ),
    Mutant(
        "contextd-serves-anyone",
        "contextd serves root only: no verb of a host user does anything",
        "contextd/server.py",
        "        if _peer_uid(stream.socket) != 0:  # type: ignore[arg-type]\n",
        "        if False:\n",
        (
            "tests/test_host_user.py::"
            "test_every_contextd_verb_of_a_host_user_is_refused_by_the_daemon",
        ),
    ),
    # Cgroup v2 (tools/vm.sh run -- .venv/bin/python tools/mutants.py --only ...).
    Mutant(
        "exec-outside-cgroupns",
        "a command entering a guest is in the guest's cgroup namespace",
        "contextd/attach.py",
        "    | syscalls.CLONE_NEWCGROUP\n",
        "",
        ("tests/test_cgroup2.py", "-k", "limits_are_set_above and privileged"),
        cgroup2=True,
    ),
    Mutant(
        "cgroupns-at-host-root",
        "a guest's cgroup tree is its own subtree, below its limits",
        "contextd/supervisor.py",
        _CGROUPNS_MADE,
        _CGROUPNS_MADE_AT_HOST_ROOT,
        ("tests/test_cgroup2.py", "-k", "privileged and (raise or leave)"),
        cgroup2=True,
    ),
    Mutant(
        "cgroupns-before-the-move",
        "a guest's cgroup tree is its own subtree, not the cgroup contextd started it in",
        "contextd/supervisor.py",
        "        os.close(go_r)\n" + _CGROUPNS_MADE,
        "        os.close(go_r)\n",
        ("tests/test_cgroup2.py", "-k", "leave and privileged"),
        more=(("contextd/supervisor.py", _BEFORE_GO, _CGROUPNS_MADE + _BEFORE_GO),),
        cgroup2=True,
    ),
    Mutant(
        "exec-outside-cgroupns-no-delegated-level",
        "a privileged guest cannot raise its limits (no nsdelegate for a command entering it)",
        "contextd/attach.py",
        "    | syscalls.CLONE_NEWCGROUP\n",
        "",
        ("tests/test_cgroup2.py", "-k", "raise and privileged"),
        more=_NO_DELEGATED_LEVEL,
        cgroup2=True,
    ),
    Mutant(
        "limits-owned-by-the-guest",
        "a user-namespaced guest cannot raise its limits nor leave its subtree",
        "contextd/supervisor.py",
        _CGROUPNS_MADE,
        _CGROUPNS_MADE_AT_HOST_ROOT,
        ("tests/test_cgroup2.py", "-k", "userns and (raise or leave)"),
        more=(
            (
                "contextd/cgroups.py",
                "                    os.chown(path, uid, gid)\n",
                "                    os.chown(path, uid, gid)\n"
                "        for d, _s, files in os.walk(self.dirs.get('unified', '-')):\n"
                "            for path in [Path(d), *(Path(d) / f for f in files)]:\n"
                "                os.chown(path, uid, gid)\n",
            ),
        ),
        cgroup2=True,
    ),
)


def cgroup2_host() -> bool:
    """True if this host's memory, cpu and pids controllers are on the unified hierarchy."""
    try:
        controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    except OSError:
        return False
    return {"memory", "cpu", "pids"} <= set(controllers)


def remove_scratch() -> None:
    if (ROOT / ".git").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(SCRATCH)])
    shutil.rmtree(SCRATCH, ignore_errors=True)


def scratch_checkout() -> Path:
    """A worktree of HEAD at SCRATCH with the built native modules copied in (a copy of
    the tree where it is no git checkout: tools/vm.sh's, a git archive)."""
    if SCRATCH.exists():
        remove_scratch()
    if not (ROOT / ".git").exists():
        ignored = shutil.ignore_patterns(".venv", "__pycache__", "*.egg-info", ".*_cache")
        shutil.copytree(ROOT, SCRATCH, symlinks=True, ignore=ignored)
        return SCRATCH
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(SCRATCH), "HEAD"],
        check=True,
    )
    for built in [*(ROOT / "native").glob("*.so"), ROOT / "native" / "contextd-supervise"]:
        shutil.copy2(built, SCRATCH / "native" / built.name)
    return SCRATCH


def run_tests(tests: tuple[str, ...], tree: Path) -> tuple[int, list[str], list[str]]:
    """pytest's exit status, the tests that failed and those that errored (set-up)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", *tests],
        cwd=tree, env=env, capture_output=True, text=True, check=False, timeout=1800,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    failed = [line.split()[1] for line in lines if line.startswith("FAILED ")]
    errored = [line.split()[1] for line in lines if line.startswith("ERROR ")]
    return result.returncode, failed, errored


def run_mutant(mutant: Mutant, tree: Path) -> tuple[str, float]:
    """ "killed by TEST", "SURVIVED", "not applied" (its text is not in the file) or an
    error (a test's set-up failed: that proves nothing), and the seconds it took."""
    originals = {tree / path: (tree / path).read_text() for path, _old, _new in mutant.edits()}
    changed = dict(originals)
    for path, old, new in mutant.edits():
        if changed[tree / path].count(old) != 1:
            return "not applied", 0.0
        changed[tree / path] = changed[tree / path].replace(old, new)
    began = time.monotonic()
    try:
        for file, text in changed.items():
            file.write_text(text)
        status, failed, errored = run_tests(mutant.tests, tree)
    finally:
        for file, text in originals.items():
            file.write_text(text)
    took = time.monotonic() - began
    if status == 1 and failed and not errored:
        return f"killed by {failed[0]}", took
    if status == 0:
        return "SURVIVED", took
    return f"error (pytest exit {status}; set-up errors: {errored})", took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--markdown", action="store_true", help="a table for tests/MUTANTS.md")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        known = {m.name for m in MUTANTS}
        sys.exit(f"mutants.py: unknown mutant(s): {', '.join(set(args.only) - known)}")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.promise} ({m.path})")
        return
    if os.geteuid() != 0:
        sys.exit("mutants.py: run as root (the tests mount FUSE filesystems)")
    vm_only = [m.name for m in chosen if m.cgroup2]
    if vm_only and not cgroup2_host():
        where = f"tools/vm.sh run -- .venv/bin/python tools/mutants.py --only {' '.join(vm_only)}"
        if args.only:
            sys.exit(f"mutants.py: cgroup v2 only (this host has v1; {where})")
        print(f"left out, cgroup v2 only: {' '.join(vm_only)} ({where})", file=sys.stderr)
        chosen = [m for m in chosen if not m.cgroup2]
    tree = scratch_checkout()
    results = []
    try:
        # The control: unchanged, every chosen mutant's tests pass in the scratch copy.
        for tests in dict.fromkeys(m.tests for m in chosen):
            status, failed, errored = run_tests(tests, tree)
            if status != 0:
                sys.exit(f"mutants.py: {' '.join(tests)} fail without a mutant: {failed + errored}")
        for m in chosen:
            outcome, took = run_mutant(m, tree)
            results.append((m, outcome, took))
            print(f"{m.name}: {outcome} ({took:.0f} s)", file=sys.stderr, flush=True)
    finally:
        remove_scratch()
    killed = sum(outcome.startswith("killed") for _, outcome, _ in results)
    if args.markdown:
        print("| mutant | what it breaks | tests | outcome |")
        print("|---|---|---|---|")
        for m, outcome, _ in results:
            print(f"| {m.name} | {m.promise} | `{' '.join(m.tests)}` | {outcome} |")
        print()
    print(f"{killed} of {len(results)} mutants killed")
    if killed != len(results):
        sys.exit(1)


if __name__ == "__main__":
    main()
