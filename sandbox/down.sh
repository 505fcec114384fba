#!/bin/bash
# make sandbox-down: stops everything sandbox/up.sh started, by the PIDs it recorded, and
# removes what it made (netns, veth, cgroups, state). The node's files lived in tmpfs
# overlays inside its mount namespace, so they vanish with it; nothing was installed on
# the host. Safe to run twice, or after a half-finished up.sh.
set -uo pipefail
statedir=${GIMS_SANDBOX_DIR:-/run/gims-sandbox}
state=$statedir/state
NETNS=gims-sb-peer VETH=gims-sb0 CGROUPS= NODE_PID= UNSHARE_PID= TRAFFIC_PIDS=
# shellcheck disable=SC1090
[ -f "$state" ] && . "$state"
[ -n "$CGROUPS" ] || CGROUPS=$(ls -d /sys/fs/cgroup/*/gims-sandbox /sys/fs/cgroup/*/process_api/*/gims-sandbox 2>/dev/null | tr '\n' ' ')

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
stopped=()
# SIGKILL to the namespace's PID 1 ends every process inside it.
for p in $NODE_PID $UNSHARE_PID; do
    alive "$p" && kill -KILL "$p" && stopped+=("$p")
done
for p in $TRAFFIC_PIDS; do
    alive "$p" && kill -TERM "$p" && stopped+=("$p")
done
# Anything left in the node's cgroup (e.g. state lost after a crash) was started by us.
for d in $CGROUPS; do
    [ -f "$d/cgroup.procs" ] || continue
    for p in $(cat "$d/cgroup.procs" 2>/dev/null); do kill -KILL "$p" 2>/dev/null && stopped+=("$p"); done
done
# Whatever still runs inside the peer network namespace is ours too (ping, traffic client).
if ip netns list | grep -qw "$NETNS"; then
    for p in $(ip netns pids "$NETNS" 2>/dev/null); do kill -KILL "$p" 2>/dev/null && stopped+=("$p"); done
fi
sleep 0.3
for p in $TRAFFIC_PIDS; do alive "$p" && kill -KILL "$p"; done
ip link show "$VETH" >/dev/null 2>&1 && ip link del "$VETH"
ip netns list | grep -qw "$NETNS" && ip netns del "$NETNS"
# Remove the node's cgroups, deepest first, once their processes are gone.
for d in $CGROUPS; do
    [ -d "$d" ] || continue
    for _ in $(seq 50); do
        find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
        [ -d "$d" ] || break
        sleep 0.1
    done
    [ -d "$d" ] && echo "sandbox/down.sh: could not remove cgroup $d" >&2
done
rm -rf "$statedir"
stopped_list=$(printf '%s\n' "${stopped[@]}" | sort -un | tr '\n' ' ')
echo "gims sandbox down${stopped_list:+: stopped PIDs $stopped_list}; removed $VETH, netns $NETNS, cgroups, $statedir"
