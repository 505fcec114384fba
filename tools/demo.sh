#!/bin/bash
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d /var/tmp/gims-demo.XXXXXX)
.venv/bin/gims-capture --read tests/data/zeek__wikipedia.pcap --output-dir "$out" --experiment demo --site LAB
ls -l "$out"
