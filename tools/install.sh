#!/usr/bin/env bash
# Install everything cowfs needs on a Debian machine, as root: system packages
# (FUSE 3, busybox-static for test guests, the benchmark peers) and the Python
# environment in .venv with cowfs installed in it. Safe to run twice: it only
# installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# --system: then the system install too (tools/system.sh: PATH, man, completion, unit).
system=
case ${1:-} in
    --system) system=yes ;;
    "") ;;
    *) echo "usage: tools/install.sh [--system]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "tools/install.sh: must run as root (it installs packages and mounts FUSE)" >&2
    exit 1
fi

packages=(
    fuse3 libfuse3-dev pkg-config gcc make patch  # FUSE; building pyfuse3 and native/
    meson ninja-build curl xz-utils            # libfuse 3.17 for FUSE passthrough (tools/build-libfuse.sh)
    liburing-dev                               # native/_uring_build.py (io_uring reads)
    busybox-static attr acl libcap2-bin        # test guests; getfattr, setfacl, setcap
    debootstrap                                # real Debian guests (tools/mkguest-debian.sh)
    fuse-overlayfs jdupes rdfind hyperfine     # benchmark peers
    systemd-container                          # systemd-nspawn, a peer in bench/contextd_bench.py
    iproute2                                   # guest networking (veth, bridges)
    libseccomp2 keyutils                       # guests' seccomp filter; keyctl for its tests
    uidmap                                     # newuidmap: tests/test_host_ids.py, a host user taking subordinate ids
    shellcheck strace                          # tools/test.sh checks the shell scripts; test_faults holds a server with strace
    xfsprogs btrfs-progs e2fsprogs             # loop filesystems for reflink tests and benches
    podman runc containerd                     # engines that drive contextd-oci (tests/test_oci.py); runc a bench peer
    python3-venv
)
# shellcheck source=tools/packages.sh
. tools/packages.sh
install_missing_packages "${packages[@]}"

[ -e /dev/fuse ] || modprobe fuse

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# Reinstall only when what the install builds from has changed.
stamp=.venv/.cowfs-installed
want=$(cat pyproject.toml setup.py native/_build.py native/_uring_build.py native/pyfuse3/cowfs.patch \
    tools/build-pyfuse3.sh tools/build-libfuse.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import native._syscalls, native._uring" 2>/dev/null; then
    log=.venv/install.log
    : >"$log"
    # libfuse 3.17 in the venv's own prefix, beside the system's 3.14 (bookworm),
    # for FUSE passthrough (guests share the page cache of the files they share).
    # Without it (no network to the Debian pool) cowfs works as before, without
    # passthrough, and says so when it mounts; the next run tries again.
    libfuse=.venv/libfuse
    if ! tools/build-libfuse.sh "$libfuse" >>"$log" 2>&1; then
        echo "tools/install.sh: libfuse 3.17 could not be built (see $log): no FUSE passthrough" >&2
        libfuse=
        rm -f "$stamp"
    fi
    # pyfuse3 with cowfs's patch first (native/pyfuse3/README.md), then cowfs itself.
    if ! { .venv/bin/pip install --upgrade pip && tools/build-pyfuse3.sh .venv $libfuse \
            && .venv/bin/pip install -e '.[test]'; } >>"$log" 2>&1; then
        tail -30 "$log" >&2
        echo "tools/install.sh: pip install failed; full log in $log" >&2
        exit 1
    fi
    [ -z "$libfuse" ] || echo "$want" > "$stamp"
fi
# A guest's supervisor once the guest runs (native/supervise.c): a small C program, so that
# an idle guest does not keep a Python process of its own for it.
if [ ! -x native/contextd-supervise ] || [ native/supervise.c -nt native/contextd-supervise ]; then
    gcc -O2 -Wall -Wextra -Werror -o native/contextd-supervise.new native/supervise.c
    mv native/contextd-supervise.new native/contextd-supervise
fi
# Bytecode for the project's own modules, written even where PYTHONDONTWRITEBYTECODE
# is set: without it every cowfs and contextd command compiles its modules anew
# (20-40 ms of each start here). Up-to-date files are skipped.
.venv/bin/python -m compileall -q cowfs contextd native >/dev/null

# The host layout, reachable by root only (cowfs/host/barrier.py): a host user who could
# reach a guest's tree could run its setuid files as root, read and write its users'
# files and write the inodes every guest shares. Made if missing, repaired if opened;
# cowfs does the same whenever it uses the layout (but refuses, rather than chowns,
# a part of it owned by another user).
layout=${COWFS_ROOT:-/var/lib/cowfs}
install -d -m 0700 -o root -g root "$layout" "$layout/guests"
for path in "$layout" "$layout/guests" "$layout/store" "$layout/state.db" \
        "$layout/state.db-wal" "$layout/state.db-shm" "$layout/state.db-journal"; do
    if [ -e "$path" ]; then
        chown root:root "$path"
        chmod go= "$path"
    fi
done
if [ -n "$system" ]; then
    tools/system.sh install
fi
