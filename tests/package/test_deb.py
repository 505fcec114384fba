"""The Debian package, end to end: build it, install it with apt into a clean Debian 12 root,
boot systemd there (systemd-nspawn), run an experiment through XML-RPC on the installed
package with real traffic over a veth pair, upgrade it mid-experiment, then remove and purge
it and show that nothing of it is left.

The .debs come from tools/build-deb.sh (run here), or from GIMS_DEB_DIR when a session already
built them. The clean root is cached under /var/cache/gims-test (see container.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests import helpers

import sys
sys.path.insert(0, str(Path(__file__).resolve().parent))
from container import Container, run  # noqa: E402  (this directory's helper)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "debtest"
UPGRADE_VERSION = "0.1.0+upgradetest1"
# Volatile places every apt/systemd run touches; not "left over" by the package.
VOLATILE = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/log", "/var/cache",
            "/var/lib/apt", "/var/lib/dpkg", "/var/lib/systemd", "/var/lib/ucf",
            "/var/lib/polkit-1", "/debs", "/etc/ld.so.cache", "/etc/machine-id",
            "/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-")
ACCOUNT_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")

needs_tools = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in
                                 ("systemd-nspawn", "debootstrap", "dpkg-buildpackage", "nsenter")),
    reason="needs root, systemd-nspawn (systemd-container), debootstrap and dpkg-dev "
           "(listed in .ci/apt-packages.txt)")


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix=f"gims-deb-{os.getpid()}-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def debs(workdir) -> dict[str, Path]:
    """gims_*.deb and python3-pcapy-ng_*.deb, built now unless GIMS_DEB_DIR points at them."""
    given = os.environ.get("GIMS_DEB_DIR")
    out = Path(given) if given else workdir / "debs"
    if not given:
        run([str(REPO / "tools/build-deb.sh"), str(out)], timeout=1200)
    found = {}
    for name in ("gims", "python3-pcapy-ng"):
        matches = sorted(out.glob(f"{name}_*.deb"))
        assert matches, f"no {name}_*.deb in {out}"
        found[name] = matches[-1]
    lintian = (out / "lintian.txt").read_text() if (out / "lintian.txt").exists() else ""
    assert not re.search(r"^E: ", lintian, re.M), f"lintian errors:\n{lintian}"
    return found


@pytest.fixture(scope="module")
def node(workdir, debs):
    """The booted clean root, with the package's dependencies already downloaded."""
    ct = Container(workdir, f"gimsdeb{os.getpid()}", debs["gims"].parent)
    ct.create()
    ct.prepare("apt-get", "update", "-qq")
    ct.prepare("apt-get", "install", "-y", "-qq", "--download-only",
               *(f"/debs/{d.name}" for d in debs.values()))
    ct.boot()
    try:
        yield ct
    finally:
        ct.stop()


@pytest.fixture(scope="module")
def veth(node):
    """A veth pair: one end in the container (the capture interface), the other in a netns of
    this test that sends the traffic. Addresses from TEST-NET-1 (RFC 5737)."""
    tag = f"{os.getpid() % 100000}"
    inside, outside, netns = f"gd{tag}c", f"gd{tag}p", f"gims-deb-{tag}"
    run(["ip", "netns", "add", netns])
    try:
        run(["ip", "link", "add", inside, "type", "veth", "peer", "name", outside])
        run(["ip", "link", "set", outside, "netns", netns])
        run(["ip", "link", "set", inside, "netns", str(node.leader)])
        node.host_in_netns("ip", "addr", "add", "192.0.2.1/24", "dev", inside)
        node.host_in_netns("ip", "link", "set", inside, "up")
        run(["ip", "-n", netns, "addr", "add", "192.0.2.2/24", "dev", outside])
        run(["ip", "-n", netns, "link", "set", outside, "up"])
        yield inside, netns
    finally:
        run(["ip", "netns", "delete", netns], check=False)  # takes the veth pair with it


