#!/usr/bin/env bash
# Build a minimal guest tree from busybox-static at DIR: the FHS skeleton,
# /bin/busybox with every applet as a symlink, /etc/passwd and /etc/group with
# a few users, an inittab for busybox init. Used by the tests and the demo.
set -euo pipefail
dir=${1:?usage: mkguest-busybox.sh DIR}
busybox=${BUSYBOX:-/bin/busybox}
if [ -e "$dir" ]; then
    echo "mkguest-busybox.sh: $dir already exists" >&2
    exit 1
fi
"$busybox" --list-full >/dev/null 2>&1 || { echo "mkguest-busybox.sh: $busybox is not busybox" >&2; exit 1; }
mkdir -p "$dir"
cd "$dir"
mkdir -p bin sbin usr/bin usr/sbin etc dev proc sys tmp root home/alice var/log var/www run
chmod 1777 tmp
chmod 0700 root
cp "$busybox" bin/busybox
"$busybox" --list-full | while read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$(dirname "$applet")"
    ln -sf /bin/busybox "$applet"
done
cat > etc/passwd <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
alice:x:1000:1000:Alice:/home/alice:/bin/sh
bob:x:1001:1001:Bob:/home/bob:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > etc/group <<'GROUP'
root:x:0:
daemon:x:1:
alice:x:1000:
bob:x:1001:
staff:x:50:alice,bob
nogroup:x:65534:
GROUP
echo 'root:*:19000:0:99999:7:::' > etc/shadow
chmod 0640 etc/shadow
echo busybox-guest > etc/hostname
cat > etc/inittab <<'INITTAB'
::sysinit:/bin/sh -c 'echo guest init started'
::respawn:/bin/sh -c 'exec sleep 2147483647'
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sh -c 'echo guest init stopping'
INITTAB
echo '<html><body>hello from the guest</body></html>' > var/www/index.html
chown 1000:1000 home/alice
printf 'alias ll="ls -l"\n' > home/alice/.profile
chown 1000:1000 home/alice/.profile
