"""Tab completion of contextd's verbs and guest names, through click's own protocol (what
the bash and zsh scripts it prints call)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from contextd_harness import CONTEXTD


def _complete(config_dir: Path, shell: str, *words: str) -> list[str]:
    env = {
        **os.environ,
        "_CONTEXTD_COMPLETE": f"{shell}_complete",
        "COMP_WORDS": " ".join(["contextd", *words]),
        "COMP_CWORD": str(len(words)),
        "CONTEXTD_CONFIG_DIR": str(config_dir),
    }
    done = subprocess.run([CONTEXTD], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_guest_names_complete_from_the_configurations(tmp_path: Path) -> None:
    for name in ("web1", "web2", "mail"):
        (tmp_path / f"{name}.toml").write_text('xid = 5\nroot = "/x"\n')
    assert _complete(tmp_path, "bash", "start", "we") == ["plain,web1", "plain,web2"]
    assert _complete(tmp_path, "bash", "stop", "") == ["plain,mail", "plain,web1", "plain,web2"]
    assert "plain,status" in _complete(tmp_path, "bash", "st")
    # zsh gets a description line with each
    assert _complete(tmp_path, "zsh", "exec", "m")[:3] == ["plain", "mail", "_"]
    # a new guest's name is not an existing one's
    assert not [w for w in _complete(tmp_path, "bash", "create", "we") if "web" in w]


def test_the_scripts_for_each_shell_are_printed(tmp_path: Path) -> None:
    for shell in ("bash", "zsh"):
        env = {**os.environ, "_CONTEXTD_COMPLETE": f"{shell}_source"}
        done = subprocess.run([CONTEXTD], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "_CONTEXTD_COMPLETE" in done.stdout, done.stderr
