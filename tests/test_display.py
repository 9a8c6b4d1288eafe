"""Paths printed by the CLI stay one printable line whatever bytes a guest's names hold."""

from __future__ import annotations

import os

from cowfs.cli.display import display_path


def test_plain_paths_print_as_they_are() -> None:
    assert display_path("/guests/a/usr/bin/perl5.36.0") == "/guests/a/usr/bin/perl5.36.0"


def test_control_characters_backslashes_and_bad_utf8_are_escaped() -> None:
    name = os.fsdecode(b"/g/a\nb\tc\\d\xff\x7f")
    assert display_path(name) == "/g/a\\nb\\tc\\\\d\\xff\\x7f"
    assert display_path(b"/g/a\nb\xff") == "/g/a\\nb\\xff"


def test_printable_unicode_is_kept() -> None:
    assert display_path("/g/café") == "/g/café"
