#!/usr/bin/env bash
# The cowfs + contextd demo: build a busybox-static template guest, clone two
# guests from it, mount both through cowfs, write in one guest and show that the
# other guest and the template are untouched, and what stays shared; limits,
# quota, du and hashify; then boot two guests with contextd, each on its own
# addresses, and show what they can and cannot do.
# Installs what is missing first; safe to run twice (it starts from scratch).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install.sh
export PATH="$PWD/.venv/bin:$PATH"
demo=${COWFS_DEMO_DIR:-/var/tmp/cowfs-demo}
export COWFS_ROOT=$demo/root   # the demo's own state database and store

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

# The demo's contextd: its own directories, and a network namespace of its own
# so that its bridge and the guests' addresses never touch this machine's network.
export CONTEXTD_CONFIG_DIR=$demo/contextd/etc CONTEXTD_RUN_DIR=$demo/contextd/run
export CONTEXTD_LOG_DIR=$demo/contextd/log CONTEXTD_SOCKET=$demo/contextd/run/contextd.sock
stop_contextd() {
    if [ -S "$CONTEXTD_SOCKET" ]; then
        for guest in app1 app2; do contextd stop "$guest" --timeout 1 >/dev/null 2>&1 || true; done
    fi
    pkill -f "contextd serve --log $demo/contextd/daemon.log" 2>/dev/null || true
}
stop_contextd
for m in "$demo"/mnt/*; do
    [ -d "$m" ] && mountpoint -q "$m" && cowfs umount --lazy "$m"
done
rm -rf "$demo"
# Root-only, as util-vserver's /vservers: host users must not reach the guests' trees,
# mount points or store (cowfs refuses to serve or make a guest they could reach).
install -d -m 0700 "$demo"
mkdir -p "$demo/mnt/web1" "$demo/mnt/web2" "$demo/guests" "$COWFS_ROOT"

step "a template guest from busybox-static"
tools/mkguest-busybox.sh "$demo/template"
echo "$(find "$demo/template" | wc -l) entries, $(du -sh "$demo/template" | cut -f1) on disk"

step "two guests cloned from it: every file a copy-on-write hard link"
show cowfs clone "$demo/template" "$demo/guests/web1"
show cowfs clone "$demo/template" "$demo/guests/web2"
show stat -c '%h links, inode %i: %n' "$demo/template/bin/busybox" "$demo/guests/web1/bin/busybox" "$demo/guests/web2/bin/busybox"

step "mount both guests' roots through cowfs"
show cowfs mount --xid 101 "$demo/guests/web1" "$demo/mnt/web1"
show cowfs mount --xid 102 "$demo/guests/web2" "$demo/mnt/web2"
trap 'cowfs umount "$demo/mnt/web1" 2>/dev/null || true; cowfs umount "$demo/mnt/web2" 2>/dev/null || true' EXIT

step "guest web1 changes shared files, from a shell inside it"
show chroot "$demo/mnt/web1" /bin/sh -c '
    echo "web1 was here" >> /var/www/index.html
    sed -i "s/^alice:/alicia:/" /etc/passwd
    chmod 700 /bin/busybox
    echo "web1 sees:"; cat /var/www/index.html; grep -c alicia /etc/passwd; ls -l /bin/busybox'

step "guest web2 and the template still see the original files"
show chroot "$demo/mnt/web2" /bin/sh -c 'cat /var/www/index.html; grep -c alicia /etc/passwd; ls -l /bin/busybox'
show cat "$demo/template/var/www/index.html"

step "what is shared now"
show stat -c '%h links, inode %i: %n' "$demo/template/bin/busybox" "$demo/guests/web1/bin/busybox" "$demo/guests/web2/bin/busybox"
shared() { find "$1" -type f -links +1 | wc -l; }
total() { find "$1" -type f | wc -l; }
echo "web1: $(shared "$demo/guests/web1") of $(total "$demo/guests/web1") files still shared (it wrote 3)"
echo "web2: $(shared "$demo/guests/web2") of $(total "$demo/guests/web2") files shared"
echo "disk used by all three trees: $(du -shc "$demo/template" "$demo/guests/web1" "$demo/guests/web2" | tail -1 | cut -f1) (du counts each shared inode once)"

step "disk limits: df inside web1 shows its own size; writing past it fails"
show cowfs limit set "$demo/guests/web1" --space 4M --inodes 500 --reserved 10%
show df -h "$demo/mnt/web1" "$demo/mnt/web2"
show df -i "$demo/mnt/web1"
show chroot "$demo/mnt/web1" /bin/sh -c '
    cat /bin/busybox /bin/busybox > /root/big; ls -l /root/big; rm /root/big'
step "quota inside web2: bob may keep 256K"
show cowfs quota set "$demo/guests/web2" --user bob --space-hard 256K
show chroot --userspec=1001:1001 "$demo/mnt/web2" /bin/sh -c '
    cd /tmp; cat /bin/busybox > data; ls -l data; rm data'
show cowfs quota report "$demo/guests/web2"

step "what each guest takes, private and shared (vdu)"
show cowfs du --by-user "$demo/guests/web1" "$demo/guests/web2" "$demo/template"

step "unmount"
show cowfs umount "$demo/mnt/web1"
show cowfs umount "$demo/mnt/web2"
trap - EXIT

step "hashify: three guests installed separately share nothing yet"
for g in db1 db2 db3; do cp -a "$demo/template" "$demo/guests/$g"; done
echo "ping binary" > "$demo/guests/db3/bin/extra-tool"   # a file only db3 has
echo "disk used by db1 db2 db3: $(du -shc "$demo"/guests/db? | tail -1 | cut -f1)"
echo "\$ cowfs hashify --store $demo/store -n $demo/guests/db1 $demo/guests/db2 $demo/guests/db3 | tail -1"
cowfs hashify --store "$demo/store" -n "$demo"/guests/db1 "$demo"/guests/db2 "$demo"/guests/db3 | tail -1
show cowfs hashify --store "$demo/store" "$demo"/guests/db1 "$demo"/guests/db2 "$demo"/guests/db3
echo "disk used by db1 db2 db3 + store: $(du -shc "$demo"/guests/db? "$demo/store" | tail -1 | cut -f1)"
show stat -c '%h links, inode %i: %n' "$demo/guests/db1/bin/busybox" "$demo/guests/db3/bin/busybox"
show cowfs hashify --store "$demo/store" "$demo"/guests/db1 "$demo"/guests/db2 "$demo"/guests/db3
show cowfs store verify --store "$demo/store"

step "contextd: two guests booted on their cowfs roots, each on its own addresses"
mkdir -p "$CONTEXTD_CONFIG_DIR"
unshare --net -- contextd serve --log "$demo/contextd/daemon.log" &
daemon=$!
trap stop_contextd EXIT
while [ ! -S "$CONTEXTD_SOCKET" ]; do sleep 0.1; done
host() { nsenter --net="/proc/$daemon/ns/net" "$@"; }   # the host side of the guests' bridge
fetch() {
    printf '%-24s -> ' "$1"
    host .venv/bin/python -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())' "$1"
}
init="/bin/sh -c \"trap 'exit 0' TERM; echo up; exec httpd -f -p 80 -h /var/www\""
show contextd create app1 --from "$demo/template" --address 10.77.0.11 --address fd00:77::11 --init "$init"
show contextd create app2 --from "$demo/template" --address 10.77.0.12 --init "$init"
show contextd start app1
show contextd start app2
show contextd exec app1 -- /bin/sh -c 'echo "hostname: $(hostname)"; ps; ip -o addr show eth0; ls /sys/class/net'
echo "\$ fetch http://10.77.0.11/ and http://[fd00:77::11]/ and http://10.77.0.12/ from the host"
fetch http://10.77.0.11/; fetch "http://[fd00:77::11]/"; fetch http://10.77.0.12/

step "app1 rewrites its page: a private copy; app2 still serves the shared file"
show contextd exec app1 -- /bin/sh -c 'echo "app1 rewrote this" > /var/www/index.html'
fetch http://10.77.0.11/; fetch http://10.77.0.12/

step "guest root: root of the guest's own namespaces, nobody on the host"
show contextd exec app1 -- /bin/sh -c 'id; cat /proc/self/uid_map; mount -t tmpfs none /tmp && hostname app1-renamed && echo "inside: $(hostname), a tmpfs of its own on /tmp"'
echo "host: $(hostname); app1's init as the host sees it: $(grep ^Uid "/proc/$(contextd status app1 --json | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["init_pid"])')/status")"

step "what a guest cannot do (each attempt must fail)"
refused() {
    printf '$ contextd exec app1 -- %s\n' "$*"
    if contextd exec app1 -- /bin/sh -c "$*"; then echo "!! it succeeded"; exit 1; fi
}
refused ip addr add 10.77.0.99/24 dev eth0
refused mknod /tmp/disk b 8 0
refused unshare -U true
refused swapon /dev/zero
show contextd exec app1 -- /bin/sh -c 'grep Cap /proc/self/status'

step "status (vserver-stat), then stop: nothing is left"
show contextd status
echo "\$ ip -br link (the host side: the bridge contextd made and one veth per guest)"; host ip -br link
show contextd stop app1
show contextd stop app2
echo "\$ ip -br link (after stop: bridge and veths are gone)"; host ip -br link
trap - EXIT
stop_contextd
echo
echo "demo done; trees left in $demo"
