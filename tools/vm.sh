#!/usr/bin/env bash
# A Debian bookworm VM under qemu+KVM whose only cgroup hierarchy is the unified one
# (cgroup v2), systemd as PID 1, on Debian trixie's kernel (6.12: FUSE passthrough):
# where contextd's cgroup v2 code runs, on a host that has cgroup v1.
#
#   tools/vm.sh [--cache DIR] build
#   tools/vm.sh [--cache DIR] test [--commit REV | --worktree] [--timeout MIN] [PYTEST ARGS...]
#   tools/vm.sh [--cache DIR] run  [--commit REV | --worktree] [--timeout MIN] -- COMMAND...
#   tools/vm.sh [--cache DIR] shell
#
# build   makes what the VM needs, once, in the cache (DIR, default
#         /var/cache/cowfs-vm): qemu (Debian's qemu-system-x86), the kernel (the
#         newest linux-image-*-amd64 of trixie, from the Debian pool, checked against
#         the signed trixie index), a root image (debootstrap bookworm, systemd, the
#         packages tools/install.sh installs, that kernel and its initramfs) and a
#         data disk that keeps downloads between runs (debootstrapped test guests in
#         /var/cache/cowfs, pip's cache). A second build makes nothing. Run by test,
#         run and shell when needed.
# test    boots the VM (a throwaway overlay on the root image: every run starts from
#         the same system), checks that /sys/fs/cgroup is cgroup2 with the cpu, memory,
#         pids and io controllers and that no v1 hierarchy is mounted, gives it a clean
#         checkout of REV (default HEAD; --worktree: HEAD plus the uncommitted changes
#         of tracked files) at /root/cowfs, runs tools/install.sh (first in a chroot of
#         the VM's root on the host, at the host's speed: in the VM it finds it done), then
#         `.venv/bin/pytest PYTEST ARGS` (default: the contextd tests), prints the
#         output as it comes and exits with pytest's status (125: the VM failed).
# run     the same with COMMAND (run by bash -c in /root/cowfs) instead of pytest.
# shell   boots the VM with a root shell on its serial console (on this terminal;
#         Ctrl-A X ends qemu), HEAD installed in /root/cowfs.
#
# The VM: -enable-kvm -cpu host where the host has hardware virtualization (kvm_intel or
# kvm_amd), else qemu's emulation, TCG (VM_ACCEL=auto|kvm|tcg); -smp 2 -m 8G; kernel command line
# systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all, user-mode networking (apt and
# PyPI as on the host, whose local CA certificates and /etc/pip.conf it gets), the
# serial console in RUN/console.log, a 9p share (RUN/share, /mnt/host inside) that
# carries the job in and its output and exit status out. A job runs as a systemd
# service (vm-job.service) without a terminal, as CI runs, and powers the VM off.
# Environment: VM_MEMORY (8G), VM_CPUS (2), DEBIAN_MIRROR.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${VM_CACHE:-/var/cache/cowfs-vm}
memory=${VM_MEMORY:-8G}
cpus=${VM_CPUS:-2}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
accel=${VM_ACCEL:-auto}
# panic=-1 with qemu's -no-reboot: a kernel that panics (or oopses: oops=panic) ends qemu
# rather than leaving a run hanging until its timeout.
cmdline="root=/dev/vda rw console=ttyS0 panic=-1 oops=panic"
cmdline+=" systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all"
minimum_kernel=6.9
root_size=40G
data_size=24G
checkout_size=16G
# Bump when the root image's recipe changes: an image built by another recipe is rebuilt.
recipe=2

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}

die() {
    echo "tools/vm.sh: $*" >&2
    exit 1
}

log() {
    echo "vm: $*" >&2
}

# shellcheck source=tools/packages.sh
. "$repo/tools/packages.sh"

# mkfs.ext4 -d: an ext4 image of a directory (it says "Creating regular file" even with -q).
make_ext4() {
    local label=$1 directory=$2 image=$3 size=$4 output
    if ! output=$(mkfs.ext4 -q -L "$label" -d "$directory" "$image" "$size" 2>&1); then
        echo "$output" >&2
        die "mkfs.ext4 of $directory failed"
    fi
}

# --- the kernel --------------------------------------------------------------------

