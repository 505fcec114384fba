"""Fast checks that debian/ keeps up with the tree: every console script, unit and man page
the product has is packaged (the slow install test in test_deb.py proves they work)."""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "debian"
DOCUMENTED_SCRIPTS = {"gims-capture", "gimsd", "gimsctl", "gims-upload"}  # ARCHITECTURE "Names"
DOCUMENTED_UNITS = {"capture@.service", "gimsd.service", "gims-upload@.service",
                    "gims-upload@.path"}


def install_patterns() -> list[tuple[str, str]]:
    lines = (DEBIAN / "gims.install").read_text().splitlines()
    return [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#")]


def packaged(path: str) -> str | None:
    """Where debian/gims.install puts a file of the tree, or None."""
    for src, dst in install_patterns():
        if fnmatch.fnmatch(path, src):
            return f"/{dst}/{Path(path).name}"
    return None


def manpages() -> set[str]:
    return {Path(line.strip()).name for line in (DEBIAN / "gims.manpages").read_text().split()}


def test_documented_units_and_files_are_listed():
    for unit in DOCUMENTED_UNITS:
        assert packaged(f"units/{unit}") == f"/lib/systemd/system/{unit}"
    assert packaged("polkit/50-gims.rules") == "/usr/share/polkit-1/rules.d/50-gims.rules"
    assert packaged("etc/gimsd.toml") == "/etc/gims/gimsd.toml"
    # dh_installsysusers / dh_installtmpfiles read these names; they point into units/.
    for kind in ("sysusers", "tmpfiles"):
        link = DEBIAN / f"gims.{kind}"
        assert link.is_symlink() and link.resolve() == (REPO / f"units/gims.{kind}").resolve()


def test_every_unit_in_the_tree_is_packaged():
    units = [p for p in (REPO / "units").glob("*") if p.suffix in (".service", ".path",
                                                                     ".timer", ".socket")]
    missing = [p.name for p in units if packaged(f"units/{p.name}") is None]
    assert not missing, f"units/ files debian/gims.install does not install: {missing}"


def test_every_console_script_and_unit_has_a_man_page():
    pages = manpages()
    for script in DOCUMENTED_SCRIPTS:
        assert {f"{script}.1", f"{script}.8"} & pages, f"no man page for {script}"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for script in scripts:
        assert {f"{script}.1", f"{script}.8"} & pages, f"no man page for {script}"
    links = (DEBIAN / "gims.links").read_text()
    for unit in DOCUMENTED_UNITS - {"gimsd.service"}:
        assert f"{unit}.8" in pages or f"/{unit}.8.gz" in links, f"no man page for {unit}"
    for page in pages:
        assert (REPO / "man" / page).is_file(), page


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")
def test_man_pages_render_without_warnings():
    for page in sorted((REPO / "man").iterdir()):
        proc = subprocess.run(["man", "--warnings", "-l", "-Tutf8", str(page)],
                              capture_output=True, text=True, env={"LC_ALL": "C.UTF-8",
                                                                    "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0 and proc.stderr == "", f"{page.name}: {proc.stderr}"
        text = re.sub(r".\x08", "", proc.stdout)  # drop nroff's overstrike (bold, underline)
        assert "NAME" in text and "SEE ALSO" in text, text[:200]


def test_pcapy_ng_tarball_is_pinned_not_committed():
    pin = (DEBIAN / "vendor/pcapy_ng-2.1.0.tar.gz.sha256").read_text().split()
    assert re.fullmatch(r"[0-9a-f]{64}", pin[0]) and pin[1] == "debian/vendor/pcapy_ng-2.1.0.tar.gz"
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "debian/vendor"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked == ["debian/vendor/pcapy_ng-2.1.0.tar.gz.sha256"], tracked
    assert pin[0] in (DEBIAN / "copyright").read_text()
    assert pin[0] in (DEBIAN / "README.source").read_text()
