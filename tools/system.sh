#!/usr/bin/env bash
# The system install of cowfs and contextd from this checkout, after tools/install.sh
# has made .venv: the commands on root's PATH, man pages made from the commands
# themselves (click-man), bash and zsh completion, the references in docs/, the
# systemd unit, and the host layout (root-only: the barrier). Run as root:
#
#   tools/system.sh install   [--prefix DIR] [--unit-dir DIR]   (tools/install.sh --system)
#   tools/system.sh uninstall [--prefix DIR] [--unit-dir DIR]
#
# DIR defaults: /usr/local and /etc/systemd/system. Uninstall removes what install
# put there; guests, their configurations and the state database stay.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

action=${1:-}
[ "$action" = install ] || [ "$action" = uninstall ] || {
    echo "usage: tools/system.sh install|uninstall [--prefix DIR] [--unit-dir DIR]" >&2
    exit 2
}
shift
prefix=/usr/local
unit_dir=/etc/systemd/system
while [ $# -gt 0 ]; do
    case $1 in
        --prefix | --unit-dir)
            [ $# -ge 2 ] || { echo "tools/system.sh: $1 needs a directory" >&2; exit 2; }
            if [ "$1" = --prefix ]; then prefix=$2; else unit_dir=$2; fi
            shift 2
            ;;
        *) echo "tools/system.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" != 0 ]; then
    echo "tools/system.sh: must run as root" >&2
    exit 1
fi

commands=(cowfs contextd contextd-oci)
man_dir=$prefix/share/man/man8
bash_dir=$prefix/share/bash-completion/completions
zsh_dir=$prefix/share/zsh/site-functions
doc_dir=$prefix/share/doc/cowfs
unit=$unit_dir/contextd.service

uninstall() {
    for command in "${commands[@]}"; do
        rm -f "$prefix/sbin/$command" "$bash_dir/$command" "$zsh_dir/_$command"
        rm -f "$man_dir/$command.8" "$man_dir/$command"-*.8
    done
    rm -rf "$doc_dir"
    rm -f "$unit"
}

if [ "$action" = uninstall ]; then
    uninstall
    echo "removed cowfs and contextd from $prefix and $unit_dir (guests and their state stay)"
    exit 0
fi

[ -x .venv/bin/contextd ] || { echo "tools/system.sh: run tools/install.sh first" >&2; exit 1; }
.venv/bin/python -c "import click_man" 2>/dev/null || .venv/bin/pip install --quiet "click-man>=0.4"

install -d "$prefix/sbin" "$man_dir" "$bash_dir" "$zsh_dir" "$doc_dir" "$unit_dir"
for command in "${commands[@]}"; do
    ln -sfn "$repo/.venv/bin/$command" "$prefix/sbin/$command"
    # Completion scripts as click prints them (guest names complete too).
    variable=${command^^}
    variable=_${variable//-/_}_COMPLETE  # click's name for it: contextd-oci -> _CONTEXTD_OCI_COMPLETE
    env "$variable=bash_source" ".venv/bin/$command" > "$bash_dir/$command"
    env "$variable=zsh_source" ".venv/bin/$command" > "$zsh_dir/_$command"
done

.venv/bin/python tools/man.py "$man_dir"  # from the commands' own help (click-man)
install -m 0644 docs/cowfs.md docs/contextd.md docs/contextd-oci.md docs/design.md "$doc_dir/"

# The unit, pointing at this checkout (its options: /etc/default/contextd, CONTEXTD_OPTS).
sed -e "s|^ExecStart=[^ ]*|ExecStart=$repo/.venv/bin/contextd|" \
    -e "s|^Documentation=.*|Documentation=man:contextd(8) file://$doc_dir/contextd.md|" \
    dist/contextd.service > "$unit"

# The host layout, root's alone (cowfs makes and repairs it on first use).
.venv/bin/cowfs limit show > /dev/null
install -d -m 0700 "${CONTEXTD_CONFIG_DIR:-/etc/contextd}"

echo "installed: $prefix/sbin/{cowfs,contextd}, man pages in $man_dir, completion, $unit"
if ! dpkg-query -W -f='${Status}' bash-completion 2> /dev/null | grep -q "install ok installed"; then
    echo "(bash loads completion scripts through the bash-completion package: apt-get install bash-completion)"
fi
echo "start the daemon with: systemctl daemon-reload && systemctl enable --now contextd"
