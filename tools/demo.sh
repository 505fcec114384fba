#!/bin/bash
# The main job end to end: a throwaway gims node (make sandbox), an AM's XML-RPC requests
# (tools/am_demo.py), live traffic captured and anonymized by capture@demo.service, files and
# metadata delivered to local storage, shown with tcpdump. KEEP=1 leaves the node up.
set -euo pipefail
cd "$(dirname "$0")/.."
sandbox/up.sh
trap '[ "${KEEP:-0}" = 1 ] || sandbox/down.sh' EXIT
.venv/bin/python tools/am_demo.py --experiment demo --seconds "${SECONDS_TO_CAPTURE:-20}"
echo
echo "== files in the experiment's storage (/srv/gims/demo inside the node):"
sandbox/enter.sh sh -c 'ls -l /srv/gims/demo'
first=$(sandbox/enter.sh sh -c 'ls /srv/gims/demo/*.pcap | head -1')
echo "== metadata record of $first:"
sandbox/enter.sh cat "$first.meta.json"
echo "== first packets of $first (addresses anonymized with Crypto-PAn):"
sandbox/enter.sh tcpdump -n -r "$first" -c 8 2>/dev/null