# The field FIELD of the stanza of PACKAGE in the Packages index INDEX.
package_field() {
    local index=$1 package=$2 field=$3
    awk -v RS= -F '\n' -v want="Package: $package" -v field="$field: " '
        { for (i = 1; i <= NF; i++) if ($i == want) { found = 1; break } }
        found {
            for (i = 1; i <= NF; i++) if (index($i, field) == 1) print substr($i, length(field) + 1)
            exit
        }' "$index"
}

# The newest trixie kernel (what linux-image-amd64 depends on) into $cache/kernel:
# InRelease checked with the Debian archive keyring, Packages.xz and the .deb
# checked against the hashes that signature covers.
fetch_kernel() {
    local dir=$cache/kernel
    if compgen -G "$dir/linux-image-*.deb" >/dev/null; then
        return
    fi
    install_missing_packages curl xz-utils gpgv debian-archive-keyring
    local work=$dir.partial
    rm -rf "$work"
    mkdir -p "$work"
    local dists=$mirror/dists/trixie
    curl -fsSL -o "$work/InRelease" "$dists/InRelease"
    gpgv --quiet --keyring /usr/share/keyrings/debian-archive-keyring.gpg \
        --output "$work/Release" "$work/InRelease" 2>/dev/null \
        || die "trixie's InRelease does not verify against the Debian archive keyring"
    local index_sha
    index_sha=$(awk '/^SHA256:/ { in_sha = 1; next } /^[^ ]/ { in_sha = 0 }
        in_sha && $3 == "main/binary-amd64/Packages.xz" { print $1 }' "$work/Release")
    [ -n "$index_sha" ] || die "trixie's Release names no main/binary-amd64/Packages.xz"
    curl -fsSL -o "$work/Packages.xz" "$dists/main/binary-amd64/by-hash/SHA256/$index_sha"
    echo "$index_sha  $work/Packages.xz" | sha256sum -c --quiet
    xz -dc "$work/Packages.xz" >"$work/Packages"
    local image
    image=$(package_field "$work/Packages" linux-image-amd64 Depends | sed -E 's/^([^ ,]+).*/\1/')
    [ -n "$image" ] || die "trixie has no linux-image-amd64"
    local version
    version=$(package_field "$work/Packages" "$image" Version)
    if ! dpkg --compare-versions "$version" ge "$minimum_kernel"; then
        die "trixie's kernel is $version, older than $minimum_kernel"
    fi
    local filename sha
    filename=$(package_field "$work/Packages" "$image" Filename)
    sha=$(package_field "$work/Packages" "$image" SHA256)
    [ -n "$filename" ] || die "no Filename for $image in trixie's index"
    [ -n "$sha" ] || die "no SHA256 for $image in trixie's index"
    log "fetching $image $version"
    curl -fsSL -o "$work/kernel.deb" "$mirror/$filename"
    echo "$sha  $work/kernel.deb" | sha256sum -c --quiet
    mkdir -p "$dir"
    mv "$work/kernel.deb" "$dir/${filename##*/}"
    rm -rf "$work"
}

# --- the root image ----------------------------------------------------------------

# The packages tools/install.sh installs (its packages=( ... ) list).
install_sh_packages() {
    sed -n '/^packages=(/,/^)/p' "$repo/tools/install.sh" | sed -e '1d' -e '$d' -e 's/#.*//' | xargs
}

# Configure the root tree $1 (debootstrapped) for the VM.
configure_root() {
    local root=$1
    echo cowfs-vm >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tcowfs-vm\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        >"$root/etc/hosts"
    cat >"$root/etc/fstab" <<'EOF'
/dev/vda / ext4 rw,errors=remount-ro 0 1
/dev/vdb /var/cache/vm ext4 rw,nofail 0 2
/var/cache/vm/cowfs /var/cache/cowfs none bind,nofail,x-systemd.requires-mounts-for=/var/cache/vm 0 0
/var/cache/vm/root-cache /root/.cache none bind,nofail,x-systemd.requires-mounts-for=/var/cache/vm 0 0
/dev/vdc /root/cowfs ext4 rw,nofail 0 2
host /mnt/host 9p trans=virtio,version=9p2000.L,msize=1048576,nofail 0 0
EOF
    mkdir -p "$root/var/cache/vm" "$root/var/cache/cowfs" "$root/root/.cache" "$root/mnt/host" \
        "$root/root/cowfs"
    printf '9p\n9pnet_virtio\n' >"$root/etc/modules-load.d/vm-share.conf"
    cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
EOF
    # qemu's user-mode network: the address, gateway and DNS server it always gives.
    cat >"$root/etc/systemd/network/10-slirp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
DNS=10.0.2.3
EOF
    rm -f "$root/etc/resolv.conf"
    echo "nameserver 10.0.2.3" >"$root/etc/resolv.conf"
    # Reach HTTPS as the host does: its local CA certificates and pip configuration.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null
    fi
    [ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$root/etc/pip.conf"
    # Root logs in on the serial console without a password (tools/vm.sh shell).
    chroot "$root" passwd -dq root
    mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
    cat >"$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
EOF
    cat >"$root/etc/systemd/system/vm-job.service" <<'EOF'
[Unit]
Description=the job tools/vm.sh put in /mnt/host
ConditionPathExists=/mnt/host/job.sh
Wants=network-online.target
After=network-online.target local-fs.target remote-fs.target

[Service]
Type=oneshot
Environment=HOME=/root LANG=C.UTF-8
WorkingDirectory=/root
StandardInput=null
TimeoutStartSec=infinity
LimitNOFILE=1048576
TasksMax=infinity
ExecStart=/bin/sh -c 'bash /mnt/host/job.sh >/mnt/host/output.log 2>&1; echo $? >/mnt/host/status.new; mv /mnt/host/status.new /mnt/host/status'
ExecStopPost=/bin/systemctl poweroff --no-block

[Install]
WantedBy=multi-user.target
EOF
    chroot "$root" systemctl enable -q systemd-networkd.service systemd-networkd-wait-online.service \
        vm-job.service serial-getty@ttyS0.service
    chroot "$root" systemctl mask -q apt-daily.timer apt-daily-upgrade.timer man-db.timer \
        e2scrub_all.timer fstrim.timer 2>/dev/null || true
}

build_root_image() {
    local image=$cache/root.img
    if [ -f "$image" ] && [ "$(cat "$cache/root.recipe" 2>/dev/null)" = "$recipe" ]; then
        return
    fi
    install_missing_packages debootstrap e2fsprogs
    local deb
    deb=$(compgen -G "$cache/kernel/linux-image-*.deb" | head -1)
    local tree=$cache/root.tree
    rm -rf "$tree" "$image" "$cache/root.recipe"
    log "debootstrap bookworm into $tree (a few minutes)"
    if ! debootstrap --variant=minbase --include=systemd-sysv,udev,dbus,kmod,ca-certificates \
            bookworm "$tree" "$mirror" >"$cache/debootstrap.log" 2>&1; then
        tail -20 "$cache/debootstrap.log" >&2
        die "debootstrap failed (log: $cache/debootstrap.log)"
    fi
    # Fresh proc and sysfs, /dev bound without its submounts: nothing to unmount
    # below them that another namespace shares.
    mount -t proc proc "$tree/proc"
    mount -t sysfs sysfs "$tree/sys"
    mount --bind /dev "$tree/dev"
    # shellcheck disable=SC2064 # $tree is fixed now
    trap "umount '$tree/proc' '$tree/sys' '$tree/dev' 2>/dev/null || true" EXIT
    configure_root "$tree"
    local packages
    # shellcheck disable=SC2207 # the list is words
    packages=($(install_sh_packages))
    packages+=(
        linux-base initramfs-tools zstd              # the kernel's initramfs
        python3 python3-venv python3-dev git rsync   # a checkout's tools/install.sh and tests
        procps psmisc less man-db bash-completion    # a usable shell; man and completion
        iputils-ping netbase                         # what a minbase lacks for networking
    )
    log "installing ${#packages[@]} packages in the image"
    chroot "$tree" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@"' sh "${packages[@]}" \
        >"$cache/packages.log" 2>&1 || { tail -20 "$cache/packages.log" >&2; die "apt-get failed in the image"; }
    log "installing ${deb##*/} in the image"
    cp "$deb" "$tree/tmp/kernel.deb"
    chroot "$tree" dpkg -i /tmp/kernel.deb >"$cache/kernel.log" 2>&1 \
        || { tail -20 "$cache/kernel.log" >&2; die "the kernel did not install in the image"; }
    rm -f "$tree/tmp/kernel.deb"
    chroot "$tree" apt-get clean
    umount "$tree/proc" "$tree/sys" "$tree/dev"
    trap - EXIT
    local version
    version=$(basename "$(compgen -G "$tree/boot/vmlinuz-*" | head -1)")
    version=${version#vmlinuz-}
    [ -f "$tree/boot/initrd.img-$version" ] || die "no initramfs for $version in the image"
    cp "$tree/boot/vmlinuz-$version" "$cache/vmlinuz"
    cp "$tree/boot/initrd.img-$version" "$cache/initrd.img"
    log "making $image from $tree"
    make_ext4 cowfs-vm "$tree" "$image.new" "$root_size"
    mv "$image.new" "$image"
    echo "$recipe" >"$cache/root.recipe"
}

build_data_image() {
    [ ! -f "$cache/data.img" ] || return 0
    local tree
    tree=$(mktemp -d)
    mkdir -p "$tree/cowfs" "$tree/root-cache"
    make_ext4 cowfs-vm-data "$tree" "$cache/data.img.new" "$data_size"
    rm -rf "$tree"
    mv "$cache/data.img.new" "$cache/data.img"
}

build() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    mkdir -p "$cache"
    install_missing_packages qemu-system-x86 qemu-utils
    fetch_kernel
    build_root_image
    build_data_image
}

# --- running it --------------------------------------------------------------------

qemu_pid=
run_dir=

# How the VM's CPU runs: KVM where the host has hardware virtualization (kvm_intel,
# kvm_amd); else qemu's emulation (TCG): KVM without them (kvm_pvm, a hypervisor that
# runs only kernels built to be its guests) cannot boot Debian's kernel.
choose_accel() {
    if [ "$accel" = auto ]; then
        if [ -w /dev/kvm ] && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
            accel=kvm
        else
            accel=tcg
        fi
    fi
    case $accel in
        kvm) accel_args=(-enable-kvm -cpu host) ;;
        # One host thread for all the vCPUs: with a thread each (thread=multi), the
        # kernel's live patching of its own code (static keys) raced with the other
        # vCPU (an Oops on int3 at boot, 1 boot in 4); and it leaves a host CPU free.
        tcg) accel_args=(-accel "tcg,thread=single" -cpu max) ;;
        *) die "VM_ACCEL must be auto, kvm or tcg, not $accel" ;;
    esac
    log "CPU: $accel"
}

