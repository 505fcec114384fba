"""gimsd/bpf.py: BPF filters checked with libpcap directly (pcapy-ng's compile reads its error
message from a closed handle)."""
import pytest

from gimsd.bpf import FilterError, check_filter


@pytest.mark.parametrize("expr", ["", "tcp port 80", "vlan 7 and (udp or icmp6)", "ip6 and net 2001:db8::/32",
                                  "ip broadcast"])
def test_filters_that_compile(expr):
    check_filter(expr)


@pytest.mark.parametrize("expr,reason", [
    ("tcp port", "syntax error"),
    ("host 999.1.1.1", "999.1.1.1"),
    ("port 70000", "port"),
    ("ether proto \\nosuch", "nosuch"),
])
def test_filters_that_do_not_compile_give_libpcap_s_reason(expr, reason):
    # the reason is read before the handle is closed: libpcap's own text, every time
    for _ in range(50):
        with pytest.raises(FilterError) as info:
            check_filter(expr)
        assert reason in str(info.value), str(info.value)
        assert str(info.value).isprintable()


def test_nul_is_refused_before_libpcap_sees_it():
    with pytest.raises(FilterError, match="NUL"):
        check_filter("tcp\0 or udp")
