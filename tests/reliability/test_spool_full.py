"""The spool disk fills up. (1) A small tmpfs mounted over one experiment's spool inside the
node, with its S3 storage unreachable so nothing drains: the capture counts what it could not
write (packets_unwritten in getExperimentStats), says so in the journal, and resumes writing
once storage is back and the uploads free space. (2) The per-experiment quota (gimsd.toml
limits.spool_quota_bytes, handed to capture as spool_quota_bytes): one experiment stuck at its
quota does not stop another one from writing and delivering."""
import time

import pytest

from .conftest import (NodeConfig, SpoolWatcher, lost, check_delivered_pcaps, configure_local, delivered_pcaps, record,
                       paced_blast, stats, stop_and_drain, unit_failures, wait_for)

pytestmark = pytest.mark.integration

def s3_experiment(am, exp, moto_s3):
    bucket = moto_s3.bucket(exp.lower().replace("_", "-")[:40] + "-f")
    ident = {"ExperimentId": exp}
    am.configureExperiment({**ident, "CaptureSpec": {"filterexpr": "", "device": "gims-sb0"},
                            "StorageSpec": {"storagetype": "s3", "storageparams": {
                                **moto_s3.params(bucket), "rollover_interval": 0.05}}})
    return ident, bucket


def test_spool_disk_full_counts_unwritten_and_resumes(sandbox, am, exp_id, upload_units, moto_s3, tmp_path):
    cfg = NodeConfig(sandbox)
    cfg.set(cfg.with_full_snaplen())
    try:
        _disk_full(sandbox, am, exp_id, moto_s3, tmp_path)
    finally:
        cfg.restore()


def _disk_full(sandbox, am, exp, moto_s3, tmp_path):
    t_start = time.time()
    spool = f"/var/spool/gims/{exp}"
    ident, bucket = s3_experiment(am, exp, moto_s3)
    sandbox.systemctl("start", f"gims-spool@{exp}.service")  # the spool directory, as capture@ would
    uid = sandbox.ids("gims-capture")[0]
    gid = next(int(line.split(":")[2]) for line in sandbox.path("/etc/group").read_text().splitlines()
               if line.startswith("gims-spool:"))
    sandbox.run("mount", "-t", "tmpfs", "-o", f"size=6m,mode=2770,uid={uid},gid={gid}", f"gims-rl-{exp}", spool)
    watch = SpoolWatcher(sandbox, exp).__enter__()
    try:
        moto_s3.proxy.stop()  # nothing drains
        try:
            am.startExperiment(ident)
            paced_blast(9 << 20)
            s = wait_for(lambda: (lambda s: s if s["packets_unwritten"] > 0 else None)(stats(am, exp)), 30)
            assert s, stats(am, exp)
            full = s
            assert s["state"] == "running", s  # still capturing (counting), not crashed
            journal = sandbox.journal(f"EXPERIMENT={exp}", f"_SYSTEMD_UNIT=capture@{exp}.service")
            assert "is full" in journal, journal[-2000:]
        finally:
            moto_s3.proxy.start()
        # storage back: uploads free the spool, capture writes again
        written_then = stats(am, exp)["packets_written"]
        assert wait_for(lambda: stats(am, exp)["files_uploaded"] >= 3, 90), stats(am, exp)
        def writing_again():
            paced_blast(256 << 10, 1.0)
            return stats(am, exp)["packets_written"] > written_then
        assert wait_for(writing_again, 60, 2), stats(am, exp)
        final = stop_and_drain(am, exp, timeout=120)
        assert int(sandbox.show(f"capture@{exp}.service", "NRestarts")["NRestarts"]) == 0
    finally:
        watch.__exit__(None, None, None)
        sandbox.systemctl("stop", f"capture@{exp}.service", f"gims-upload@{exp}.path",
                          f"gims-upload@{exp}.service", check=False)
        sandbox.run("umount", "-l", spool, check=False)
    files = delivered_pcaps(_download(moto_s3, bucket, tmp_path))
    figures = check_delivered_pcaps(files)
    missing = lost(watch.produced(), files)
    assert not missing, missing
    crashes = unit_failures(sandbox, [exp], t_start)
    assert crashes == 0, crashes
    record("test_spool_full::disk_full", faults_injected=1, packets_unwritten=final["packets_unwritten"],
           packets_unwritten_when_full=full["packets_unwritten"], packets_written=final["packets_written"],
           files_seen_in_spool=len(watch.produced()), files_lost=len(missing), crashes=crashes, **figures)