def xmlrpc(node: Container, method: str, *args):
    """Call gimsd's XML-RPC API from inside the container (its loopback, its python3)."""
    client = textwrap.dedent("""
        import json, sys, xmlrpc.client
        req = json.load(sys.stdin)
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1:8001/RPC2", allow_none=True)
        try:
            print(json.dumps({"ok": getattr(proxy, req["method"])(*req["args"])}, default=str))
        except xmlrpc.client.Fault as fault:
            print(json.dumps({"fault": fault.faultString}))
    """)
    out = node.exec("python3", "-c", client, input=json.dumps({"method": method, "args": args}))
    answer = json.loads(out.stdout)
    assert "fault" not in answer, f"{method}{args!r}: Fault {answer['fault']}"
    return answer["ok"]


def wait_for(what: str, probe, timeout: float):
    return helpers.wait_for(probe, timeout, what=what)


def unit_prop(node: Container, unit: str, prop: str) -> str:
    return node.exec("systemctl", "show", "-P", prop, unit).stdout.strip()


def snapshot(node: Container) -> tuple[set[str], dict[str, str]]:
    """Every path in the container outside volatile places, and the account files."""
    prune = " -o ".join(f"-path {p}" for p in VOLATILE)
    paths = set(node.sh(f"find / -xdev \\( {prune} \\) -prune -o -print").stdout.splitlines())
    paths = {p for p in paths if "/__pycache__" not in p}
    accounts = {f: node.exec("cat", f).stdout for f in ACCOUNT_FILES}
    return paths, accounts


def repack_with_version(deb: Path, version: str, outdir: Path) -> Path:
    """The same package under a newer version number: a real dpkg upgrade path."""
    tree = outdir / "repack"
    run(["dpkg-deb", "-R", str(deb), str(tree)])
    control = tree / "DEBIAN/control"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control.read_text()))
    out = outdir / f"gims_{version}_repack.deb"
    run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(out)])
    shutil.rmtree(tree)
    return out


def read_pcap(data: bytes) -> list[bytes]:
    magic = struct.unpack("<I", data[:4])[0]
    assert magic in (0xA1B2C3D4, 0xA1B23C4D), hex(magic)
    packets, pos = [], 24
    while pos < len(data):
        _, _, caplen, _ = struct.unpack("<IIII", data[pos:pos + 16])
        packets.append(data[pos + 16:pos + 16 + caplen])
        pos += 16 + caplen
    assert pos == len(data), "truncated pcap"
    return packets


