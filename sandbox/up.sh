#!/bin/bash
# make sandbox: a throwaway gims capture node on this machine (no systemd as PID 1 needed).
#  - a real systemd booted as PID 1 of a new PID + mount + cgroup namespace (sandbox/boot.sh),
#    with gims's units, users, tmpfiles and polkit rule installed into its private /etc;
#  - a veth pair: gims-sb0 (host network namespace, which the node shares) <-> gims-sb0p in
#    the network namespace gims-sb-peer, carrying steady IPv4+IPv6 ICMP/UDP/TCP traffic;
#  - gimsd.service answering at http://127.0.0.1:8001/ (once gimsd/server.py exists).
# Everything started is recorded in $GIMS_SANDBOX_DIR/state (default /run/gims-sandbox/state)
# for sandbox/down.sh. Running it again while the sandbox is up just says so.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
statedir=${GIMS_SANDBOX_DIR:-/run/gims-sandbox}
state=$statedir/state
netns=gims-sb-peer
veth=gims-sb0
peer=gims-sb0p
v4_node=198.18.203.1 v4_peer=198.18.203.2
v6_node=fd67:696d:7362::1 v6_peer=fd67:696d:7362::2
cgname=gims-sandbox
port=8001  # sandbox/gimsd.toml

die() { echo "sandbox/up.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (namespaces, veth, systemd)"

if [ -f "$state" ]; then
    # shellcheck disable=SC1090
    . "$state"
    if [ -n "${NODE_PID:-}" ] && kill -0 "$NODE_PID" 2>/dev/null; then
        echo "gims sandbox already up: systemd PID $NODE_PID (state $state)"
        cat "$state"
        exit 0
    fi
    echo "sandbox/up.sh: stale state $state (PID ${NODE_PID:-?} gone): cleaning up first"
    "$repo/sandbox/down.sh" || true
fi
if [ -e /sys/class/net/$veth ] || ip netns list | grep -qw "$netns"; then
    die "$veth or netns $netns exists but no sandbox state: run sandbox/down.sh first"
fi

# gimsd will listen on 127.0.0.1:8001 in the host's network namespace: it must be free.
if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
    die "port $port is already taken: $(ss -Hltnp "sport = :$port" | head -1)"
fi

# The node sees the repository at $node_repo (a bind mount made inside it), where no
# unit's PrivateTmp=/ProtectHome= hides it.
node_repo=/var/lib/gims-sandbox/repo
case $repo/ in
    /run/*) die "the repository ($repo) must not lie under /run (the node gets a fresh /run)";;
esac

py=${GIMS_SANDBOX_PYTHON:-}
if [ -z "$py" ]; then
    for c in "$repo/.venv/bin/python" /usr/bin/python3; do
        [ -x "$c" ] && { py=$c; break; }
    done
fi
"$py" -c 'import dbus_next, numpy, pcapy' 2>/dev/null \
    || die "$py lacks dbus_next/numpy/pcapy: run 'make deps' or set GIMS_SANDBOX_PYTHON"

case $py in
    "$repo"/*) node_py=$node_repo/${py#"$repo"/};;
    /tmp/*|/var/tmp/*|/home/*|/root/*|/run/*)
        die "$py is hidden from the units (PrivateTmp=/ProtectHome=): use a Python elsewhere or in the repository's .venv";;
    *) node_py=$py;;
esac

mkdir -p "$statedir"
# A failed start leaves nothing behind: down.sh undoes what was recorded so far.
cleanup_on_failure() {
    if [ "$?" != 0 ] && ! grep -q '^READY=1' "$state" 2>/dev/null; then
        echo "sandbox/up.sh: start failed; undoing it (logs kept in ${failed_logs:=/var/tmp/gims-sandbox-failed.$$})" >&2
        mkdir -p "$failed_logs" && cp "$statedir"/*.log "$failed_logs"/ 2>/dev/null
        "$repo/sandbox/down.sh" >&2 || true
    fi
}
trap cleanup_on_failure EXIT
: > "$state.new"
rec() { echo "$1=$2" >> "$state.new"; cp "$state.new" "$state"; }
rec REPO "$repo"
rec PYTHON "$py"
rec STATEDIR "$statedir"
rec NODE_REPO "$node_repo"
rec NODE_PYTHON "$node_py"

# cgroups: a cgroup of its own in every hierarchy, so the node's systemd (in a cgroup
# namespace rooted there) cannot touch anyone else's cgroups.
cgdirs=()
for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    h=${h%/}
    mountpoint -q "$h" || continue  # hierarchies only (on a cgroup2-only host, subdirs are cgroups)
    fstype=$(stat -f -c %T "$h" 2>/dev/null) || continue
    [[ $fstype == cgroup* ]] || continue
    if [ "$h" = /sys/fs/cgroup ]; then ctl=0; else ctl=$(basename "$h"); fi
    cur=$(awk -F: -v c="$ctl" '{n=split($2,a,","); for(i=1;i<=n;i++) if(a[i]==c || ("name=" c)==a[i]) print $3; if(c=="0" && $1=="0") print $3; if(c=="unified" && $1=="0") print $3}' /proc/self/cgroup | head -1)
    d="$h${cur%/}/$cgname"
    mkdir -p "$d"
    # A new cpuset cgroup starts with no CPUs/memory nodes: give it its parent's.
    if [ -f "$d/cpuset.cpus" ]; then
        cat "$(dirname "$d")/cpuset.cpus" > "$d/cpuset.cpus"
        cat "$(dirname "$d")/cpuset.mems" > "$d/cpuset.mems"
    fi
    cgdirs+=("$d")
done
rec CGROUPS "\"${cgdirs[*]}\""

# Network: gims-sb0 in the host namespace (the node shares it, so gimsd's 127.0.0.1:8001
# is reachable from here), its peer in a namespace of its own.
ip netns add "$netns"
rec NETNS "$netns"
ip link add "$veth" type veth peer name "$peer" netns "$netns"
rec VETH "$veth"
sysctl -qw "net.ipv6.conf.$veth.disable_ipv6=0" 2>/dev/null || true
ip addr add "$v4_node/24" dev "$veth"
ip -6 addr add "$v6_node/64" dev "$veth" nodad
ip link set "$veth" up
ip netns exec "$netns" sysctl -qw "net.ipv6.conf.$peer.disable_ipv6=0" 2>/dev/null || true
ip -n "$netns" link set lo up
ip -n "$netns" addr add "$v4_peer/24" dev "$peer"
ip -n "$netns" -6 addr add "$v6_peer/64" dev "$peer" nodad
ip -n "$netns" link set "$peer" up

# The node: boot.sh becomes PID 1 of the new namespaces. Its own cgroup first, then
# unshare a cgroup namespace rooted there. --kill-child: killing unshare kills the node.
log=$statedir/node.log
setsid bash -c '
    set -e
    for d in "$@"; do echo $$ > "$d/cgroup.procs"; done
    exec unshare --pid --fork --mount --cgroup --propagation private --kill-child \
        "'"$repo"'/sandbox/boot.sh" "'"$repo"'" "'"$py"'" "'"$node_repo"'" "'"$node_py"'"
' bash "${cgdirs[@]}" </dev/null >"$log" 2>&1 &
unshare_pid=$!
rec UNSHARE_PID "$unshare_pid"
node_pid=
for _ in $(seq 100); do
    node_pid=$(cat "/proc/$unshare_pid/task/$unshare_pid/children" 2>/dev/null | awk '{print $1}')
    [ -n "$node_pid" ] && break
    kill -0 "$unshare_pid" 2>/dev/null || break
    sleep 0.1
done
[ -n "$node_pid" ] || { cat "$log" >&2; die "the node's PID 1 did not start (log: $log)"; }
rec NODE_PID "$node_pid"
rec NODE_LOG "$log"

enter() { nsenter -t "$node_pid" -m -p -C "$@"; }
# Wait for the boot to finish (basic.target reached, the bus up).
ready=
for _ in $(seq 120); do
    kill -0 "$node_pid" 2>/dev/null || { cat "$log" >&2; die "the node's systemd died (log: $log)"; }
    st=$(enter systemctl is-system-running 2>/dev/null || true)
    case $st in running|degraded) ready=1; break;; esac
    sleep 0.5
done
[ -n "$ready" ] || { tail -50 "$log" >&2; die "the node's systemd did not finish booting (log: $log)"; }

# Traffic: ICMP (ping, ping -6), UDP and TCP echo (sandbox/traffic.py) across the veth.
tpids=()
setsid "$py" "$repo/sandbox/traffic.py" server "$v4_node" "$v6_node" </dev/null >"$statedir/traffic-server.log" 2>&1 &
tpids+=($!)
sleep 0.3
setsid ip netns exec "$netns" "$py" "$repo/sandbox/traffic.py" client "$v4_node" "$v6_node" --rate 4 \
    </dev/null >"$statedir/traffic-client.log" 2>&1 &
tpids+=($!)
setsid ip netns exec "$netns" ping -q -i 0.25 "$v4_node" </dev/null >/dev/null 2>&1 &
tpids+=($!)
setsid ip netns exec "$netns" ping -6 -q -i 0.25 "$v6_node" </dev/null >/dev/null 2>&1 &
tpids+=($!)
rec TRAFFIC_PIDS "\"${tpids[*]}\""

# gimsd, once the project has it.
gimsd_state="not installed (no gimsd/server.py in $repo)"
if [ -f "$repo/gimsd/server.py" ] && [ -f "$repo/units/gimsd.service" ]; then
    enter systemctl start gimsd.service || { enter journalctl -u gimsd.service --no-pager | tail -30 >&2; die "gimsd.service failed to start"; }
    for _ in $(seq 60); do
        if "$py" - "$port" <<'PY' 2>/dev/null; then gimsd_state="http://127.0.0.1:$port/"; break; fi
import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
PY
        sleep 0.5
    done
    [[ $gimsd_state == http* ]] || { enter journalctl -u gimsd.service --no-pager | tail -30 >&2; die "gimsd is not answering on 127.0.0.1:$port"; }
fi
rec GIMSD "\"$gimsd_state\""
rec READY 1

cat <<MSG
gims sandbox up:
  systemd (PID 1 of the node's namespaces): host PID $node_pid  (unshare $unshare_pid; boot log $log)
  code:            $repo, seen in the node as $node_repo, run with $node_py
  enter it:        sandbox/enter.sh systemctl status     (nsenter -t $node_pid -m -p ...)
  capture on:      $veth  $v4_node $v6_node  <->  $peer in netns $netns ($v4_peer $v6_peer)
  traffic PIDs:    ${tpids[*]}  (ping, ping -6, UDP/TCP echo on ports 47001/47002)
  gimsd:           $gimsd_state
  cgroups:         ${cgdirs[*]}
  state:           $state   (make sandbox-down stops all of it)
MSG
