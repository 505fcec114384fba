"""Crypto-PAn: reference vectors, prefix preservation, agreement with yacryptopan (an
independent implementation, used only here and in bench/), cache/batch consistency, keys."""
import ipaddress
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from capture_daemon import cryptopan
from capture_daemon.cryptopan import CryptoPAn, fingerprint, load_key, parse_key

DATA = Path(__file__).resolve().parents[1] / "data"


def _vectors():
    lines = [ln.split() for ln in (DATA / "cryptopan_ipv4_vectors.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    return bytes.fromhex(lines[0][0]), [(a, b) for a, b in lines[1:]]


KEY, VECTORS = _vectors()
CP = CryptoPAn(KEY)


def test_vector_file_is_complete():
    assert len(VECTORS) == 70


@pytest.mark.parametrize("orig,anon", VECTORS)
def test_reference_vector_one_at_a_time(orig, anon):
    assert CryptoPAn(KEY).anonymize_str(orig) == anon


def test_reference_vectors_batched_uncached_and_cached():
    orig = np.array([int(ipaddress.IPv4Address(a)) for a, _ in VECTORS], np.uint32)
    want = np.array([int(ipaddress.IPv4Address(b)) for _, b in VECTORS], np.uint32)
    cp = CryptoPAn(KEY)
    # Repeats inside one batch, then the same batch again from the cache.
    batch = np.concatenate([orig, orig[::-1], orig[:5]])
    expect = np.concatenate([want, want[::-1], want[:5]])
    assert np.array_equal(cp.anonymize_v4(batch), expect)
    assert cp.cache_sizes()[0] == len(VECTORS)
    assert np.array_equal(cp.anonymize_v4(batch), expect)
    assert np.array_equal(cp._compute_v4(orig), want)
    assert np.array_equal(cp._compute_v4_numpy(orig), want)


def _common_prefix(a: int, b: int, bits: int) -> int:
    x = a ^ b
    return bits if x == 0 else bits - x.bit_length()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 2**32 - 1))
def test_prefix_preservation_v4(a, k, noise):
    # b shares exactly k leading bits with a (or all 32 when k == 32).
    if k == 32:
        b = a
    else:
        flip = 1 << (31 - k)
        low = noise & (flip - 1)
        b = ((a >> (32 - k) << (32 - k)) if k else 0) | ((a & flip) ^ flip) | low
    assert _common_prefix(a, b, 32) == k
    ra, rb = (int(x) for x in CP.anonymize_v4(np.array([a, b], np.uint32)))
    assert _common_prefix(ra, rb, 32) == k


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**128 - 1), st.integers(0, 128), st.integers(0, 2**128 - 1))
def test_prefix_preservation_v6(a, k, noise):
    if k == 128:
        b = a
    else:
        flip = 1 << (127 - k)
        b = ((a >> (128 - k) << (128 - k)) if k else 0) | ((a & flip) ^ flip) | (noise & (flip - 1))
    assert _common_prefix(a, b, 128) == k
    arr = np.frombuffer(a.to_bytes(16, "big") + b.to_bytes(16, "big"), np.uint8).reshape(2, 16)
    r = CP.anonymize_v6(arr)
    ra, rb = (int.from_bytes(r[i].tobytes(), "big") for i in range(2))
    assert _common_prefix(ra, rb, 128) == k


