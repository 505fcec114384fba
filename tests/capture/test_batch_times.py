"""Batch.first_at_or_after and Batch.time_at (the pipeline's file-boundary search, which skips
computing the times array when no packet can reach the boundary) against the times array."""
import numpy as np
from hypothesis import given, settings, strategies as st

from capture_daemon.batch import from_packets

PKT = b"\x00" * 60


def _batch(secs, usecs):
    b = from_packets([PKT] * len(secs))
    b.ts_sec = np.asarray(secs, dtype=np.int64)
    b.ts_usec = np.asarray(usecs, dtype=np.int64)
    return b


def _reference(b, t, start):
    times = b.ts_sec + b.ts_usec * 1e-6
    later = np.flatnonzero(times[start:] >= t)
    return start + int(later[0]) if len(later) else len(b)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), base=st.integers(0, 2_000_000_000))
def test_first_at_or_after_is_the_times_arrays_answer(data, n, base):
    secs = data.draw(st.lists(st.integers(base, base + 3), min_size=n, max_size=n))
    usecs = data.draw(st.lists(st.integers(0, 999_999), min_size=n, max_size=n))
    b = _batch(secs, usecs)
    times = b.ts_sec + b.ts_usec * 1e-6
    start = data.draw(st.integers(0, n))
    # boundaries exactly at packet times (the edge), just around them, and anywhere
    t = data.draw(st.one_of(st.sampled_from(times.tolist()),
                            st.sampled_from(times.tolist()).map(lambda x: np.nextafter(x, np.inf)),
                            st.floats(base - 1, base + 5)))
    expected = _reference(b, t, start)
    assert b.first_at_or_after(t, start) == expected
    if max(secs) + max(usecs) * 1e-6 < t:  # no packet can reach t: the array is not computed
        assert "times" not in b.__dict__
    b.times  # noqa: B018 - computed: the same answer from the cached array
    assert b.first_at_or_after(t, start) == expected
    i = data.draw(st.integers(0, n - 1))
    assert b.time_at(i) == times[i]


def test_no_packet_reaches_an_infinite_boundary():
    b = _batch([5, 6], [999_999, 0])
    assert b.first_at_or_after(float("inf")) == 2
    assert b.first_at_or_after(6.0) == 1
    assert b.first_at_or_after(5.999999) == 0
