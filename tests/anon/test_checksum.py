"""Checksum arithmetic against a plain RFC 1071 reference."""
import numpy as np
from hypothesis import assume, given, settings, strategies as st

from capture_daemon import checksum as ck


def ref_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))


def ref_checksum(data: bytes) -> int:
    s = ref_sum(data)
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=3000), st.lists(st.integers(0, 3000), max_size=40))
def test_range_sums_match_reference(data, cuts):
    buf = np.frombuffer(data, dtype=np.uint8)
    cuts = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    start, stop = np.array(cuts[:-1]), np.array(cuts[1:])
    perm = np.random.default_rng(len(data)).permutation(len(start))  # any order
    got = ck.range_sums(buf, start[perm], stop[perm])
    assert [int(g) for g in got] == [ref_sum(data[a:b]) for a, b in zip(start[perm], stop[perm])]


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=4, max_size=200).filter(lambda d: len(d) % 2 == 0),
       st.integers(0, 98), st.binary(min_size=2, max_size=2))
def test_incremental_equals_recompute(data, word, new_word):
    """RFC 1624: updating a right checksum for a changed word gives the recomputed one
    (up to the one's complement representation of zero, which verifies the same)."""
    word = word % (len(data) // 2)
    cs = ref_checksum(data)
    old = int.from_bytes(data[2 * word:2 * word + 2], "big")
    new = int.from_bytes(new_word, "big")
    changed = data[:2 * word] + new_word + data[2 * word + 2:]
    # All-zero data (sum 0) is the one degenerate case of eqn. 3; no packet header is all
    # zeros (IP version, pseudo-header protocol), so it never occurs in our use.
    assume(ref_sum(changed) != 0)
    inc = int(ck.incremental(np.array([cs]), np.array([old]), np.array([new]), 1)[0])
    full = ref_checksum(changed)
    assert inc == full or {inc, full} == {0, 0xFFFF}
    # and the packet with the updated checksum verifies
    s = ref_sum(changed) + inc
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    assert s == 0xFFFF


def test_fold_and_finish():
    assert list(ck.fold(np.array([0, 1, 0xFFFF, 0x10000, 0x1FFFE]))) == [0, 1, 0xFFFF, 1, 0xFFFF]
    assert int(ck.finish(np.array([0x1234]))[0]) == ~0x1234 & 0xFFFF