# Boot the VM on a fresh overlay of the root image, the share $run_dir/share at
# /mnt/host; serial console to $1 (a file, or "stdio").
boot() {
    local console=$1
    local accel_args
    choose_accel
    qemu-img create -q -f qcow2 -b "$cache/root.img" -F raw "$run_dir/root.qcow2"
    local serial
    if [ "$console" = stdio ]; then serial=mon:stdio; else serial=file:$console; fi
    local args=(
        -name cowfs-vm -nodefaults -display none -no-user-config -no-reboot
        -machine q35 "${accel_args[@]}" -smp "$cpus" -m "$memory"
        -kernel "$cache/vmlinuz" -initrd "$cache/initrd.img" -append "$cmdline"
        -drive "file=$run_dir/root.qcow2,if=virtio,format=qcow2,cache=unsafe"
        -drive "file=$cache/data.img,if=virtio,format=raw"
        -drive "file=$run_dir/checkout.img,if=virtio,format=raw"
        -netdev "user,id=net0" -device "virtio-net-pci,netdev=net0,romfile="
        -virtfs "local,path=$run_dir/share,mount_tag=host,security_model=none,id=host"
        -device virtio-rng-pci
        -serial "$serial"
    )
    if [ "$console" = stdio ]; then
        qemu-system-x86_64 "${args[@]}"
    else
        qemu-system-x86_64 "${args[@]}" </dev/null &
        qemu_pid=$!
    fi
}

