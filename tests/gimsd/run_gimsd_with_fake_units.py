"""Run the real gimsd main() (config, logging, sd_notify, signals, reconcile loop) with FakeUnits,
the test double for the systemd side (see gimsd_fake_units.py). Used by test_daemon.py as a
subprocess: python tests/gimsd/run_gimsd_with_fake_units.py --config FILE"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gimsd_fake_units import FakeUnits  # noqa: E402

from gimsd import server  # noqa: E402

server._make_unit_manager = FakeUnits
sys.exit(server.main())
