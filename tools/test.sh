#!/usr/bin/env bash
# Install what is missing, then run the whole test suite (as root: real FUSE
# mounts, namespaces and cgroups) and the linters. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install.sh
.venv/bin/ruff check cowfs contextd native tests tools bench
.venv/bin/ruff format --check --quiet cowfs contextd native tests tools bench
.venv/bin/mypy cowfs contextd native tests bench
shellcheck --severity=warning tools/*.sh .ci/run
.venv/bin/pytest -q -rs "$@"  # -rs: every skip and why
