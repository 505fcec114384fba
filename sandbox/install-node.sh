#!/bin/bash
# Installs gims into the sandbox's private /etc (an overlay, see boot.sh) the way the
# package would: units, sysusers.d, tmpfiles.d, the polkit rule and gimsd.toml. Program
# paths in the units are rewritten to run the repository's code with PYTHON.
# Usage: install-node.sh REPO PYTHON   (only ever run inside the sandbox's namespace)
set -euo pipefail
repo=$1 py=$2
unitdir=/etc/systemd/system

# Early-boot units that would act on the shared kernel or on host state; timers.target
# would pull apt-daily & co. Masked in the namespace's private /etc only.
for u in systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
         proc-sys-fs-binfmt_misc.mount systemd-modules-load.service systemd-remount-fs.service \
         systemd-random-seed.service systemd-update-utmp.service systemd-journal-flush.service \
         systemd-timesyncd.service systemd-udevd.service systemd-udev-trigger.service \
         systemd-udev-settle.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
         kmod-static-nodes.service systemd-tmpfiles-setup-dev.service systemd-pstore.service \
         sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount \
         sys-fs-fuse-connections.mount dev-hugepages.mount dev-mqueue.mount \
         systemd-firstboot.service systemd-repart.service systemd-pcrphase.service \
         systemd-pcrphase-sysinit.service systemd-machine-id-commit.service \
         systemd-journald-audit.socket systemd-hwdb-update.service timers.target \
         getty.target console-getty.service; do
    ln -sfn /dev/null "$unitdir/$u"
done

# The project's units (capture@, gimsd, and whatever else units/ holds, e.g. gims-upload@).
declare -A module=([gims-capture]=capture_daemon.cli [gimsd]=gimsd.server
                   [gims-upload]=gimsd.upload [gimsctl]=gimsd.ctl)
for f in "$repo"/units/*.service "$repo"/units/*.path "$repo"/units/*.timer "$repo"/units/*.socket; do
    [ -e "$f" ] || continue
    name=$(basename "$f")
    sed_args=()
    for prog in "${!module[@]}"; do
        sed_args+=(-e "s#/usr/bin/$prog\\b#$py -m ${module[$prog]}#g")
    done
    sed "${sed_args[@]}" "$f" > "$unitdir/$name"
    if [[ $name == *.service ]]; then
        mkdir -p "$unitdir/$name.d"
        cat > "$unitdir/$name.d/50-gims-sandbox.conf" <<DROPIN
# gims sandbox: run the repository's code ($repo) instead of an installed package.
[Service]
Environment=PYTHONPATH=$repo PYTHONDONTWRITEBYTECODE=1
DROPIN
    fi
done

install -D -m 0644 "$repo/units/gims.sysusers" /etc/sysusers.d/gims.conf
install -D -m 0644 "$repo/units/gims.tmpfiles" /etc/tmpfiles.d/gims.conf
install -d -m 0700 -o polkitd -g root /etc/polkit-1/rules.d
install -m 0644 "$repo"/polkit/*.rules /etc/polkit-1/rules.d/

# Users now (systemd-sysusers.service only runs after an /usr update); /etc/passwd,
# /etc/group, /etc/shadow, /etc/gshadow change in the overlay, never on the host.
systemd-sysusers /etc/sysusers.d/gims.conf

# gimsd's configuration for this sandbox: capture on gims-sb0, local storage under /srv/gims.
install -d -m 0755 /etc/gims
if [ -f "$repo/sandbox/gimsd.toml" ]; then
    install -m 0644 "$repo/sandbox/gimsd.toml" /etc/gims/gimsd.toml
fi

# The node's journal: no host kernel messages (/dev/kmsg is shared), volatile storage.
mkdir -p /etc/systemd/journald.conf.d
cat > /etc/systemd/journald.conf.d/50-gims-sandbox.conf <<CONF
[Journal]
ReadKMsg=no
Storage=volatile
CONF