def _random_v6(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    a[: n // 2, :6] = [0x20, 0x01, 0x0d, 0xb8, 0x00, 0x01]  # a shared /48 for half of them
    return a


def test_v6_agrees_with_yacryptopan():
    yacryptopan = pytest.importorskip("yacryptopan")
    for key in (KEY, bytes(range(32)), os.urandom(32)):
        ref = yacryptopan.CryptoPAn(key)
        addrs = _random_v6(40, 7)
        got = CryptoPAn(key).anonymize_v6(addrs)
        for i in range(len(addrs)):
            want = ipaddress.IPv6Address(ref.anonymize(str(ipaddress.IPv6Address(addrs[i].tobytes()))))
            assert ipaddress.IPv6Address(got[i].tobytes()) == want
    # yacryptopan's own documented example
    assert CryptoPAn(bytes(range(32))).anonymize_str("2001:db8::1") == \
        str(ipaddress.IPv6Address("dd92:2c44:3fc0:ff1e:7ff9:c7f0:8180:7e00"))
    assert CryptoPAn(bytes(range(32))).anonymize_str("192.0.2.1") == "2.90.93.17"


def test_v4_agrees_with_yacryptopan_random_key():
    yacryptopan = pytest.importorskip("yacryptopan")
    key = os.urandom(32)
    ref = yacryptopan.CryptoPAn(key)
    addrs = np.random.default_rng(3).integers(0, 2**32, 60, dtype=np.uint32)
    got = CryptoPAn(key).anonymize_v4(addrs)
    for a, g in zip(addrs, got):
        assert ref.anonymize(str(ipaddress.IPv4Address(int(a)))) == str(ipaddress.IPv4Address(int(g)))


def test_batch_cache_and_single_paths_agree_across_chunks_and_evictions():
    rng = np.random.default_rng(11)
    # more than one AES chunk of new addresses, with repeats
    v4 = rng.integers(0, 2**32, 9000, dtype=np.uint32)
    v4 = np.concatenate([v4, v4[rng.integers(0, len(v4), 3000)]])
    v6 = _random_v6(2500, 5)
    v6 = np.concatenate([v6, v6[rng.integers(0, len(v6), 700)]])
    batched = CryptoPAn(KEY)
    b4, b6 = batched.anonymize_v4(v4), batched.anonymize_v6(v6)
    # a tiny cache forces clears between and within calls
    small = CryptoPAn(KEY, max_cache_v4=1000, max_cache_v6=300)
    s4 = np.concatenate([small.anonymize_v4(c) for c in np.array_split(v4, 37)])
    s6 = np.concatenate([small.anonymize_v6(c) for c in np.array_split(v6, 23)])
    assert small.cache_sizes()[0] <= 1000 and small.cache_sizes()[1] <= 300
    assert np.array_equal(b4, s4) and np.array_equal(b6, s6)
    # cached second pass
    assert np.array_equal(batched.anonymize_v4(v4), b4)
    assert np.array_equal(batched.anonymize_v6(v6), b6)
    # one at a time (a fresh object each time: nothing cached)
    for i in rng.integers(0, len(v4), 25):
        one = CryptoPAn(KEY).anonymize_str(str(ipaddress.IPv4Address(int(v4[i]))))
        assert one == str(ipaddress.IPv4Address(int(b4[i])))
    for i in rng.integers(0, len(v6), 25):
        one = CryptoPAn(KEY).anonymize_str(str(ipaddress.IPv6Address(v6[i].tobytes())))
        assert one == str(ipaddress.IPv6Address(b6[i].tobytes()))


def test_shapes_and_empty_inputs():
    cp = CryptoPAn(KEY)
    assert cp.anonymize_v4(np.empty(0, np.uint32)).shape == (0,)
    assert cp.anonymize_v6(np.empty((0, 16), np.uint8)).shape == (0, 16)
    two_d = np.arange(6, dtype=np.uint32).reshape(2, 3)
    assert np.array_equal(cp.anonymize_v4(two_d).reshape(-1), cp.anonymize_v4(two_d.reshape(-1)))
    with pytest.raises(ValueError):
        cp.anonymize_v6(np.zeros((3, 15), np.uint8))


def test_anonymize_str_rejects_non_addresses():
    with pytest.raises(ValueError):
        CP.anonymize_str("not-an-address")


def test_fingerprint_is_documented_hash_and_not_the_key():
    import hashlib
    fp = fingerprint(KEY)
    assert fp == hashlib.sha256(b"gims-key-fingerprint" + KEY).hexdigest()[:16]
    assert len(fp) == 16 and fp not in KEY.hex()
    assert CryptoPAn(KEY).fingerprint == fp


@pytest.mark.parametrize("content", [
    KEY,                                   # 32 raw bytes
    KEY.hex().encode(),                    # 64 hex chars
    KEY.hex().upper().encode() + b"\n",    # hex, upper case, trailing newline
    b"  \t" + KEY.hex().encode() + b"\r\n\n",
])
def test_load_key_accepts(tmp_path, content):
    p = tmp_path / "key"
    p.write_bytes(content)
    assert load_key(p) == KEY


def test_load_key_raw_bytes_that_look_like_whitespace(tmp_path):
    key = b" " + bytes(range(1, 30)) + b"\n\n"  # raw, with whitespace bytes at both ends
    assert len(key) == 32
    p = tmp_path / "key"
    p.write_bytes(key)
    assert load_key(p) == key


@pytest.mark.parametrize("content", [
    b"",
    KEY[:31],
    KEY + b"x",
    KEY.hex()[:63].encode(),
    KEY.hex()[:62].encode() + b"zz",       # 64 chars, not hex
    KEY.hex().encode() + b"00",
    b"\xff" * 64,
])
def test_load_key_rejects_without_leaking(tmp_path, content):
    p = tmp_path / "key"
    p.write_bytes(content)
    with pytest.raises(ValueError) as exc:
        load_key(p)
    msg = str(exc.value)
    assert "32 raw bytes or 64 hex" in msg or "hex digits" in msg
    assert str(p) in msg
    for secret in (KEY.hex(), KEY.hex()[:16], KEY.hex()[-16:], repr(KEY[:8])[2:-1]):
        assert secret not in msg
    assert content.decode("latin-1").strip() == "" or content.decode("latin-1")[:8] not in msg


def test_load_key_missing_file(tmp_path):
    with pytest.raises(OSError):
        load_key(tmp_path / "absent")


def test_bad_key_length_is_valueerror_without_key():
    with pytest.raises(ValueError) as exc:
        CryptoPAn(KEY[:20])
    assert KEY[:20].hex() not in str(exc.value)


def test_parse_key_roundtrip():
    assert parse_key(KEY.hex().encode()) == KEY


def test_bench_smoke():
    """The benchmark runs and reports both families (no timing assertions)."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "bench_cryptopan.py"), "--n4", "2000", "--n6", "500",
         "--peer-n4", "50", "--peer-n6", "20", "--rounds", "1",
         "--packets-repeat", "1"],
        cwd=root, capture_output=True, text=True, timeout=120, check=True).stdout
    lines = out.splitlines()
    assert any(ln.startswith("v4 ") for ln in lines) and any(ln.startswith("v6 ") for ln in lines)
    assert sum("snaplen 128" in ln for ln in lines) == 2


@pytest.mark.skipif(cryptopan._c_lookup is None, reason="capture_daemon._accel_anon not built "
                    "(tests/capture/test_accel.py fails CI for that)")
def test_c_cache_lookup_matches_the_numpy_lookup(monkeypatch):
    """The C lookup (_accel_anon.lookup) reads the same slots as the numpy one: same hits, same
    images, same misses, on a cache with collisions and evictions (a small table)."""
    rng = np.random.default_rng(21)
    v4 = rng.integers(0, 2**32, 5000, dtype=np.uint32)
    v6 = _random_v6(1500, 9)
    cp = CryptoPAn(KEY, max_cache_v4=1024, max_cache_v6=256)
    cp.anonymize_v4(v4[:3000])
    cp.anonymize_v6(v6[:900])  # cache partly filled, with collisions evicted
    c4, c6 = cp._lookup4(v4), cp._lookup6(v6)
    c_lookup = cryptopan._c_lookup
    monkeypatch.setattr(cryptopan, "_c_lookup", None)
    n4, n6 = cp._lookup4(v4), cp._lookup6(v6)
    for (c_out, c_miss), (n_out, n_miss) in ((c4, n4), (c6, n6)):
        assert 0 < len(c_miss) < len(c_out)
        assert np.array_equal(c_miss, n_miss)
        hit = np.ones(len(c_out), bool)
        hit[c_miss] = False
        assert np.array_equal(c_out[hit], n_out[hit])
    with pytest.raises(ValueError):
        c_lookup(5, v4, cp._k4, cp._v4, cp._f4.view(np.uint8), cp._bits4,
                                     np.empty(len(v4), np.uint32), np.empty(len(v4), np.intp))


@pytest.mark.skipif(cryptopan._c_core is None, reason="capture_daemon._accel_anon not built "
                    "(tests/capture/test_accel.py fails CI for that)")
def test_c_cryptopan_matches_the_python_one():
    """The C Crypto-PAn (_accel_anon.compute, over OpenSSL) gives the reference vectors and the
    same images as the numpy one on random addresses, with random keys."""
    from capture_daemon._accel_anon import compute
    cp = CryptoPAn(KEY)
    orig = np.array([int(ipaddress.IPv4Address(a)) for a, _ in VECTORS], np.uint32)
    out = np.empty_like(orig)
    compute(cp.core, 4, orig, out)
    assert [str(ipaddress.IPv4Address(int(v))) for v in out] == [b for _, b in VECTORS]
    for seed in range(3):
        key = np.random.default_rng(seed).integers(0, 256, 32, dtype=np.uint8).tobytes()
        cp = CryptoPAn(key)
        v4 = np.random.default_rng(seed).integers(0, 2**32, 3000, dtype=np.uint32)
        v4[:3] = (0, 0xFFFFFFFF, 0x80000000)
        v6 = _random_v6(800, seed)
        v6[0], v6[1] = 0, 0xFF
        o4, o6 = np.empty_like(v4), np.empty_like(v6)
        compute(cp.core, 4, v4, o4)
        compute(cp.core, 6, v6, o6)
        assert np.array_equal(o4, cp._compute_v4_numpy(v4))
        assert np.array_equal(o6, cp._compute_v6_numpy(v6))
        assert np.array_equal(o4, cp._compute_v4(v4)) and np.array_equal(o6, cp._compute_v6(v6))
    with pytest.raises(ValueError):
        compute(cp.core, 4, v4, np.empty(3, np.uint32))
    with pytest.raises(ValueError):
        cryptopan._c_core(b"short")


@pytest.mark.skipif(cryptopan._c_core is None, reason="capture_daemon._accel_anon not built "
                    "(tests/capture/test_accel.py fails CI for that)")
def test_c_rewrite_refuses_cache_tables_smaller_than_their_bits():
    """rewrite() trusts no table size: bits that do not match the tables are refused (a read
    past their end otherwise)."""
    from capture_daemon._accel_anon import rewrite
    cp = CryptoPAn(KEY, max_cache_v4=1 << 10, max_cache_v6=1 << 8)
    tables = list(cp.cache_tables())
    z64, one = np.zeros(1, np.int64), np.ones(1, np.uint8)
    packet = (np.zeros(64, np.uint8), z64, z64 + 64, one, z64 + 14, one * 4, np.zeros(1, np.uint16),
              one * 6, z64 + 34, z64 + 50, np.zeros(1, np.uint32), np.zeros(1, np.uint32),
              np.zeros(16, np.uint8), np.zeros(16, np.uint8), True)
    for index, bits in ((3, 30), (3, 11), (7, 9), (3, 0), (7, 40)):
        bad = list(tables)
        bad[index] = bits
        with pytest.raises(ValueError):
            rewrite(cp.core, *bad, *packet)
    with pytest.raises(ValueError):  # not a Crypto-PAn core
        rewrite(object(), *tables, *packet)
