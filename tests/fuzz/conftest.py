"""The fuzz tests reuse gimsd's test fixtures (the real server on a free loopback port with a
temporary state/spool dir and the FakeUnits test double for the systemd side): imported, not
copied, so both suites drive the same server setup."""
from tests.gimsd.conftest import Node, make_config, node, node_factory  # noqa: F401