cleanup() {
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    [ ${#staging_mounts[@]} -eq 0 ] || unmount_staging
    [ -z "$run_dir" ] || rm -rf "$run_dir"
}

# One VM at a time per cache (they share its data disk).
lock_cache() {
    mkdir -p "$cache"
    exec 9>"$cache/lock"
    if ! flock -n 9; then
        log "waiting for another tools/vm.sh on $cache"
        flock 9
    fi
}

# A clean checkout of $1 (a commit), installed by its tools/install.sh in a chroot of
# the VM's own root tree (an overlay on it, thrown away) on the host: at the host's
# speed, where the VM's CPU may be emulated. It becomes the VM's /root/cowfs, a disk
# of its own ($run_dir/checkout.img); tools/install.sh in the VM then finds it done.
stage_checkout() {
    local commit=$1 merged=$run_dir/chroot
    mkdir -p "$run_dir/upper" "$run_dir/work" "$merged"
    mount -t overlay overlay \
        -o "lowerdir=$cache/root.tree,upperdir=$run_dir/upper,workdir=$run_dir/work" "$merged"
    staging_mounts+=("$merged")
    mount -t proc proc "$merged/proc"
    staging_mounts+=("$merged/proc")
    mount -t sysfs sysfs "$merged/sys"
    staging_mounts+=("$merged/sys")
    mount --bind /dev "$merged/dev"
    staging_mounts+=("$merged/dev")
    cp -L /etc/resolv.conf "$merged/etc/resolv.conf"  # the host's network, not the VM's
    git -C "$repo" archive --format=tar "$commit" | tar -x -C "$merged/root/cowfs"
    log "tools/install.sh in the VM's root, on the host (log: $run_dir/install.log)"
    local started
    started=$(date +%s)
    if ! chroot "$merged" /bin/bash -c 'cd /root/cowfs && bash tools/install.sh' \
            >"$run_dir/install.log" 2>&1; then
        tail -30 "$run_dir/install.log" >&2
        die "tools/install.sh failed in the VM's root"
    fi
    log "installed in $(($(date +%s) - started)) s"
    unmount_staging "$merged/proc" "$merged/sys" "$merged/dev"
    make_ext4 cowfs-checkout "$merged/root/cowfs" "$run_dir/checkout.img" "$checkout_size"
    unmount_staging "$merged"
}

staging_mounts=()

# Unmount these staging mounts (all of them, innermost first, when none is given).
unmount_staging() {
    local targets=("$@") target kept=() i
    if [ $# -eq 0 ]; then
        for ((i = ${#staging_mounts[@]} - 1; i >= 0; i--)); do
            targets+=("${staging_mounts[i]}")
        done
    fi
    for target in "${targets[@]}"; do
        umount "$target" 2>/dev/null || umount -l "$target" 2>/dev/null || true
    done
    for target in "${staging_mounts[@]}"; do
        [[ " ${targets[*]} " == *" $target "* ]] || kept+=("$target")
    done
    staging_mounts=("${kept[@]}")
}

write_prepare() {
    cat >"$run_dir/share/prepare.sh" <<'EOF'
# Made by tools/vm.sh: check the cgroup layout and the checkout, install it.
set -eu
if [ "$(stat -f -c %T /sys/fs/cgroup)" != cgroup2fs ]; then
    echo "vm: /sys/fs/cgroup is not cgroup2" >&2
    exit 125
fi
for controller in cpu memory pids io; do
    if ! grep -qw "$controller" /sys/fs/cgroup/cgroup.controllers; then
        echo "vm: no $controller controller in /sys/fs/cgroup/cgroup.controllers" >&2
        exit 125
    fi
done
if awk '$3 == "cgroup" { found = 1 } END { exit !found }' /proc/self/mounts; then
    echo "vm: a cgroup v1 hierarchy is mounted:" >&2
    awk '$3 == "cgroup"' /proc/self/mounts >&2
    exit 125
fi
echo "vm: kernel $(uname -r); cgroup2 only, controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
if ! mountpoint -q /root/cowfs; then
    echo "vm: the checkout's disk is not mounted at /root/cowfs" >&2
    exit 125
fi
cd /root/cowfs
echo "vm: tools/install.sh"
start=$(date +%s)
bash tools/install.sh
echo "vm: installed in $(( $(date +%s) - start )) s"
EOF
}

run_job() {
    local commit=$1 timeout_minutes=$2
    shift 2
    build
    lock_cache
    run_dir=$(mktemp -d "$cache/run.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    mkdir "$run_dir/share"
    stage_checkout "$commit"
    write_prepare
    {
        printf 'set -- '
        printf '%q ' "$@"
        echo
        cat <<'EOF'
set -eu
. /mnt/host/prepare.sh
echo "vm: running: $*"
start=$(date +%s)
status=0
"$@" || status=$?
echo "vm: exit status $status after $(( $(date +%s) - start )) s"
exit "$status"
EOF
    } >"$run_dir/share/job.sh"
    : >"$run_dir/share/output.log"
    local started
    started=$(date +%s)
    log "booting (console: $run_dir/console.log; $(git -C "$repo" rev-parse --short "$commit"))"
    boot "$run_dir/console.log"
    tail -n +1 -f --pid="$qemu_pid" "$run_dir/share/output.log" &
    local tail_pid=$! deadline=$((started + timeout_minutes * 60))
    while kill -0 "$qemu_pid" 2>/dev/null; do
        if [ "$(date +%s)" -gt "$deadline" ]; then
            log "timed out after $timeout_minutes minutes: stopping the VM"
            kill "$qemu_pid"
            break
        fi
        sleep 2
    done
    wait "$qemu_pid" || true
    qemu_pid=
    wait "$tail_pid" || true
    local status
    if [ -f "$run_dir/share/status" ]; then
        status=$(cat "$run_dir/share/status")
        log "done in $(($(date +%s) - started)) s, exit status $status"
    else
        status=125
        log "the job did not finish; the console's last lines:"
        tail -30 "$run_dir/console.log" >&2 || true
        cp "$run_dir/console.log" "$cache/last-console.log" 2>/dev/null || true
        log "(kept in $cache/last-console.log)"
    fi
    exit "$status"
}

shell() {
    [ -t 0 ] || die "shell needs a terminal (for a command, use: tools/vm.sh run -- COMMAND)"
    build
    lock_cache
    run_dir=$(mktemp -d "$cache/run.XXXXXX")
    trap cleanup EXIT
    mkdir "$run_dir/share"
    stage_checkout HEAD
    write_prepare
    log "Ctrl-A X ends the VM; HEAD is installed in /root/cowfs (bash /mnt/host/prepare.sh checks)"
    boot stdio
}

# --- arguments ---------------------------------------------------------------------

while [ $# -gt 0 ]; do
    case $1 in
        --cache)
            [ $# -ge 2 ] || die "--cache needs a directory"
            cache=$(realpath -m "$2")
            shift 2
            ;;
        -h | --help) usage; exit 0 ;;
        *) break ;;
    esac
done
command=${1:-}
[ -n "$command" ] || { usage >&2; exit 2; }
shift

commit=HEAD
timeout_minutes=80
case $command in
    build)
        [ $# -eq 0 ] || die "build takes no arguments"
        build
        log "ready in $cache"
        ;;
    test | run)
        while [ $# -gt 0 ]; do
            case $1 in
                --commit)
                    [ $# -ge 2 ] || die "--commit needs a revision"
                    commit=$(git -C "$repo" rev-parse --verify --quiet "$2^{commit}") \
                        || die "no commit $2 in $repo"
                    shift 2
                    ;;
                --worktree)
                    commit=$(git -C "$repo" stash create)
                    commit=${commit:-HEAD}
                    shift
                    ;;
                --timeout)
                    [[ ${2:-} =~ ^[0-9]+$ ]] || die "--timeout needs a number of minutes"
                    timeout_minutes=$2
                    shift 2
                    ;;
                *) break ;;
            esac
        done
        if [ "$command" = test ]; then
            [ $# -gt 0 ] || set -- -q -rs tests/test_contextd.py tests/test_devices.py
            run_job "$commit" "$timeout_minutes" .venv/bin/pytest "$@"
        else
            [ "${1:-}" != -- ] || shift
            [ $# -gt 0 ] || die "run needs a command"
            run_job "$commit" "$timeout_minutes" bash -c "$*"
        fi
        ;;
    shell)
        [ $# -eq 0 ] || die "shell takes no arguments"
        shell
        ;;
    *) usage >&2; exit 2 ;;
esac
