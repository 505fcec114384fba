"""Internet checksum arithmetic (RFC 1071 / RFC 1624) over whole batches of packets.

All functions work on numpy arrays with one entry per packet; sums are kept unfolded in int64
and folded once. Byte ranges are given as absolute offsets into the batch buffer.
"""
from __future__ import annotations

import numpy as np

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


def word_sum_u32(v: np.ndarray) -> np.ndarray:
    """Sum of the 16-bit halves of the uint32 values in each row of an (n, k) array."""
    v = v.astype(np.int64)
    return ((v >> 16) + (v & 0xFFFF)).sum(axis=1)


def words_sum_at(buf: np.ndarray, pos: np.ndarray, nwords: int) -> np.ndarray:
    """Sum of the nwords big-endian 16-bit words starting at pos (all captured), read through
    16-bit views of the buffer (one from byte 0, one from byte 1) instead of byte gathers."""
    n = len(buf)
    views = (buf[:n - n % 2].view(">u2"), buf[1:1 + (n - 1) // 2 * 2].view(">u2"))
    out = np.zeros(len(pos), dtype=np.int64)
    odd = (pos & 1) == 1
    for par, sel in ((0, np.flatnonzero(~odd)), (1, np.flatnonzero(odd))):
        if len(sel):
            base = (pos[sel] - par) >> 1
            out[sel] = views[par][base[:, None] + np.arange(nwords)].sum(axis=1, dtype=np.int64)
    return out


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
    """Sum of the big-endian 16-bit words of buf[start:stop] for each range (words aligned at
    start; an odd last byte is padded with zero). Ranges must not overlap. One pass over the
    bytes: the buffer is viewed as 16-bit words twice (from byte 0 and from byte 1) and each
    range is summed with np.add.reduceat on the view matching its parity."""
    start = np.asarray(start, dtype=np.int64)
    stop = np.asarray(stop, dtype=np.int64)
    out = np.zeros(len(start), dtype=np.int64)
    for par in (0, 1):
        sel = np.flatnonzero(((start & 1) == par) & (stop > start))
        if len(sel) == 0:
            continue
        sel = sel[np.argsort(start[sel], kind="stable")]
        s, t = start[sel], stop[sel]
        ws, we = (s - par) // 2, (t - par) // 2  # whole words: [ws, we)
        # Native-order copy of just the words involved: reduceat on a byte-swapped view is
        # ~2x slower than the swap plus reduceat on native words.
        w0 = int(ws.min())
        nw = int(we.max()) - w0
        words = buf[par + 2 * w0:par + 2 * (w0 + nw)].view(">u2").astype(np.uint16)
        ws, we = ws - w0, we - w0
        sums = np.zeros(len(sel), dtype=np.int64)
        has = we > ws
        if has.any():
            a, b = ws[has], we[has]
            idx = np.empty(2 * len(a), dtype=np.int64)
            idx[0::2], idx[1::2] = a, b
            # reduceat sums idx[i]..idx[i+1]; the last range may end at the array's end.
            if idx[-1] >= nw:
                idx = idx[:-1]
            sums[has] = np.add.reduceat(words, idx, dtype=np.int64)[0::2]
        odd = ((t - s) & 1) == 1
        sums[odd] += buf[t[odd] - 1].astype(np.int64) * 256
        out[sel] = sums
    return out
