#!/bin/bash
# Installs what gims needs to run and test on Debian 12: the apt packages listed in
# .ci/apt-packages.txt and a venv (Debian's python3, with system site packages so the
# Debian builds of python3-systemd, dbus-next, paramiko, boto3... are the ones used).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
export DEBIAN_FRONTEND=noninteractive
mapfile -t pkgs < <(grep -v '^\s*#' .ci/apt-packages.txt | grep -v '^\s*$' | sort -u)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install-deps: apt packages: ${missing[*]}"
    apt-get update -qq
    # tshark asks whether non-root users may capture; answer it here.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q -r requirements-test.txt
"$venv/bin/pip" install -q --no-deps -e .
