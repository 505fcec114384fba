"""Stands in for gims-capture inside a real capture@ unit to check what the unit's sandbox
allows and forbids (used by test_units.py through an instance drop-in that replaces only
ExecStart). It does what gims-capture needs — reads its credential, imports numpy and
pcapy under MemoryDenyWriteExecute, opens a live capture on the interface (CAP_NET_RAW),
writes into its spool, sends READY/STATUS/WATCHDOG — and records which forbidden things
failed, as JSON in <spool>/probe.json.
"""

import json
import os
import sys
import time


def attempt(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:  # the point is to record every failure, whatever its kind
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY", "")
    cfg = json.load(open(os.path.join(cred_dir, "capture.json")))
    spool = cfg["output_dir"]
    res = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
           "credentials_directory": cred_dir, "config": cfg}

    def numpy_work():
        import numpy as np
        a = np.arange(1000, dtype=np.uint32)
        return int((a * 3).sum())

    def live_capture():
        import pcapy
        cap = pcapy.open_live(cfg["interface"], 128, 1, 500)
        n = 0
        deadline = time.time() + 5
        while n < 3 and time.time() < deadline:
            hdr, data = cap.next()
            if hdr is not None and data:
                n += 1
        return n

    def cap_eff():
        for line in open("/proc/self/status"):
            if line.startswith(("CapEff", "CapBnd", "CapAmb")):
                res[line.split(":")[0]] = line.split()[1]
        return True

    res["numpy"] = attempt(numpy_work)
    res["live_capture"] = attempt(live_capture)
    res["caps"] = attempt(cap_eff)
    res["list_spool_root"] = attempt(lambda: sorted(os.listdir("/var/spool/gims")))
    res["read_state_dir"] = attempt(lambda: os.listdir("/var/lib/gims"))
    res["write_etc"] = attempt(lambda: open("/etc/gims-probe", "w").close())
    res["write_tmp"] = attempt(lambda: open("/tmp/gims-probe", "w").close())
    res["write_srv"] = attempt(lambda: open("/srv/gims/probe", "w").close())
    res["read_shadow"] = attempt(lambda: open("/etc/shadow").read(1))
    res["umask_file_mode"] = attempt(
        lambda: (open(os.path.join(spool, "umask-test"), "w").close(),
                 oct(os.stat(os.path.join(spool, "umask-test")).st_mode & 0o777))[1])

    tmp = os.path.join(spool, ".probe.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.rename(tmp, os.path.join(spool, "probe.json"))
    if cfg.get("fail"):  # before READY=1, as a capture with a bad config would
        print("probe: failing as asked: " + cfg["fail"], file=sys.stderr)
        return 3
    from systemd import daemon, journal
    journal.send("probe running", PROBE="1")
    daemon.notify("READY=1\nSTATUS=packets_observed=0 files_written=0")
    daemon.notify("WATCHDOG=1")
    time.sleep(float(cfg.get("linger", 0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
