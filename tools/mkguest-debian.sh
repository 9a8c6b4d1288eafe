#!/usr/bin/env bash
# Make DIR a real Debian guest: debootstrap --variant=minbase bookworm, cached.
# The first call on a machine runs debootstrap into the cache
# (/var/cache/cowfs/debian/bookworm-minbase-SLOT, SLOT 1 by default); every
# call then copies the cached tree to DIR with cp -a. Two SLOTs give two
# independent debootstraps (their apt/dpkg files differ in mtimes, as two
# separately installed guests do).
#   usage: mkguest-debian.sh DIR [SLOT]
set -euo pipefail
dir=${1:?usage: mkguest-debian.sh DIR [SLOT]}
slot=${2:-1}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${COWFS_GUEST_CACHE:-/var/cache/cowfs/debian}/$suite-minbase-$slot
if [ -e "$dir" ]; then
    echo "mkguest-debian.sh: $dir already exists" >&2
    exit 1
fi
if [ ! -e "$cache/.complete" ]; then
    command -v debootstrap >/dev/null || { echo "mkguest-debian.sh: debootstrap is not installed" >&2; exit 1; }
    rm -rf "$cache" "$cache.partial"
    mkdir -p "$(dirname "$cache")"
    echo "mkguest-debian.sh: debootstrap $suite into $cache (once per machine)" >&2
    if ! debootstrap --variant=minbase "$suite" "$cache.partial" "$mirror" >"$cache.log" 2>&1; then
        tail -20 "$cache.log" >&2
        echo "mkguest-debian.sh: debootstrap failed; log in $cache.log" >&2
        exit 1
    fi
    mv "$cache.partial" "$cache"
    touch "$cache/.complete"
fi
mkdir -p "$(dirname "$dir")"
cp -a "$cache" "$dir"
rm -f "$dir/.complete"
