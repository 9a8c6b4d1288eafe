#!/usr/bin/env bash
# The cowfs demo: build a busybox-static template guest, clone two guests from
# it, mount both through cowfs, write in one guest and show that the other
# guest and the template are untouched, and what stays shared.
# Installs what is missing first; safe to run twice (it starts from scratch).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install.sh
export PATH="$PWD/.venv/bin:$PATH"
demo=${COWFS_DEMO_DIR:-/var/tmp/cowfs-demo}
export COWFS_ROOT=$demo/root   # the demo's own state database and store

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

for m in "$demo"/mnt/*; do
    [ -d "$m" ] && mountpoint -q "$m" && cowfs umount --lazy "$m"
done
rm -rf "$demo"
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
echo
echo "demo done; trees left in $demo"
