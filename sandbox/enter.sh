#!/bin/bash
# Run a command inside the sandbox node (its PID + mount namespaces), e.g.
#   sandbox/enter.sh systemctl status capture@x.service
#   sandbox/enter.sh --user gims busctl ...      (as a system user of the node)
set -euo pipefail
state=${GIMS_SANDBOX_DIR:-/run/gims-sandbox}/state
[ -f "$state" ] || { echo "sandbox/enter.sh: no sandbox ($state missing): make sandbox" >&2; exit 1; }
# shellcheck disable=SC1090
. "$state"
user=
if [ "${1:-}" = --user ]; then user=$2; shift 2; fi
[ $# -gt 0 ] || set -- bash
if [ -n "$user" ]; then
    exec nsenter -t "$NODE_PID" -m -p -C -- setpriv --reuid="$user" --regid="$user" --init-groups \
        --reset-env "$@"
fi
exec nsenter -t "$NODE_PID" -m -p -C -- "$@"