def _download(moto_s3, bucket, tmp_path):
    d = tmp_path / bucket
    moto_s3.download(bucket, d)
    return d


def test_spool_quota_keeps_one_experiment_from_starving_another(sandbox, am, exp_id, upload_units, moto_s3,
                                                               tmp_path):
    stuck, other = exp_id, exp_id + "-o"
    quota = 1 << 20
    cfg = NodeConfig(sandbox)
    t_start = time.time()
    try:
        cfg.set(cfg.with_full_snaplen() + f"\n[limits]\nspool_quota_bytes = {quota}\n")
        ident_stuck, bucket = s3_experiment(am, stuck, moto_s3)
        ident_other = configure_local(am, other, filterexpr="icmp or icmp6")  # not the UDP blast
        moto_s3.proxy.stop()  # the stuck experiment's storage is unreachable: its spool only grows
        watches = [SpoolWatcher(sandbox, e).__enter__() for e in (stuck, other)]
        try:
            am.startExperiment(ident_stuck)
            am.startExperiment(ident_other)
            paced_blast(3 << 20)
            s = wait_for(lambda: (lambda s: s if s["packets_unwritten"] > 0 else None)(stats(am, stuck)), 30)
            assert s, stats(am, stuck)
            assert s["spool_quota_bytes"] == quota
            # held near its quota, far below the 3 MiB sent. Usually within a few KiB; one run
            # measured 1.67x (docs/RELIABILITY.md, open points), so the bound is 2x
            listing = {p.name: p.stat().st_size for p in sandbox.path(f"/var/spool/gims/{stuck}").iterdir()
                       if p.is_file()}
            assert s["spool_bytes"] <= 2 * quota, (s["spool_bytes"], listing)
            o = stats(am, other)
            assert o["packets_unwritten"] == 0 and o["state"] == "running", o
            up_before = o["files_uploaded"]
            assert wait_for(lambda: stats(am, other)["files_uploaded"] >= up_before + 2, 30), stats(am, other)
            stuck_stats = stats(am, stuck)
        finally:
            moto_s3.proxy.start()
        stop_and_drain(am, other)
        stop_and_drain(am, stuck, timeout=120)
        for w in watches:
            w.__exit__(None, None, None)
        other_files = delivered_pcaps(sandbox.path(f"/srv/gims/{other}"))
        figures = check_delivered_pcaps(other_files)
        stuck_files = delivered_pcaps(_download(moto_s3, bucket, tmp_path))
        stuck_fig = check_delivered_pcaps(stuck_files)
        missing = lost(watches[0].produced(), stuck_files) + lost(watches[1].produced(), other_files)
        assert not missing, missing
        crashes = unit_failures(sandbox, [stuck, other], t_start)
        assert crashes == 0, crashes
        record("test_spool_full::quota", faults_injected=1, quota_bytes=quota,
               stuck_spool_bytes=stuck_stats["spool_bytes"], stuck_packets_unwritten=stuck_stats["packets_unwritten"],
               other_packets_unwritten=0, other_files_delivered=figures["files_delivered"],
               stuck_files_delivered=stuck_fig["files_delivered"],
               files_seen_in_spool=len(watches[0].produced()) + len(watches[1].produced()),
               files_delivered=figures["files_delivered"] + stuck_fig["files_delivered"],
               recovered=figures["recovered"] + stuck_fig["recovered"], files_lost=len(missing), crashes=crashes)
    finally:
        for e in (stuck, other):
            sandbox.systemctl("stop", f"capture@{e}.service", f"gims-upload@{e}.path", check=False)
        cfg.restore()
