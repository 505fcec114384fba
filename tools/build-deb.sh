#!/bin/bash
# Build gims's .deb packages from a clean copy of this tree into OUTDIR.
#   tools/build-deb.sh OUTDIR [--allow-missing]
# - copies the tree (tracked and new files, nothing git ignores: no venv, no build output),
# - installs the Build-Depends with apt when some are missing,
# - puts pcapy-ng's release tarball at debian/vendor/ (pip download from PyPI, cached under
#   /var/cache/gims-build, checked against debian/vendor/pcapy_ng-2.1.0.tar.gz.sha256),
# - runs dpkg-buildpackage -us -uc -b, then lintian (fails on lintian errors),
# - leaves the .deb files, .buildinfo, .changes and lintian.txt in OUTDIR.
# --allow-missing: package what exists while units/config are still being written (warns).
set -euo pipefail

usage() { echo "usage: $0 OUTDIR [--allow-missing]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1; shift
allow_missing=""
for arg in "$@"; do
    case "$arg" in
        --allow-missing) allow_missing=1 ;;
        *) usage ;;
    esac
done

src=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cache=/var/cache/gims-build
tarball=pcapy_ng-2.1.0.tar.gz
export DEBIAN_FRONTEND=noninteractive
# Debian's own interpreters and tools only: a python3.11 earlier on PATH (pyenv, a venv) would
# build against the wrong Python.
export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin

work=$(mktemp -d /var/tmp/gims-build-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/gims"

# 1. A clean copy of the tree.
git -C "$src" ls-files -z --cached --others --exclude-standard |
    (cd "$src" && tar --null -T - -cf - ) | tar -xf - -C "$work/gims"
cd "$work/gims"

# 2. Build-Depends.
if ! dpkg-checkbuilddeps >/dev/null 2>&1; then
    echo "build-deb: installing Build-Depends"
    apt-get update -qq
    apt-get build-dep -y -qq ./ >/dev/null
fi

# 3. pcapy-ng's release tarball (not kept in the repository; see debian/README.source).
mkdir -p "$cache" debian/vendor
if ! (cd "$cache" && sed "s#debian/vendor/##" "$work/gims/debian/vendor/$tarball.sha256" |
        sha256sum -c --quiet - 2>/dev/null); then
    echo "build-deb: downloading $tarball from PyPI"
    pip=()
    if [ -x "$src/.venv/bin/pip" ]; then pip=("$src/.venv/bin/pip")
    elif python3 -m pip --version >/dev/null 2>&1; then pip=(python3 -m pip)
    else python3 -m venv "$work/pipvenv" && pip=("$work/pipvenv/bin/pip"); fi
    "${pip[@]}" download -q --no-deps --no-binary :all: -d "$work/dl" pcapy-ng==2.1.0
    cp "$work/dl/$tarball" "$cache/$tarball.part" && mv "$cache/$tarball.part" "$cache/$tarball"
    (cd "$cache" && sed "s#debian/vendor/##" "$work/gims/debian/vendor/$tarball.sha256" |
        sha256sum -c --quiet -)
fi
cp "$cache/$tarball" debian/vendor/

# 4. Build.
GIMS_DEB_ALLOW_MISSING=$allow_missing dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1 || {
    tail -60 "$work/build.log" >&2; echo "build-deb: dpkg-buildpackage failed" >&2; exit 1; }
cp "$work/build.log" "$out/build.log"
cd "$work"
changes=$(ls gims_*_*.changes)
cp ./*.deb ./*.buildinfo "$changes" "$out/"

# 5. lintian: errors fail the build; warnings must each carry an override with its reason.
lintian --info --display-info --pedantic "$changes" >"$out/lintian.txt" 2>&1 || true
if grep -q '^E: ' "$out/lintian.txt"; then
    grep '^E: ' "$out/lintian.txt" >&2; echo "build-deb: lintian errors" >&2; exit 1
fi
echo "build-deb: built into $out:"
ls -1 "$out"/*.deb
grep -E '^[WE]: ' "$out/lintian.txt" || echo "build-deb: lintian: no errors, no warnings"
