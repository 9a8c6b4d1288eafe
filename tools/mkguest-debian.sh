#!/usr/bin/env bash
# Make DIR a real Debian guest: debootstrap --variant=minbase bookworm, cached.
#
#   usage: mkguest-debian.sh [--init systemd|sysvinit] [--packages "PKG ..."] DIR [SLOT]
#
# The first call on a machine for a given init and package list runs
# debootstrap into the cache (/var/cache/cowfs/debian/bookworm-minbase[-INIT]
# [-HASH]-SLOT, SLOT 1 by default); every call then copies the cached tree to
# DIR with cp -a. Two SLOTs give two independent debootstraps (their apt/dpkg
# files differ in mtimes, as two separately installed guests do).
#
# --init systemd   systemd-sysv and dbus: the guest boots with contextd's
#                  default init (/sbin/init) and stops on SIGRTMIN+3.
# --init sysvinit  sysvinit-core: /etc/inittab has no gettys (a guest has no
#                  virtual consoles; contextd logs the console instead) and
#                  Ctrl-Alt-Del (SIGINT, contextd's stop signal for it) halts.
# --packages       more packages (e.g. "openssh-server cron nginx-light").
set -euo pipefail
init=""
packages=""
while [ $# -gt 0 ]; do
    case "$1" in
        --init) init=${2:?--init needs systemd or sysvinit}; shift 2 ;;
        --packages) packages=${2:?--packages needs a list}; shift 2 ;;
        --) shift; break ;;
        -*) echo "mkguest-debian.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
dir=${1:?usage: mkguest-debian.sh [--init systemd|sysvinit] [--packages "PKG ..."] DIR [SLOT]}
slot=${2:-1}
case "$init" in
    "") include="" ;;
    systemd) include="systemd-sysv,dbus" ;;
    sysvinit) include="sysvinit-core" ;;
    *) echo "mkguest-debian.sh: --init must be systemd or sysvinit, not $init" >&2; exit 2 ;;
esac
for pkg in $packages; do
    include=${include:+$include,}$pkg
done
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
variant=$suite-minbase${init:+-$init}
if [ -n "$packages" ]; then
    variant=$variant-$(printf '%s' "$packages" | sha256sum | cut -c1-8)
fi
cache=${COWFS_GUEST_CACHE:-/var/cache/cowfs/debian}/$variant-$slot
if [ -e "$dir" ]; then
    echo "mkguest-debian.sh: $dir already exists" >&2
    exit 1
fi
if [ ! -e "$cache/.complete" ]; then
    command -v debootstrap >/dev/null || { echo "mkguest-debian.sh: debootstrap is not installed" >&2; exit 1; }
    rm -rf "$cache" "$cache.partial"
    mkdir -p "$(dirname "$cache")"
    echo "mkguest-debian.sh: debootstrap $variant into $cache (once per machine)" >&2
    if ! debootstrap --variant=minbase ${include:+--include="$include"} "$suite" \
            "$cache.partial" "$mirror" >"$cache.log" 2>&1; then
        tail -20 "$cache.log" >&2
        echo "mkguest-debian.sh: debootstrap failed; log in $cache.log" >&2
        exit 1
    fi
    if [ "$init" = sysvinit ]; then
        # No virtual consoles in a guest: no gettys; Ctrl-Alt-Del halts rather than reboots.
        sed -i -e 's/^\([1-6]:[0-9]*:respawn:\)/#\1/' \
            -e 's|^ca:12345:ctrlaltdel:.*|ca:12345:ctrlaltdel:/sbin/shutdown -t1 -a -h now|' \
            "$cache.partial/etc/inittab"
    fi
    mv "$cache.partial" "$cache"
    touch "$cache/.complete"
fi
mkdir -p "$(dirname "$dir")"
cp -a "$cache" "$dir"
rm -f "$dir/.complete"
