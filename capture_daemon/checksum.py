"""Internet checksum arithmetic (RFC 1071 / RFC 1624) over whole batches of packets.

All functions work on numpy arrays with one entry per packet; sums are kept unfolded in int64
and folded once. Byte ranges are given as absolute offsets into the batch buffer.
"""
from __future__ import annotations

import numpy as np

# Largest slice of the buffer turned into int64 prefix sums at once (memory bound: ~3 x 8 bytes
# per buffer byte while it lives).
_RANGE_CHUNK = 1 << 21


def fold(s) -> np.ndarray:
    """One's complement 16-bit value of the non-negative sums s (end-around carry); 0 only for 0."""
    s = np.asarray(s, dtype=np.int64)
    return np.where(s == 0, 0, 1 + (s - 1) % 0xFFFF)


def finish(s) -> np.ndarray:
    """Checksum field value for the sum s of everything it covers except the field itself."""
    return (~fold(s)) & 0xFFFF


def incremental(cs, old_sum, new_sum, nwords) -> np.ndarray:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for nwords changed 16-bit words whose old values
    sum to old_sum and new values to new_sum. A checksum that was right stays right; one that
    was wrong stays wrong by the same amount."""
    cs = np.asarray(cs, dtype=np.int64)
    x = (0xFFFF - cs) + np.int64(nwords) * 0xFFFF - old_sum + new_sum
    return finish(x)


def word_sum(b: np.ndarray) -> np.ndarray:
    """Sum of the big-endian 16-bit words of each row of an (n, k) uint8 array (k even)."""
    b = b.astype(np.int64)
    return (b[:, 0::2] * 256 + b[:, 1::2]).sum(axis=1)


def get16(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return buf[pos].astype(np.int64) * 256 + buf[pos + 1]


def put16(buf: np.ndarray, pos: np.ndarray, val) -> None:
    val = np.asarray(val, dtype=np.int64)
    buf[pos] = (val >> 8) & 0xFF
    buf[pos + 1] = val & 0xFF


def gather(buf: np.ndarray, pos: np.ndarray, end: np.ndarray, k: int):
    """(bytes, ok): the k bytes at pos for each packet, 0 where not captured (>= end)."""
    idx = pos[:, None] + np.arange(k)
    ok = (idx >= 0) & (idx < end[:, None])
    out = np.zeros(idx.shape, dtype=np.uint8)
    out[ok] = buf[idx[ok]]
    return out, ok


def scatter(buf: np.ndarray, pos: np.ndarray, data: np.ndarray, ok: np.ndarray) -> None:
    """Write data[i, j] to buf[pos[i] + j] where ok[i, j]."""
    idx = pos[:, None] + np.arange(data.shape[1])
    buf[idx[ok]] = data[ok]


def range_sums(buf: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Sum of the big-endian 16-bit words of buf[start:stop] for each packet (words aligned at
    start; an odd last byte is padded with zero). Uses prefix sums over buffer slices of at most
    _RANGE_CHUNK bytes (plus one packet), so the cost is one pass over the bytes involved."""
    out = np.zeros(len(start), dtype=np.int64)
    if len(start) == 0:
        return out
    start = np.asarray(start, dtype=np.int64)
    stop = np.asarray(stop, dtype=np.int64)
    group = (start - start.min()) // _RANGE_CHUNK
    for g in np.unique(group):
        m = group == g
        s, t = start[m], stop[m]
        lo, hi = int(s.min()), int(t.max())
        b = buf[lo:hi].astype(np.int64)
        # Prefix sums with weight 256 on even absolute offsets (p_even) or odd ones (p_odd):
        # a range starting at an even offset has its high bytes there.
        par = lo & 1
        w = b.copy()
        w[par::2] *= 256
        p_even = np.zeros(len(b) + 1, dtype=np.int64)
        np.cumsum(w, out=p_even[1:])
        w = b
        w[1 - par::2] *= 256
        p_odd = np.zeros(len(b) + 1, dtype=np.int64)
        np.cumsum(w, out=p_odd[1:])
        rs, rt = s - lo, t - lo
        out[m] = np.where((s & 1) == 0, p_even[rt] - p_even[rs], p_odd[rt] - p_odd[rs])
    return out
