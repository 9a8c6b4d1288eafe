"""Which paths of a guest hashify may unify: include/exclude rules, first match wins.

Paths are guest-absolute (``/usr/bin/perl``). A pattern is a shell glob
(``*``, ``?``, ``[...]``; ``*`` also matches ``/``) matched against the whole
path; a pattern also matches everything below a directory it matches, so
``/etc`` excludes ``/etc/passwd``. Rules are tried in order: the user's
``--include``/``--exclude`` options as given, then ``--exclude-from`` files,
then the defaults. A path no rule matches is included.

The defaults follow util-vserver's vunify-exclude: configuration, state,
users' data and virtual filesystems are a guest's own business and change
often, so sharing them saves little and costs a link break soon.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from cowfs.errors import CowfsError

DEFAULT_EXCLUDES: tuple[str, ...] = (
    "/etc",
    "/var",
    "/tmp",
    "/home",
    "/root",
    "/run",
    "/proc",
    "/dev",
    "/sys",
    "/boot",
)


class Rule:
    """One include or exclude pattern."""

    __slots__ = ("include", "pattern", "regex_source")

    def __init__(self, include: bool, pattern: str):
        self.include = include
        self.pattern = pattern
        body = fnmatch.translate(pattern.rstrip("/") or "/")
        # fnmatch.translate gives "(?s:...)\\Z"; also match anything below the path.
        self.regex_source = body[:-2].encode("utf-8", "surrogateescape") + rb"(?:/.*)?\Z"

    def literal_prefix(self) -> str:
        """The pattern up to its first wildcard."""
        cut = min((i for i, c in enumerate(self.pattern) if c in "*?["), default=len(self.pattern))
        return self.pattern[:cut]


class Rules:
    """An ordered rule list deciding, per path, whether hashify may touch it."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self._include_prefixes = [r.literal_prefix() for r in rules if r.include]
        # All rules as one regex, in order: the engine tries alternatives left
        # to right, so the group that matched is the first rule that matches,
        # found in one match per path instead of one per rule.
        self._any = re.compile(
            b"|".join(b"(?P<rule%d>%s)" % (i, r.regex_source) for i, r in enumerate(rules))
            or rb"(?!)",
            re.S,
        )
        self._verdicts = {f"rule{i}": r.include for i, r in enumerate(rules)}

    @classmethod
    def build(
        cls,
        includes_excludes: list[tuple[bool, str]],
        exclude_from: list[Path],
        use_defaults: bool = True,
    ) -> Rules:
        """Rules from the options (in command-line order), files, then the defaults."""
        rules = [Rule(inc, _check_pattern(p)) for inc, p in includes_excludes]
        for path in exclude_from:
            try:
                lines = path.read_text().splitlines()
            except OSError as e:
                raise CowfsError(f"--exclude-from {path}: {e.strerror}") from None
            for number, line in enumerate(lines, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                include = line.startswith("+")
                if line[0] in "+-":
                    line = line[1:].strip()
                try:
                    rules.append(Rule(include, _check_pattern(line)))
                except CowfsError as e:
                    raise CowfsError(f"--exclude-from {path}, line {number}: {e}") from None
        if use_defaults:
            rules += [Rule(False, p) for p in DEFAULT_EXCLUDES]
        return cls(rules)

    def included(self, path: bytes) -> bool:
        """True if hashify may unify the file at path."""
        match = self._any.match(path)
        # The rule's group closes last, after any group inside its pattern.
        return True if match is None else self._verdicts[match.lastgroup or ""]

    def may_descend(self, directory: bytes) -> bool:
        """False if nothing under directory can be included (the walk may skip it)."""
        if self.included(directory):
            return True
        below = directory.decode("utf-8", "surrogateescape").rstrip("/") + "/"
        return any(
            prefix.startswith(below) or below.startswith(prefix) or not prefix
            for prefix in self._include_prefixes
        )


def _check_pattern(pattern: str) -> str:
    if not pattern.startswith("/") and not pattern.startswith("*"):
        raise CowfsError(f"pattern {pattern!r}: must start with / (guest-absolute) or *")
    return pattern