@needs_tools
def test_install_run_upgrade_remove_purge(node, debs, veth):
    iface, netns = veth
    deb_args = [f"/debs/{d.name}" for d in debs.values()]

    # --- A clean root with the dependencies installed; remember what is there. -------------
    deps = set()
    for deb in debs.values():
        fields = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
        for alt in fields.split(","):
            name = alt.split("|")[0].split("(")[0].strip().split(":")[0]
            if name and name not in debs:
                deps.add(name)
    node.exec("apt-get", "install", "-y", "-q", *sorted(deps))
    before_paths, before_accounts = snapshot(node)
    assert not node.exec("getent", "passwd", "gims", check=False).stdout

    # --- Install: users, dirs, units, polkit rule, conffile, man pages; gimsd running. ------
    node.exec("apt-get", "install", "-y", "-q", *deb_args)
    for user in ("gims", "gims-capture", "gims-upload"):
        assert node.exec("getent", "passwd", user).stdout.startswith(user + ":")
    assert set(node.exec("getent", "group", "gims-spool").stdout.strip().split(":")[3]
               .split(",")) == {"gims", "gims-capture", "gims-upload"}
    files = set(node.exec("dpkg", "-L", "gims").stdout.splitlines())
    for path in ("/usr/bin/gimsd", "/usr/bin/gimsctl", "/usr/bin/gims-capture",
                 "/usr/bin/gims-upload", "/lib/systemd/system/gimsd.service",
                 "/lib/systemd/system/capture@.service", "/lib/systemd/system/gims-upload@.service",
                 "/lib/systemd/system/gims-upload@.path",
                 "/lib/systemd/system/gims-upload-probe@.service", "/usr/lib/sysusers.d/gims.conf",
                 "/usr/lib/tmpfiles.d/gims.conf", "/usr/share/polkit-1/rules.d/50-gims.rules",
                 "/etc/gims/gimsd.toml", "/usr/share/man/man8/gimsd.8.gz",
                 "/usr/share/man/man8/gims-capture.8.gz", "/usr/share/man/man1/gimsctl.1.gz",
                 "/usr/share/man/man8/capture@.service.8.gz"):
        assert path in files, f"{path} not installed by gims"
    assert "/etc/gims/gimsd.toml" in node.exec("dpkg-query", "-W", "-f", "${Conffiles}",
                                               "gims").stdout
    assert node.exec("stat", "-c", "%U:%G %a", "/var/lib/gims").stdout.split() == ["gims:gims",
                                                                                "750"]
    assert unit_prop(node, "gimsd.service", "UnitFileState") == "enabled"
    for template in ("capture@.service", "gims-upload@.service", "gims-upload@.path",
                     "gims-upload-probe@.service"):
        state = node.exec("systemctl", "is-enabled", template, check=False).stdout.strip()
        assert state in ("static", "disabled"), f"{template} is {state}"
    assert node.sh("systemctl list-units --all --plain --no-legend 'capture@*' 'gims-upload@*'"
                   ).stdout.strip() == "", "the package started a template instance"
    wait_for("gimsd active after install",
             lambda: unit_prop(node, "gimsd.service", "ActiveState") == "active", 60)
    # The installed capture path works with what is installed (python3-pcapy-ng's batch API):
    # gims-capture turns a trace into a pcap with its metadata record.
    shutil.copy(REPO / "tests/data/zeek__5-pings.pcap", node.root / "var/tmp/pings.pcap")
    node.exec("python3", "-c", "import pcapy; "
              "assert hasattr(pcapy.open_offline('/var/tmp/pings.pcap'), 'next_batch')")
    node.exec("gims-capture", "--read", "/var/tmp/pings.pcap", "--output-dir", "/var/tmp/out",
              "--experiment", "pkg", "--site", "LAB")
    out = node.sh("cd /var/tmp/out && ls").stdout.split()
    assert len([n for n in out if n.endswith(".pcap")]) == 1 and \
        len([n for n in out if n.endswith(".pcap.meta.json")]) == 1, out
    node.exec("rm", "-rf", "/var/tmp/out", "/var/tmp/pings.pcap")

    # --- Configure the node for the test interface; gimsd re-reads it on restart. ----------
    # The operator's edit of the shipped conffile: uncomment and set four defaults.
    conf = node.exec("cat", "/etc/gims/gimsd.toml").stdout
    for key, value in (("allowed_interfaces", f'["{iface}"]'), ("default_device", f'"{iface}"'),
                       ("stats_interval", "2"), ("rollover_seconds", "10")):
        conf, n = re.subn(rf"(?m)^\s*#?\s*{key}\s*=.*$", f"{key} = {value}", conf)
        assert n == 1, f"{key} not found once in the shipped gimsd.toml"
    node.exec("tee", "/etc/gims/gimsd.toml", input=conf)
    node.exec("systemctl", "restart", "gimsd.service")
    wait_for("gimsd answering getState", lambda: _answers(node), 60)

    # --- An experiment through XML-RPC, as an AM drives it: partial configure calls. -------
    xmlrpc(node, "configureExperiment", {"ExperimentId": EXPERIMENT, "SiteLocation": "deb",
                                         "MetaDataSpec": {"UserText": "package test"}})
    xmlrpc(node, "configureExperiment", {
        "ExperimentId": EXPERIMENT,
        "CaptureSpec": {"filterexpr": "icmp", "device": iface},
        "StorageSpec": {"storagetype": "local",
                        "storageparams": {"local_storage_dir": f"/srv/gims/{EXPERIMENT}"}}})
    xmlrpc(node, "startExperiment", {"ExperimentId": EXPERIMENT})
    capture = f"capture@{EXPERIMENT}.service"
    wait_for(f"{capture} active",
             lambda: unit_prop(node, capture, "ActiveState") == "active", 60)
    assert unit_prop(node, capture, "User") == "gims-capture"
    pinger = subprocess.Popen(["ip", "netns", "exec", netns, "ping", "-q", "-i", "0.05",
                               "-c", "400", "-W", "1", "192.0.2.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("captured packets in stats", lambda: int(xmlrpc(
            node, "getExperimentStats", {"ExperimentId": EXPERIMENT}).get(
                "packets_observed", 0)) > 50, 60)

        # --- Upgrade mid-experiment (to a newer version of the same files): the capture
        # keeps running, untouched; gimsd restarts cleanly and still knows the experiment. ---
        capture_pid = unit_prop(node, capture, "MainPID")
        gimsd_pid = unit_prop(node, "gimsd.service", "MainPID")
        newer = repack_with_version(debs["gims"], UPGRADE_VERSION, node.root / "var/tmp")
        node.exec("apt-get", "install", "-y", "-q", f"/var/tmp/{newer.name}")
        assert node.exec("dpkg-query", "-W", "-f", "${Version}", "gims").stdout == \
            UPGRADE_VERSION
        assert unit_prop(node, capture, "MainPID") == capture_pid, "upgrade restarted capture"
        wait_for("gimsd active after upgrade",
                 lambda: unit_prop(node, "gimsd.service", "ActiveState") == "active", 60)
        assert unit_prop(node, "gimsd.service", "MainPID") != gimsd_pid
        wait_for("gimsd answering after upgrade", lambda: _answers(node), 60)
        stats = xmlrpc(node, "getExperimentStats", {"ExperimentId": EXPERIMENT})
        assert str(stats.get("capture_enabled", stats.get("state"))).lower() in (
            "true", "running", "1"), stats
        pinger.wait(timeout=60)
    finally:
        if pinger.poll() is None:
            pinger.kill()
            pinger.wait()

    # --- Stop: the last file is finalized and delivered to local storage. ------------------
    xmlrpc(node, "stopExperiment", {"ExperimentId": EXPERIMENT})
    wait_for(f"{capture} stopped",
             lambda: unit_prop(node, capture, "ActiveState") in ("inactive", "failed"), 120)
    assert unit_prop(node, capture, "Result") == "success"

    def delivered():
        names = node.sh(f"find /srv/gims -type f -name '{EXPERIMENT}_*' | sort").stdout.split()
        pcaps = [n for n in names if n.endswith(".pcap")]
        metas = [n for n in names if n.endswith(".pcap.meta.json")]
        spool = node.sh(f"ls -A /var/spool/gims/{EXPERIMENT} 2>/dev/null | "
                        "grep -v '^\\.' || true").stdout.split()
        return (pcaps, metas) if pcaps and len(metas) == len(pcaps) and not spool else None
    pcaps, metas = wait_for("files delivered to /srv/gims", delivered, 120)
    total = 0
    for pcap in pcaps:
        packets = read_pcap((node.root / pcap.lstrip("/")).read_bytes())
        meta = json.loads(node.exec("cat", pcap + ".meta.json").stdout)
        assert meta["experiment"] == EXPERIMENT and meta["device"] == iface
        assert meta["packets_written"] == len(packets)
        assert meta["user_text"] == "package test"
        assert meta["pcap_stats"]["ps_drop"] == 0
        # Every packet is ICMP over IPv4 between the veth ends (filter "icmp").
        for pkt in packets:
            assert pkt[12:14] == b"\x08\x00" and pkt[23] == 1
            assert {pkt[26:30], pkt[30:34]} == {bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])}
        total += len(packets)
    assert total >= 400, f"only {total} packets captured of 400 echo requests and their replies"
    journal = node.exec("journalctl", "--no-pager", "-o", "cat", f"EXPERIMENT={EXPERIMENT}").stdout
    assert journal.strip(), "no journal lines with EXPERIMENT= field"

    # --- Remove while a second experiment is capturing: remove stops it cleanly (its last
    # file is finished, with metadata); the service is gone; config, state, accounts stay. ---
    second = f"{EXPERIMENT}2"
    xmlrpc(node, "configureExperiment", {
        "ExperimentId": second, "SiteLocation": "deb",
        "CaptureSpec": {"filterexpr": "icmp", "device": iface},
        "StorageSpec": {"storagetype": "local",
                        "storageparams": {"local_storage_dir": f"/srv/gims/{second}"}}})
    xmlrpc(node, "startExperiment", {"ExperimentId": second})
    wait_for(f"capture@{second} active",
             lambda: unit_prop(node, f"capture@{second}.service", "ActiveState") == "active", 60)
    run(["ip", "netns", "exec", netns, "ping", "-q", "-i", "0.05", "-c", "40", "-W", "1",
         "192.0.2.1"])
    node.exec("apt-get", "remove", "-y", "-q", "gims", "python3-pcapy-ng")
    assert unit_prop(node, f"capture@{second}.service", "ActiveState") == "inactive"
    assert node.exec("journalctl", "--no-pager", "-o", "cat", "-u",
                     f"capture@{second}.service").stdout.count("wrote ") >= 1
    leftover = node.sh(f"cd /var/spool/gims/{second} && ls -A; cd /srv/gims && "
                       f"find . -path './{second}*' -type f", check=False).stdout.split()
    data = [n for n in leftover if n.endswith(".pcap")]
    assert data and all(n + ".meta.json" in leftover for n in data), leftover
    assert node.exec("systemctl", "cat", "gimsd.service", check=False).returncode != 0
    assert unit_prop(node, "gimsd.service", "ActiveState") == "inactive"
    assert node.exec("test", "-f", "/etc/gims/gimsd.toml", check=False).returncode == 0
    assert node.exec("test", "-d", f"/var/lib/gims/experiments/{EXPERIMENT}",
                     check=False).returncode == 0
    assert node.exec("getent", "passwd", "gims", check=False).returncode == 0

    # --- Purge: nothing of the package is left but the experimenter's delivered data. ------
    node.exec("apt-get", "purge", "-y", "-q", "gims", "python3-pcapy-ng")
    after_paths, after_accounts = snapshot(node)
    assert after_accounts == before_accounts, "accounts left after purge"
    kept = {p for p in after_paths - before_paths if p == "/srv/gims" or
            p.startswith("/srv/gims/")}
    assert after_paths - before_paths - kept == set(), "left after purge"
    assert before_paths - after_paths == set(), "purge deleted something it did not make"
    assert len(before_paths) > 5000  # the snapshot did see the root
    # Kept: only /srv/gims with the data files (and metadata) delivered there.
    kept_files = {p for p in kept if node.exec("test", "-f", p, check=False).returncode == 0}
    assert set(pcaps) | set(metas) <= kept_files, kept
    strays = sorted(p for p in kept_files if not re.fullmatch(
        rf"/srv/gims/{EXPERIMENT}2?/(.*/)?{EXPERIMENT}2?_DEB_\d{{14}}(_\d+)?"
        r"\.pcap(\.meta\.json)?", p))
    assert not strays, f"left in /srv/gims besides delivered data: {strays}"
    units = node.sh("systemctl list-units --all --plain --no-legend "
                    "'gims*' 'capture@*'; systemctl list-unit-files --no-legend "
                    "'gims*' 'capture@*'", check=False).stdout.strip()
    assert units == "", f"units still known to systemd after purge:\n{units}"
    assert node.exec("dpkg-query", "-W", "gims", check=False).returncode != 0


def _answers(node: Container) -> bool:
    try:
        state = xmlrpc(node, "getState")
    except (AssertionError, json.JSONDecodeError):
        return False
    return state is not None
