"""tools/system.sh: the commands on PATH, man pages that agree with --help, completion,
the systemd unit and a root-only host layout; and an uninstall that takes it all back."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: object, env: dict[str, str]) -> str:
    done = subprocess.run(
        [str(a) for a in args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (args, done.stderr)
    return done.stdout


def test_system_install_then_uninstall(tmp_path: Path) -> None:
    prefix, units = tmp_path / "usr", tmp_path / "units"
    env = {
        **os.environ,
        "COWFS_ROOT": str(tmp_path / "layout"),
        "CONTEXTD_CONFIG_DIR": str(tmp_path / "etc"),
        "LANG": "C",
        "MANWIDTH": "200",
        "PATH": f"{prefix / 'sbin'}:{os.environ['PATH']}",
    }
    system = ROOT / "tools" / "system.sh"
    _run(system, "install", "--prefix", prefix, "--unit-dir", units, env=env)
    assert _run("contextd", "--version", env=env).startswith("contextd, version")
    assert _run("contextd-oci", "--version", env=env).startswith("contextd-oci, version")
    assert (prefix / "sbin" / "cowfs").resolve() == ROOT / ".venv" / "bin" / "cowfs"
    # man pages, made from the commands: every option --help names is in the page
    man = ["man", "-M", prefix / "share" / "man"]
    assert "boot, stop, enter and account guests" in _run(*man, "8", "contextd", env=env)
    for command, verb in [
        ("contextd", "serve"),
        ("contextd", "start"),
        ("contextd", "exec"),
        ("contextd", "create"),
        ("cowfs", "mount"),
        ("cowfs", "hashify"),
        ("contextd-oci", "create"),
        ("contextd-oci", "exec"),
    ]:
        helped = _run(command, verb, "--help", env=env)
        page = _run(*man, "8", f"{command}-{verb}", env=env)
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", helped)) - {"--help"}
        assert options or verb in ("start", "exec"), (command, verb)  # (only --help)
        for option in options:
            assert option in page, (command, verb, option)
    # completion: bash, through the installed script, completes a guest's name
    (tmp_path / "etc" / "web1.toml").write_text('xid = 5\nroot = "/x"\n')
    script = prefix / "share" / "bash-completion" / "completions" / "contextd"
    completed = _run(
        "bash",
        "-c",
        f"source {script}; COMP_WORDS=(contextd start we); COMP_CWORD=2;"
        ' _contextd_completion contextd start we; echo "${COMPREPLY[@]}"',
        env=env,
    )
    assert completed.strip() == "web1"
    assert (prefix / "share" / "zsh" / "site-functions" / "_contextd").exists()
    # the unit runs this checkout's daemon, with the fd limit its FUSE servers need
    unit = (units / "contextd.service").read_text()
    assert f"ExecStart={ROOT}/.venv/bin/contextd serve $CONTEXTD_OPTS\n" in unit
    assert "EnvironmentFile=-/etc/default/contextd\n" in unit  # options, as Debian's
    assert "LimitNOFILE=1048576" in unit and "KillMode=process" in unit
    # the host layout and the configuration directory: root's alone
    for made in (tmp_path / "layout", tmp_path / "etc"):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    _run(system, "uninstall", "--prefix", prefix, "--unit-dir", units, env=env)
    assert [p for p in prefix.rglob("*") if not p.is_dir()] == []
    assert not (units / "contextd.service").exists()
    assert (tmp_path / "layout").is_dir()  # guests and their state stay


def test_bad_arguments_change_nothing(tmp_path: Path) -> None:
    for args in (["reinstall"], ["install", "--prefix"], ["install", "--colour"]):
        done = subprocess.run(
            [str(ROOT / "tools" / "system.sh"), *args], capture_output=True, text=True
        )
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (args, done.stderr)
