#!/usr/bin/env bash
# Build and install pyfuse3 with cowfs's patch (native/pyfuse3/cowfs.patch) into
# the given virtualenv's pip. Skips the work when the patched version is there.
#   tools/build-pyfuse3.sh [VENV [LIBFUSE_PREFIX]]
# With LIBFUSE_PREFIX (a libfuse >= 3.17 from tools/build-libfuse.sh), pyfuse3 is
# built against that libfuse, with an rpath to it (no LD_LIBRARY_PATH needed).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
libfuse=${2:-}
version=3.5.0
local_version=$version+cowfs13
# Built against the private libfuse, it says so: a build against the system's is redone.
[ -z "$libfuse" ] || local_version=$local_version.libfuse317
if "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('pyfuse3') != '$local_version')" 2>/dev/null; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv/bin/pip" download --quiet --no-binary :all: --no-deps "pyfuse3==$version" -d "$work"
tar -xzf "$work/pyfuse3-$version.tar.gz" -C "$work"
patch -d "$work/pyfuse3-$version" -p1 --quiet < native/pyfuse3/cowfs.patch
rm -f "$work/pyfuse3-$version/src/pyfuse3/__init__.c"  # generated from the patched .pyx
if [ -n "$libfuse" ]; then
    libfuse=$(realpath "$libfuse")
    export PKG_CONFIG_PATH="$libfuse/lib/pkgconfig"
    # -L here too: setuptools puts the Python's own library directory (Debian's python3:
    # /usr/lib/x86_64-linux-gnu, where the system's libfuse3.so is) before pkg-config's
    # -L, and pyfuse3 would link to libfuse 3.14 while compiled against 3.17's headers.
    export LDFLAGS="-L$libfuse/lib -Wl,-rpath,$libfuse/lib ${LDFLAGS:-}"
fi
SETUPTOOLS_SCM_PRETEND_VERSION=$local_version "$venv/bin/pip" install --quiet --no-cache-dir "$work/pyfuse3-$version"
if ! "$venv/bin/python" -c "import pyfuse3" 2>"$work/import.err"; then
    cat "$work/import.err" >&2
    echo "tools/build-pyfuse3.sh: the pyfuse3 just built does not load" >&2
    exit 1
fi
