#!/usr/bin/env bash
# Build libfuse 3.17 (FUSE passthrough: fuse_passthrough_open, FUSE_CAP_PASSTHROUGH)
# into a private prefix, next to the system's libfuse 3.14 (bookworm), never over it.
# The source is Debian trixie's fuse3 package (upstream tarball + Debian's patches),
# fetched from the Debian pool and checked against the hashes of its .dsc.
# Idempotent: does nothing when the prefix already holds this version.
#   tools/build-libfuse.sh [PREFIX]     (default: .venv/libfuse, where tools/install.sh puts it)
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$(realpath -m "${1:-.venv/libfuse}")
version=3.17.2
debian_revision=3
pool=${DEBIAN_POOL:-http://deb.debian.org/debian/pool/main/f/fuse3}
orig_sha256=3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f
debian_sha256=eaf7a177761ae8bf99ea97619f2cccf83f169b4f000e17b6106834e69456b5a2

if [ "$(PKG_CONFIG_PATH="$prefix/lib/pkgconfig" pkg-config --modversion fuse3 2>/dev/null)" = "$version" ] \
        && [ -e "$prefix/lib/libfuse3.so.$version" ]; then
    exit 0
fi

need=()
for p in meson ninja-build pkgconf gcc curl xz-utils patch; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
orig=fuse3_$version.orig.tar.gz
deb=fuse3_$version-$debian_revision.debian.tar.xz
curl -fsSL -o "$work/$orig" "$pool/$orig"
curl -fsSL -o "$work/$deb" "$pool/$deb"
echo "$orig_sha256  $work/$orig" | sha256sum -c --quiet
echo "$debian_sha256  $work/$deb" | sha256sum -c --quiet
tar -xzf "$work/$orig" -C "$work"
src="$work/fuse-$version"
tar -xJf "$work/$deb" -C "$src"
while read -r p; do
    case "$p" in ''|'#'*) continue ;; esac
    patch -d "$src" -p1 --quiet < "$src/debian/patches/$p"
done < "$src/debian/patches/series"

# Only the library and its headers: no fusermount3 (not setuid, not in PATH; as
# root libfuse mounts with mount(2) itself), no examples, no tests, no init script.
meson setup "$work/build" "$src" --prefix="$prefix" --libdir=lib --buildtype=release \
    -Dutils=false -Dexamples=false -Dtests=false -Duseroot=false -Dinitscriptdir= \
    -Ddisable-mtab=true >/dev/null
ninja -C "$work/build" >/dev/null
ninja -C "$work/build" install >/dev/null
PKG_CONFIG_PATH="$prefix/lib/pkgconfig" pkg-config --modversion fuse3
