#!/bin/bash
# PID 1 of the sandbox's new PID + mount (+ cgroup) namespace, started by sandbox/up.sh.
# Makes the namespace's file system private (fresh /run and /tmp, copy-on-write overlays
# over /etc, /var and /srv so sysusers, units, state and spool never reach the host),
# installs gims into it, then execs a real systemd as PID 1.
# Usage: boot.sh REPO PYTHON NODE_REPO NODE_PYTHON
#   REPO is bind-mounted at NODE_REPO inside the node (a path no unit's sandboxing hides,
#   wherever the checkout lies: /tmp, /home...); NODE_PYTHON is PYTHON seen from there.
set -euo pipefail
repo=$1 py=$2 node_repo=$3 node_py=$4
[ "$$" = 1 ] || { echo "boot.sh: must run as PID 1 of a new PID namespace" >&2; exit 1; }

# /proc of this PID namespace; fresh tmpfs on /run and /tmp. Without its own /tmp, the
# booted systemd's tmpfiles run would empty the HOST's /tmp.
mount -t proc proc /proc
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run

# Copy-on-write overlays: every write under /etc, /var, /srv lands in this tmpfs, which
# disappears with the namespace. The host's files are the read-only lower layer.
# GIMS_SANDBOX_KEEP=/host/dir keeps the upper layers there instead (a node "reboot" for the
# reliability tests: down.sh + up.sh with the same directory finds /etc, /var, /srv as they
# were at the power cut). It must lie outside /etc, /var, /srv (an overlay's upper layer
# inside its own lower layer is refused by the kernel) and /run (covered just above).
ovl=/run/gims-sandbox-overlay
mkdir -p "$ovl"
if [ -n "${GIMS_SANDBOX_KEEP:-}" ]; then
    case "$(realpath -m "$GIMS_SANDBOX_KEEP")/" in
        /etc/*|/var/*|/srv/*|/run/*|/) echo "boot.sh: GIMS_SANDBOX_KEEP must lie outside /etc, /var, /srv, /run" >&2; exit 1;;
    esac
    mkdir -p -m 0700 "$GIMS_SANDBOX_KEEP"
    mount --bind "$GIMS_SANDBOX_KEEP" "$ovl"
    echo "gims-sandbox: keeping /etc, /var, /srv changes in $GIMS_SANDBOX_KEEP (host)"
else
    mount -t tmpfs -o mode=700 tmpfs "$ovl"
fi
for d in etc var srv; do
    mkdir -p "$ovl/$d/upper" "$ovl/$d/work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$ovl/$d/upper,workdir=$ovl/$d/work" "/$d"
done

# The repository, where the units find it (before /tmp is covered, in case it lies there).
mkdir -p "$node_repo"
mount --bind "$repo" "$node_repo"
mount -o remount,bind,ro "$node_repo"

mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp

# Kernel settings are the host's: read-only here (systemd as PID 1 would raise fs.file-max
# and friends; units' ProtectKernelTunables= agrees).
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
# (the host's cgroup layout, looked at before /sys is covered: hybrid or unified)
if [ -d /sys/fs/cgroup/unified ]; then cg_hybrid=1; else cg_hybrid=; fi
mount --bind /sys /sys
mount -o remount,bind,ro /sys

# A /dev of its own: the host's is a shared devtmpfs, where systemd would create /dev/log,
# /dev/initctl... pointing into this node's /run. Only the basic nodes, bound from the host's;
# the console goes nowhere; a private devpts and /dev/shm.
mkdir -p "$ovl/hostdev"
mount --bind /dev "$ovl/hostdev"
mount -t tmpfs -o mode=755,nosuid,size=4m tmpfs /dev
for n in null zero full random urandom tty; do
    touch "/dev/$n"
    mount --bind "$ovl/hostdev/$n" "/dev/$n"
done
touch /dev/console
mount --bind "$ovl/hostdev/null" /dev/console
mkdir -p /dev/pts /dev/shm /dev/mqueue /dev/hugepages
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5,nosuid,noexec devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
umount "$ovl/hostdev"

# cgroups: this process sits in a cgroup of its own (up.sh created it and unshared a
# cgroup namespace), so remount the hierarchies here to see that cgroup as the root.
if [ -n "$cg_hybrid" ]; then
    mount -t tmpfs -o mode=755,nosuid,nodev,noexec tmpfs /sys/fs/cgroup
    mkdir -p /sys/fs/cgroup/unified /sys/fs/cgroup/systemd
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup/unified
    mount -t cgroup -o nosuid,nodev,noexec,none,name=systemd cgroup /sys/fs/cgroup/systemd
    for c in $(awk 'NR>1 && $2!=0 && $4==1 {print $1}' /proc/cgroups); do
        mkdir -p "/sys/fs/cgroup/$c"
        mount -t cgroup -o "nosuid,nodev,noexec,$c" cgroup "/sys/fs/cgroup/$c" || rmdir "/sys/fs/cgroup/$c"
    done
else
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
fi

"$node_repo/sandbox/install-node.sh" "$node_repo" "$node_py"

# systemd relies on mount propagation from its children's namespaces (credentials,
# PrivateTmp...): share everything within this namespace; unshare made it all private
# to the host already, so nothing propagates out.
mount --make-rshared /

echo "gims-sandbox: booting systemd"
exec /lib/systemd/systemd --system --unit=basic.target --log-target=journal --show-status=no
