/* C accelerator of capture_daemon/anonymize.py: Anonymizer.apply, per packet, in one pass.
 *
 * Same result, byte for byte and counter for counter, as the numpy reference (Anonymizer with
 * accelerated=False); see the module docstring of anonymize.py for WHAT is rewritten and which
 * checksum rules apply.
 *
 *   rewrite(core, <CryptoPAn's cache tables>, <the batch and its parsed headers>, recompute)
 *     walks every selected packet; each address it anonymizes (an address "site": IPv4 as the
 *     uint32 host-order value of the big-endian address, IPv6 as 16 bytes, zero-padded where not
 *     captured) gets its image from cryptopan.py's direct-mapped cache (the same slots and
 *     tables CryptoPAn.anonymize_v4 / _v6 use), computed here with OpenSSL's AES on a miss and
 *     stored there; then the image is written and checksums are fixed. Returns
 *     (packets_anonymized, not_anonymized, checksums_corrected, offload_checksums,
 *     addresses_truncated, new4, new6), the last two being the images computed.
 *   core(key), compute(core, family, addrs, out): the Crypto-PAn core and the uncached algorithm
 *     (tests compare it with cryptopan.py's).
 *   lookup(...): cryptopan.py's cache looked up for an array of addresses.
 * One pass instead of collect / Crypto-PAn in Python / apply (the design until 2026-11-27): 6 %
 * less CPU for an anonymized copy, no per-batch Python work (docs/PERFORMANCE.md).
 *
 * Per packet the steps run in the order the numpy code runs them over the batch (IPv4/IPv6
 * header and L4 incremental update, cut or bogus IP headers, ARP, ICMP errors / neighbour
 * discovery, then the whole-packet L4 recompute), so every read sees the same bytes. Packets
 * are independent (every read and write lies inside the packet), so doing the batch packet by
 * packet gives the batch-at-a-time result. The address sites are disjoint (outer addresses,
 * options, the quoted header and the ND targets), so each is read before it is written, as in
 * the numpy code.
 *
 * Every access is checked against the packet's end (min(off + caplen, len(buf))) and 0.
 * Checksum arithmetic is done on unfolded int64 sums with the numpy code's fold (end-around
 * carry as 1 + (s - 1) mod 0xFFFF with a floor modulo, 0 only for 0).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#include "_parse_packet.h"

enum { PROTO_ICMP = 1, PROTO_TCP = 6, PROTO_UDP = 17, PROTO_ICMPV6 = 58 };

typedef struct {
    uint8_t *buf;
    int64_t blen;
    int recompute;
    /* images: cryptopan.py's cache tables (key, value, filled; 2**bits slots per family), a
     * small memo in front of them, and the Crypto-PAn core for misses */
    struct Core *core;
    uint32_t *ck4, *cv4;
    uint8_t *ck6, *cv6, *cf4, *cf6;
    int cbits4, cbits6;
    struct Memo4 *memo4;
    struct Memo6 *memo6;
    int64_t miss4, miss6;
    int cryptofail;
    int64_t anonymized, not_anonymized, corrected, offload, truncated;
} Ctx;

/* One packet's parsed headers (parse.py's Headers fields the rewrite reads): from the arrays
 * (rewrite) or from _parse_packet.h as the packet is reached (rewrite_records). */
typedef struct {
    int64_t l3, l4, iplen;
    unsigned ipver, et, proto;
    uint32_t src4, dst4;
    const uint8_t *src6, *dst6;
} Pkt;

/* ---- checksum arithmetic, as capture_daemon/checksum.py ---------------------------------- */
static inline int64_t fold_slow(int64_t s)
{
    if (s == 0)
        return 0;
    int64_t r = (s - 1) % 0xFFFF;
    if (r < 0)
        r += 0xFFFF;
    return 1 + r;
}

/* The same value without a division: for 0 < s, end-around-carry folding keeps s's residue
 * modulo 0xFFFF (2**16 = 1 mod 0xFFFF) and ends in [1, 0xFFFF], which is 1 + (s - 1) mod 0xFFFF.
 * A negative s is first moved up by a multiple of 0xFFFF (0xFFFF << 32). Sums here stay far
 * inside +-2**46 (a packet is < 2**32 bytes); anything else takes the exact slow path. */
#define FOLD_LIM ((int64_t)1 << 46)
static inline int64_t fold(int64_t s)
{
    if (s == 0 || s <= -FOLD_LIM || s >= FOLD_LIM)
        return fold_slow(s);
    uint64_t u = (uint64_t)(s < 0 ? s + ((int64_t)0xFFFF << 32) : s);
    u = (u & 0xFFFF) + (u >> 16); /* < 2**32 + 2**16 (u < 2**48 here) */
    u = (u & 0xFFFF) + (u >> 16); /* <= 0x1FFFF */
    u = (u & 0xFFFF) + (u >> 16); /* <= 0x10000 */
    u = (u & 0xFFFF) + (u >> 16); /* in [1, 0xFFFF] */
    return (int64_t)u;
}

static inline int64_t finish(int64_t s) { return (~fold(s)) & 0xFFFF; }

static inline int64_t incremental(int64_t cs, int64_t old_sum, int64_t new_sum, int64_t nwords)
{
    return finish((0xFFFF - cs) + nwords * 0xFFFF - old_sum + new_sum);
}

/* ---- bounds-checked access: [p, p + w) inside [0, e) ------------------------------------- */
static inline int ok(int64_t p, int64_t w, int64_t e) { return p >= 0 && p + w <= e; }
static inline int64_t get16(const Ctx *c, int64_t p) { return ((int64_t)c->buf[p] << 8) | c->buf[p + 1]; }
static inline void put16(Ctx *c, int64_t p, int64_t v)
{
    c->buf[p] = (uint8_t)((v >> 8) & 0xFF);
    c->buf[p + 1] = (uint8_t)(v & 0xFF);
}

/* Sum of the big-endian words of the k bytes at p (k even), uncaptured bytes as 0. */
static int64_t gather_sum(const Ctx *c, int64_t p, int64_t e, int k)
{
    int64_t s = 0;
    for (int j = 0; j < k; j++) {
        int64_t x = p + j;
        if (x >= 0 && x < e)
            s += (j & 1) ? (int64_t)c->buf[x] : (int64_t)c->buf[x] << 8;
    }
    return s;
}

/* Exact sum of the big-endian words of buf[a:b) (b > a, odd last byte padded with zero):
 * (sum of the even-offset bytes) * 256 + (sum of the odd-offset ones). Little-endian hosts take
 * 8 bytes at a time, even and odd bytes into four 16-bit lanes each (255 per step: a lane
 * holds 256 steps), then add up the lanes; the sums are exact, so is the result. */
static inline uint64_t lanes16_sum(uint64_t x)
{
    x = (x & 0x0000FFFF0000FFFFull) + ((x >> 16) & 0x0000FFFF0000FFFFull);
    return (x & 0xFFFFFFFFull) + (x >> 32);
}

static int64_t range_sum(const Ctx *c, int64_t a, int64_t b)
{
    const uint8_t *p = c->buf + a;
    int64_t n = b - a;
    uint64_t hi = 0, lo = 0;
    int64_t i = 0;
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    const uint64_t m = 0x00FF00FF00FF00FFull;
    while (n - i >= 8) {
        uint64_t ev = 0, od = 0;
        int64_t stop = n - i >= 8 * 256 ? i + 8 * 256 : n - 7; /* i + 8 <= n for i < stop */
        for (; i < stop; i += 8) {
            uint64_t x;
            memcpy(&x, p + i, 8);
            ev += x & m;        /* bytes i, i + 2, ...: the high bytes of the words */
            od += (x >> 8) & m; /* bytes i + 1, i + 3, ...: the low bytes */
        }
        hi += lanes16_sum(ev);
        lo += lanes16_sum(od);
    }
#endif
    for (; i + 1 < n; i += 2) {
        hi += p[i];
        lo += p[i + 1];
    }
    if (i < n)
        hi += p[i];
    return (int64_t)(hi * 256 + lo);
}

/* ---- hashing of addresses (the same as CryptoPAn._slot4 / _slot6) ---------------------------- */
static inline uint64_t hash4(uint32_t v) { return (uint64_t)v * 0x9E3779B97F4A7C15ull; }
static inline uint64_t hash6(const uint8_t *a)
{
    uint64_t x, y;
    memcpy(&x, a, 8);
    memcpy(&y, a + 8, 8);
    return ((x * 0xC2B2AE3D27D4EB4Full) ^ y) * 0x9E3779B97F4A7C15ull;
}

/* ---- Crypto-PAn (cryptopan.py's algorithm, one address at a time) ------------------------ */
/* AES-128 keyed with the key's first 16 bytes (OpenSSL, AES-NI where the CPU has it) and
 * pad = AES(last 16 bytes). Output bit i = input bit i XOR the first bit of AES(the first i bits
 * of the input followed by bits i.. of pad). One EVP call per address: all its 32 (IPv4) or 128
 * (IPv6) blocks at once. Not thread-safe (one cipher context): the capture has one thread. */
/* In front of CryptoPAn's cache (megabytes, three arrays: a lookup there is up to three CPU
 * cache misses, measured at a quarter of the rewrite) sits a small direct-mapped memo of recent
 * addresses, one entry per slot, that mostly stays in the CPU's L2 cache: traffic is
 * heavy-tailed, so most address sites hit it. Kept with the core across batches (a memo per
 * batch still sent each batch's first sight of every address to the big tables). */
enum { MEMO4_BITS = 14, MEMO6_BITS = 12 };
typedef struct Memo4 {
    uint32_t key, val, filled;
} Memo4;
typedef struct Memo6 {
    uint8_t key[16], val[16];
    uint8_t filled;
} Memo6;

typedef struct Core {
    EVP_CIPHER_CTX *ctx;
    uint8_t pad[16];
    /* The AES input blocks of one address, kept between calls: the parts taken from the pad
     * never change, so only the address-dependent words are written per address. Written as
     * whole 4/8-byte words: byte-wise building then 16-byte loads stalled store forwarding
     * (measured: 2.5x slower for IPv6). */
    uint32_t in4[32 * 4];
    uint64_t in6[128 * 2];
    uint8_t ct[128 * 16];
    /* the memo in front of CryptoPAn's cache (see cached4); an image depends only on the key
     * and the address, so the memo lives as long as the core, across batches */
    Memo4 *memo4;
    Memo6 *memo6;
} Core;

static inline uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t be64(const uint8_t *p) { return ((uint64_t)be32(p) << 32) | be32(p + 4); }

/* A value as stored in memory in network byte order (so the AES input holds big-endian words). */
static inline uint32_t net32(uint32_t v)
{
    uint8_t b[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    memcpy(&v, b, 4);
    return v;
}

static inline uint64_t net64(uint64_t v)
{
    uint8_t b[8];
    for (int j = 0; j < 8; j++)
        b[j] = (uint8_t)(v >> (56 - 8 * j));
    memcpy(&v, b, 8);
    return v;
}

static inline uint64_t top_bits(int n) { return n ? ~(uint64_t)0 << (64 - n) : 0; } /* n in 0..64 */

static void core_prefill(Core *k)
{
    uint32_t tail[3];
    memcpy(tail, k->pad + 4, 12);
    for (int pos = 0; pos < 32; pos++)
        memcpy(k->in4 + 4 * pos + 1, tail, 12);
    uint64_t plo;
    memcpy(&plo, k->pad + 8, 8);
    for (int pos = 0; pos < 64; pos++)
        k->in6[2 * pos + 1] = plo;
}

static int cp4(Core *k, uint32_t a, uint32_t *out)
{
    uint32_t pad0 = be32(k->pad), flips = 0;
    for (int pos = 0; pos < 32; pos++) {
        uint32_t m = (uint32_t)(top_bits(pos) >> 32);
        k->in4[4 * pos] = net32((a & m) | (pad0 & ~m));
    }
    int len = 0;
    if (EVP_EncryptUpdate(k->ctx, k->ct, &len, (const uint8_t *)k->in4, 32 * 16) != 1 || len != 32 * 16)
        return 0;
    for (int pos = 0; pos < 32; pos++)
        flips |= (uint32_t)(k->ct[16 * pos] >> 7) << (31 - pos);
    *out = a ^ flips;
    return 1;
}

static int cp6(Core *k, const uint8_t *a, uint8_t *out)
{
    uint64_t hi = be64(a), lo = be64(a + 8), phi = be64(k->pad), plo = be64(k->pad + 8);
    uint64_t hi_net = net64(hi);
    for (int pos = 0; pos < 64; pos++) {
        uint64_t m = top_bits(pos);
        k->in6[2 * pos] = net64((hi & m) | (phi & ~m)); /* lane 1: the pad, prefilled */
        k->in6[2 * (64 + pos)] = hi_net;
        k->in6[2 * (64 + pos) + 1] = net64((lo & m) | (plo & ~m));
    }
    int len = 0;
    if (EVP_EncryptUpdate(k->ctx, k->ct, &len, (const uint8_t *)k->in6, 128 * 16) != 1 || len != 128 * 16)
        return 0;
    uint64_t fhi = 0, flo = 0;
    for (int pos = 0; pos < 64; pos++) {
        fhi |= (uint64_t)(k->ct[16 * pos] >> 7) << (63 - pos);
        flo |= (uint64_t)(k->ct[16 * (64 + pos)] >> 7) << (63 - pos);
    }
    uint64_t r[2] = {net64(hi ^ fhi), net64(lo ^ flo)};
    memcpy(out, r, 16);
    return 1;
}

/* rewrite(): the image of an address from the cache, computed and cached on a miss (the
 * newest address keeps a slot, as in CryptoPAn.anonymize_v4 / _v6). */
static int cached4_slow(Ctx *c, uint32_t a, uint32_t *v);
static int cached6_slow(Ctx *c, const uint8_t *a, uint8_t *v);

static inline int cached4(Ctx *c, uint32_t a, uint32_t *v)
{
    Memo4 *m = c->memo4 + (hash4(a) >> (64 - MEMO4_BITS));
    if (m->filled && m->key == a) {
        *v = m->val;
        return 1;
    }
    if (!cached4_slow(c, a, v))
        return 0;
    m->key = a, m->val = *v, m->filled = 1;
    return 1;
}

static inline int cached6(Ctx *c, const uint8_t *a, uint8_t *v)
{
    Memo6 *m = c->memo6 + (hash6(a) >> (64 - MEMO6_BITS));
    if (m->filled && memcmp(m->key, a, 16) == 0) {
        memcpy(v, m->val, 16);
        return 1;
    }
    if (!cached6_slow(c, a, v))
        return 0;
    memcpy(m->key, a, 16);
    memcpy(m->val, v, 16);
    m->filled = 1;
    return 1;
}

static int cached4_slow(Ctx *c, uint32_t a, uint32_t *v)
{
    uint64_t slot = hash4(a) >> (64 - c->cbits4);
    if (c->cf4[slot] && c->ck4[slot] == a) {
        *v = c->cv4[slot];
        return 1;
    }
    if (!cp4(c->core, a, v)) {
        c->cryptofail = 1;
        return 0;
    }
    c->ck4[slot] = a, c->cv4[slot] = *v, c->cf4[slot] = 1;
    c->miss4++;
    return 1;
}

static int cached6_slow(Ctx *c, const uint8_t *a, uint8_t *v)
{
    uint64_t slot = hash6(a) >> (64 - c->cbits6);
    if (c->cf6[slot] && memcmp(c->ck6 + 16 * slot, a, 16) == 0) {
        memcpy(v, c->cv6 + 16 * slot, 16);
        return 1;
    }
    if (!cp6(c->core, a, v)) {
        c->cryptofail = 1;
        return 0;
    }
    memcpy(c->ck6 + 16 * slot, a, 16);
    memcpy(c->cv6 + 16 * slot, v, 16);
    c->cf6[slot] = 1;
    c->miss6++;
    return 1;
}

/* ---- address sites ------------------------------------------------------------------------ */
/* The IPv4 address at p, captured up to e: write the image of its zero-padded value where
 * captured, add the word sums of the captured old / new bytes.
 * Returns 1 if partly captured (some but not all of its bytes). */
static int addr4(Ctx *c, int64_t p, int64_t e, int64_t *old_sum, int64_t *new_sum)
{
    uint8_t old[4];
    int nok = 0, okb[4];
    for (int j = 0; j < 4; j++) {
        okb[j] = (p + j >= 0 && p + j < e);
        old[j] = okb[j] ? c->buf[p + j] : 0;
        nok += okb[j];
    }
    uint32_t v;
    if (!cached4(c, be32(old), &v))
        return 0;
    uint8_t nw[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    for (int j = 0; j < 4; j++) {
        if (okb[j]) {
            c->buf[p + j] = nw[j];
            int64_t sh = (j & 1) ? 0 : 8;
            *old_sum += (int64_t)old[j] << sh;
            *new_sum += (int64_t)nw[j] << sh;
        }
    }
    return nok > 0 && nok < 4;
}

static int addr6(Ctx *c, int64_t p, int64_t e, int64_t *old_sum, int64_t *new_sum)
{
    uint8_t old[16];
    int nok = 0, okb[16];
    for (int j = 0; j < 16; j++) {
        okb[j] = (p + j >= 0 && p + j < e);
        old[j] = okb[j] ? c->buf[p + j] : 0;
        nok += okb[j];
    }
    uint8_t nw[16];
    if (!cached6(c, old, nw))
        return 0;
    for (int j = 0; j < 16; j++) {
        if (okb[j]) {
            c->buf[p + j] = nw[j];
            int64_t sh = (j & 1) ? 0 : 8;
            *old_sum += (int64_t)old[j] << sh;
            *new_sum += (int64_t)nw[j] << sh;
        }
    }
    return nok > 0 && nok < 16;
}

/* ---- IPv4 options (Anonymizer._ipv4_options), e already limited to the header ------------- */
static void ipv4_options(Ctx *c, int64_t l3, int64_t e)
{
    int64_t pos = l3 + 20;
    if (!(pos < e))
        return;
    for (int it = 0; it < 40; it++) {
        int t = c->buf[pos];
        if (t == 0)
            return;
        if (t == 1) {
            pos += 1;
        } else {
            int ln = (pos + 1 < e) ? c->buf[pos + 1] : 0;
            if (ln < 2)
                return;
            int route = (t == 7 || t == 131 || t == 137);
            int stamp = (t == 68) && (pos + 3 < e);
            if (stamp) {
                int flag = c->buf[pos + 3] & 0x0F;
                stamp = (flag == 1 || flag == 3);
            }
            if (route || stamp) {
                int64_t p0 = pos + (route ? 3 : 4), step = route ? 4 : 8;
                int64_t p1 = pos + ln;
                if (t != 131 && t != 137 && pos + 2 < e) {
                    int64_t lim = pos + (int64_t)c->buf[pos + 2] - 1;
                    if (lim < p1)
                        p1 = lim;
                }
                int64_t aend = e < p1 ? e : p1;
                for (int64_t s = p0; s < p1 - 3; s += step) {
                    int64_t o = 0, n = 0;
                    if (addr4(c, s, aend, &o, &n))
                        c->truncated++;
                }
            }
            pos += ln;
        }
        if (!(pos < e))
            return;
    }
}

/* ---- L4 checksum of the common path (Anonymizer._l4 and _is_whole) ------------------------ */
typedef struct {
    int have;
    int64_t start, stop, cs_pos, pseudo;
    int udp;
} Whole;

static const int8_t MIN_HDR[256] = {[PROTO_TCP] = 20, [PROTO_UDP] = 8, [PROTO_ICMP] = 4, [PROTO_ICMPV6] = 4};

static inline int cs_off_of(int proto)
{
    switch (proto) {
    case PROTO_TCP: return 16;
    case PROTO_UDP: return 6;
    case PROTO_ICMP:
    case PROTO_ICMPV6: return 2;
    default: return -1;
    }
}

static void l4_checksum(Ctx *c, int64_t l3, int64_t l4, int64_t e, int proto, int has_l4, int first_frag,
                        int64_t l4len, int64_t old_sum, int64_t new_sum, int nwords, int64_t iplen, Whole *w)
{
    int v6 = nwords == 16;
    int cs_off = cs_off_of(proto);
    int covers = proto == PROTO_TCP || proto == PROTO_UDP || (v6 && proto == PROTO_ICMPV6);
    int64_t cs_pos = l4 + cs_off;
    int captured = has_l4 && cs_off >= 0 && ok(cs_pos, 2, e);
    if (!captured)
        return;
    int64_t cs = get16(c, cs_pos);
    int is_udp = proto == PROTO_UDP;
    int udp_none = is_udp && cs == 0;
    int64_t pseudo_fixed = proto + (l4len >> 16) + (l4len & 0xFFFF);
    int mh = MIN_HDR[proto];
    int is_whole = !first_frag && l3 + iplen <= e && l4len >= mh && mh > 0;
    if (is_whole && is_udp) {
        if (ok(l4 + 4, 2, e))
            is_whole = get16(c, l4 + 4) == l4len;
        else
            is_whole = 0;
    }
    if (covers && !udp_none) {
        int64_t new_cs = incremental(cs, old_sum, new_sum, nwords);
        int offl = proto != PROTO_ICMPV6 && cs == fold(old_sum + pseudo_fixed);
        if (offl)
            new_cs = fold(new_sum + pseudo_fixed);
        if (is_udp && new_cs == 0)
            new_cs = 0xFFFF;
        put16(c, cs_pos, new_cs);
        if (offl && !is_whole)
            c->offload++;
    }
    if (is_whole && !udp_none && l4 >= 0 && l3 + iplen > l4) {
        w->have = 1;
        w->start = l4;
        w->stop = l3 + iplen;
        w->cs_pos = cs_pos;
        w->pseudo = covers ? new_sum + pseudo_fixed : 0;
        w->udp = is_udp;
    }
}

static void recompute_whole(Ctx *c, const Whole *w)
{
    int64_t cur = get16(c, w->cs_pos);
    int64_t full = finish(w->pseudo + range_sum(c, w->start, w->stop) - cur);
    if (w->udp && full == 0)
        full = 0xFFFF;
    if (full != cur)
        c->corrected++;
    put16(c, w->cs_pos, full);
}

/* ---- IPv4 / IPv6 headers ------------------------------------------------------------------ */
static void ipv4(Ctx *c, const Pkt *p, int64_t l3, int64_t e, Whole *w)
{
    uint32_t so = p->src4, d = p->dst4;
    uint32_t ns = 0, nd = 0;
    if (!cached4(c, so, &ns) || !cached4(c, d, &nd))
        return;
    int ihl = (c->buf[l3] & 0x0F) * 4;
    int64_t eo = e < l3 + ihl ? e : l3 + ihl;
    for (int j = 0; j < 4; j++) {
        c->buf[l3 + 12 + j] = (uint8_t)(ns >> (24 - 8 * j));
        c->buf[l3 + 16 + j] = (uint8_t)(nd >> (24 - 8 * j));
    }
    int64_t old_sum = (so >> 16) + (so & 0xFFFF) + (d >> 16) + (d & 0xFFFF);
    int64_t new_sum = (ns >> 16) + (ns & 0xFFFF) + (nd >> 16) + (nd & 0xFFFF);
    int64_t hdr_old = old_sum, hdr_new = new_sum;
    if (ihl > 20) {
        hdr_old += gather_sum(c, l3 + 20, eo, 40);
        ipv4_options(c, l3, eo);
        hdr_new += gather_sum(c, l3 + 20, eo, 40);
    }
    int64_t cs = get16(c, l3 + 10);
    int64_t inc = incremental(cs, hdr_old, hdr_new, 24);
    if (c->recompute && l3 + ihl <= e) {
        int64_t hsum = 0;
        for (int j = 0; j < 10; j++)
            hsum += get16(c, l3 + 2 * j);
        if (ihl > 20)
            hsum += gather_sum(c, l3 + 20, l3 + ihl, 40);
        int64_t full = finish(hsum - cs);
        if (full != inc)
            c->corrected++;
        inc = full;
    }
    put16(c, l3 + 10, inc);

    int64_t l4 = p->l4;
    int more_frags = (c->buf[l3 + 6] & 0x20) != 0;
    int64_t l4len = p->iplen - ihl;
    l4_checksum(c, l3, l4, e, p->proto, l4 >= 0, more_frags, l4len, old_sum, new_sum, 4, p->iplen, w);
}

static int is_ext(int nh) { return nh == 0 || nh == 43 || nh == 60 || nh == 44 || nh == 51 || nh == 135; }

static void ipv6(Ctx *c, const Pkt *p, int64_t l3, int64_t e, Whole *w)
{
    const uint8_t *so = p->src6, *d = p->dst6;
    uint8_t nw[32];
    if (!cached6(c, so, nw) || !cached6(c, d, nw + 16))
        return;
    int64_t old_sum = 0, new_sum = 0;
    for (int j = 0; j < 16; j += 2) {
        old_sum += ((int64_t)so[j] << 8 | so[j + 1]) + ((int64_t)d[j] << 8 | d[j + 1]);
        new_sum += ((int64_t)nw[j] << 8 | nw[j + 1]) + ((int64_t)nw[16 + j] << 8 | nw[16 + j + 1]);
    }
    memcpy(c->buf + l3 + 8, nw, 32);

    /* extension headers (Anonymizer._v6_ext_flags) */
    int first_frag = 0, rh_addrs = 0, rh_active = 0;
    int nh = c->buf[l3 + 6];
    int64_t pos = l3 + 40;
    for (int it = 0; it < 8; it++) {
        if (!is_ext(nh) || !ok(pos, 8, e))
            break;
        int nxt = c->buf[pos], hl = c->buf[pos + 1];
        int64_t fo = get16(c, pos + 2);
        if (nh == 43) {
            if (hl > 0)
                rh_addrs = 1;
            if ((fo & 0xFF) > 0)
                rh_active = 1;
        }
        if (nh == 44 && (fo & 0xFFF8) == 0 && (fo & 1) == 1)
            first_frag = 1;
        int64_t hlen = nh == 44 ? 8 : nh == 51 ? (int64_t)(hl + 2) * 4 : (int64_t)(hl + 1) * 8;
        nh = nxt;
        pos += hlen;
    }
    c->not_anonymized += rh_addrs;
    int64_t l4 = p->l4;
    int has_l4 = l4 >= 0 && !rh_active;
    int64_t l4len = p->iplen - (l4 - l3);
    l4_checksum(c, l3, l4, e, p->proto, has_l4, first_frag, l4len, old_sum, new_sum, 16, p->iplen, w);
}

/* ---- quoted headers in ICMP errors, ND targets (Anonymizer._quoted, _icmp6_payload) ------- */
static void adjust(Ctx *c, int64_t cs_pos, int64_t e, int64_t before, int64_t after, int nwords)
{
    if (ok(cs_pos, 2, e))
        put16(c, cs_pos, incremental(get16(c, cs_pos), before, after, nwords));
}

static void quoted(Ctx *c, int64_t l4, int64_t e, int v6)
{
    int64_t q = l4 + 8;
    const int span = 80;
    int64_t before = gather_sum(c, q, e, span);
    int64_t os = 0, ns = 0;
    int part;
    int nwords, later_frag = 0, qproto;
    int64_t addr_end, ql4;
    if (v6) {
        part = addr6(c, q + 8, e, &os, &ns);
        part |= addr6(c, q + 24, e, &os, &ns);
    } else {
        part = addr4(c, q + 12, e, &os, &ns);
        part |= addr4(c, q + 16, e, &os, &ns);
    }
    if (part)
        c->truncated++;
    if (v6) {
        nwords = 16;
        addr_end = q + 40;
        qproto = c->buf[q + 6]; /* q + 8 < e */
        ql4 = q + 40;
    } else {
        nwords = 4;
        addr_end = q + 20;
        qproto = ok(q + 9, 1, e) ? c->buf[q + 9] : 0;
        ql4 = q + (int64_t)(c->buf[q] & 0x0F) * 4;
        int64_t fo = ok(q + 6, 2, e) ? get16(c, q + 6) : 0;
        later_frag = (fo & 0x1FFF) != 0;
        if (ok(q + 10, 2, e))
            put16(c, q + 10, incremental(get16(c, q + 10), os, ns, nwords));
    }
    int off = qproto == PROTO_TCP ? 16 : qproto == PROTO_UDP ? 6 : -1;
    int64_t cs_pos = ql4 + off;
    if (off >= 0 && !later_frag && addr_end <= e && ok(cs_pos, 2, e) && cs_pos + 2 <= q + span) {
        int64_t cs = get16(c, cs_pos);
        int64_t new_cs = incremental(cs, os, ns, nwords);
        if (qproto == PROTO_UDP) {
            if (cs == 0)
                new_cs = 0;
            else if (new_cs == 0)
                new_cs = 0xFFFF;
        }
        put16(c, cs_pos, new_cs);
    }
    int64_t after = gather_sum(c, q, e, span);
    adjust(c, l4 + 2, e, before, after, span / 2);
}

static void icmp4_errors(Ctx *c, const Pkt *p, int64_t e)
{
    int64_t l4 = p->l4, q = l4 + 8;
    if (p->proto != PROTO_ICMP || l4 < 0 || !(q < e))
        return;
    int t = c->buf[l4];
    if (!(t == 3 || t == 4 || t == 5 || t == 11 || t == 12))
        return;
    if ((c->buf[q] >> 4) != 4 || !(q + 12 < e))
        return;
    quoted(c, l4, e, 0);
}

static void icmp6_payload(Ctx *c, const Pkt *p, int64_t e)
{
    int64_t l4 = p->l4, q = l4 + 8;
    if (p->proto != PROTO_ICMPV6 || l4 < 0 || !(q < e))
        return;
    int t = c->buf[l4];
    if (t >= 1 && t <= 4) {
        if ((c->buf[q] >> 4) == 6 && q + 8 < e)
            quoted(c, l4, e, 1);
        return;
    }
    int nf = (t == 135 || t == 136) ? 1 : t == 137 ? 2 : 0;
    if (!nf)
        return;
    int64_t before = gather_sum(c, q, e, 16 * nf);
    int64_t os = 0, ns = 0;
    int part = 0;
    for (int j = 0; j < nf; j++)
        part |= addr6(c, q + 16 * j, e, &os, &ns);
    if (part)
        c->truncated++;
    int64_t after = gather_sum(c, q, e, 16 * nf);
    adjust(c, l4 + 2, e, before, after, 8 * nf);
}

/* ---- non-IP or unparsed IP (Anonymizer._cut_or_bogus_ip, _arp) ---------------------------- */
static int cut_or_bogus(Ctx *c, const Pkt *p, int64_t l3, int64_t e)
{
    int et = (int)p->et;
    if (!((et == 0x0800 || et == 0x86DD) && l3 < e))
        return 0;
    int version = c->buf[l3] >> 4;
    int v4 = et == 0x0800 && version == 4, v6 = et == 0x86DD && version == 6;
    if (!v4 && !v6) {
        c->not_anonymized++;
        return 0;
    }
    int64_t os = 0, ns = 0;
    if (v4 && l3 + 12 < e) {
        int part = addr4(c, l3 + 12, e, &os, &ns);
        part |= addr4(c, l3 + 16, e, &os, &ns);
        c->truncated += part;
        put16(c, l3 + 10, incremental(get16(c, l3 + 10), os, ns, 4));
        return 1;
    }
    if (v6 && l3 + 8 < e) {
        int part = addr6(c, l3 + 8, e, &os, &ns);
        part |= addr6(c, l3 + 24, e, &os, &ns);
        c->truncated += part;
        return 1;
    }
    return 0;
}

static int arp(Ctx *c, int64_t l3, int64_t e)
{
    if (!ok(l3, 6, e))
        return 0;
    int64_t ptype = get16(c, l3 + 2);
    int64_t hlen = c->buf[l3 + 4], plen = c->buf[l3 + 5];
    if (ptype != 0x0800)
        return 0;
    if (plen != 4) {
        c->not_anonymized++;
        return 0;
    }
    if (!(l3 + 8 + hlen < e))
        return 0;
    int64_t spa = l3 + 8 + hlen, tpa = spa + 4 + hlen, os = 0, ns = 0;
    int part = addr4(c, spa, e, &os, &ns);
    part |= addr4(c, tpa, e, &os, &ns);
    c->truncated += part;
    return 1;
}

/* The packet at buf[o, o + cl) with its headers p. */
static void packet(Ctx *c, int64_t o, int64_t cl, const Pkt *p)
{
    if (o < 0 || cl <= 0 || o >= c->blen)
        return; /* nothing captured: nothing to rewrite (numpy: every check fails too) */
    int64_t e = o + cl < c->blen ? o + cl : c->blen;
    int64_t l3 = p->l3;
    if (l3 < 0)
        return;
    int ver = (int)p->ipver;
    Whole w = {0, 0, 0, 0, 0, 0};
    if (ver == 4) {
        if (!ok(l3, 20, e))
            return; /* parse guarantees it; headers that lie are left alone */
        ipv4(c, p, l3, e, &w);
        icmp4_errors(c, p, e);
        c->anonymized++;
    } else if (ver == 6) {
        if (!ok(l3, 40, e))
            return;
        ipv6(c, p, l3, e, &w);
        icmp6_payload(c, p, e);
        c->anonymized++;
    } else if (p->et == 0x0806) {
        c->anonymized += arp(c, l3, e);
    } else {
        c->anonymized += cut_or_bogus(c, p, l3, e);
    }
    if (c->recompute && w.have && ok(w.start, w.stop - w.start, e) && ok(w.cs_pos, 2, e))
        recompute_whole(c, &w);
}

/* ---- Python entry point ------------------------------------------------------------------- */
static int need(Py_buffer *b, Py_ssize_t bytes, Py_ssize_t align, const char *name)
{
    if (b->len < bytes || ((uintptr_t)b->buf % (uintptr_t)align) != 0) {
        PyErr_Format(PyExc_ValueError, "_accel_anon: %s too short or misaligned", name);
        return 0;
    }
    return 1;
}

/* The parsed headers of a batch, as rewrite() takes them (parse.py's Headers arrays). */
typedef struct {
    const int64_t *off, *caplen, *l3, *l4, *iplen;
    const uint8_t *sel, *ipver, *proto;
    const uint16_t *et;
    const uint32_t *src4, *dst4;
    const uint8_t *src6, *dst6;
} Arrays;

/* The packet arguments b[0..13] (buf, off, caplen, sel, l3, ipver, ethertype, proto, l4, iplen,
 * src4, dst4, src6, dst6) into c and a, checked for length and alignment; the packet count in *n. */
static int packet_args(Ctx *c, Arrays *a, Py_buffer *b, Py_ssize_t *n)
{
    *n = b[3].len; /* sel: one byte per packet */
    Py_ssize_t m = *n;
    if (!need(&b[1], 8 * m, 8, "off") || !need(&b[2], 8 * m, 8, "caplen") || !need(&b[4], 8 * m, 8, "l3") ||
        !need(&b[5], m, 1, "ipver") || !need(&b[6], 2 * m, 2, "ethertype") || !need(&b[7], m, 1, "proto") ||
        !need(&b[8], 8 * m, 8, "l4") || !need(&b[9], 8 * m, 8, "iplen") || !need(&b[10], 4 * m, 4, "src4") ||
        !need(&b[11], 4 * m, 4, "dst4") || !need(&b[12], 16 * m, 1, "src6") || !need(&b[13], 16 * m, 1, "dst6"))
        return 0;
    c->buf = b[0].buf;
    c->blen = b[0].len;
    a->off = b[1].buf;
    a->caplen = b[2].buf;
    a->sel = b[3].buf;
    a->l3 = b[4].buf;
    a->ipver = b[5].buf;
    a->et = b[6].buf;
    a->proto = b[7].buf;
    a->l4 = b[8].buf;
    a->iplen = b[9].buf;
    a->src4 = b[10].buf;
    a->dst4 = b[11].buf;
    a->src6 = b[12].buf;
    a->dst6 = b[13].buf;
    return 1;
}

static void walk(Ctx *c, const Arrays *a, Py_ssize_t n)
{
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!a->sel[i])
            continue;
        Pkt p = {a->l3[i], a->l4[i], a->iplen[i], a->ipver[i], a->et[i], a->proto[i], a->src4[i], a->dst4[i],
                 a->src6 + 16 * i, a->dst6 + 16 * i};
        packet(c, a->off[i], a->caplen[i], &p);
    }
    Py_END_ALLOW_THREADS
}

/* Parse and rewrite every packet, one at a time (rewrite_records); the count of malformed
 * packets (parse.py's Headers.malformed) in *malformed. */
static void walk_records(Ctx *c, const int64_t *off, const int64_t *caplen, const int64_t *wirelen,
                         Py_ssize_t n, long linktype, int64_t *malformed)
{
    int64_t bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        PpHeaders h;
        uint8_t a6[32];
        if (pp_parse(c->buf, c->blen, off[i], caplen[i], wirelen[i], linktype, &h, a6, a6 + 16) < 0)
            continue; /* outside buf: rewrite_records checked that none is */
        bad += h.malformed;
        Pkt p = {h.l3, h.l4, h.iplen, h.ipver, h.ethertype, h.proto, h.src4, h.dst4, a6, a6 + 16};
        packet(c, off[i], caplen[i], &p);
    }
    Py_END_ALLOW_THREADS
    *malformed = bad;
}

/* ---- Crypto-PAn core objects (capsules) and the one-pass rewrite ---------------------------- */
static const char CORE_NAME[] = "capture_daemon._accel_anon.core";

static void core_free(PyObject *capsule)
{
    Core *k = PyCapsule_GetPointer(capsule, CORE_NAME);
    if (k) {
        EVP_CIPHER_CTX_free(k->ctx);
        /* the memo holds addresses and their images: as private as the key */
        OPENSSL_cleanse(k->memo4, sizeof(Memo4) << MEMO4_BITS);
        OPENSSL_cleanse(k->memo6, sizeof(Memo6) << MEMO6_BITS);
        PyMem_Free(k->memo4);
        PyMem_Free(k->memo6);
        OPENSSL_cleanse(k, sizeof *k);
        PyMem_Free(k);
    }
}

/* core(key): a Crypto-PAn core for a 32-byte key (the key stays inside OpenSSL's context). */
static PyObject *core(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer key = {0};
    if (!PyArg_ParseTuple(args, "y*:core", &key))
        return NULL;
    PyObject *res = NULL;
    Core *k = NULL;
    if (key.len != 32) {
        PyErr_SetString(PyExc_ValueError, "_accel_anon.core: the key must be 32 bytes");
        goto done;
    }
    k = PyMem_Calloc(1, sizeof *k);
    if (!k) {
        PyErr_NoMemory();
        goto done;
    }
    int len = 0;
    k->memo4 = PyMem_Calloc((size_t)1 << MEMO4_BITS, sizeof(Memo4));
    k->memo6 = PyMem_Calloc((size_t)1 << MEMO6_BITS, sizeof(Memo6));
    if (!k->memo4 || !k->memo6) {
        PyErr_NoMemory();
        goto done;
    }
    k->ctx = EVP_CIPHER_CTX_new();
    if (!k->ctx || EVP_EncryptInit_ex(k->ctx, EVP_aes_128_ecb(), NULL, key.buf, NULL) != 1 ||
        EVP_CIPHER_CTX_set_padding(k->ctx, 0) != 1 ||
        EVP_EncryptUpdate(k->ctx, k->pad, &len, (const uint8_t *)key.buf + 16, 16) != 1 || len != 16) {
        PyErr_SetString(PyExc_RuntimeError, "_accel_anon.core: OpenSSL could not set up AES-128");
        goto done;
    }
    core_prefill(k);
    res = PyCapsule_New(k, CORE_NAME, core_free);
    if (res)
        k = NULL;
done:
    if (k) {
        EVP_CIPHER_CTX_free(k->ctx);
        PyMem_Free(k->memo4);
        PyMem_Free(k->memo6);
        PyMem_Free(k);
    }
    PyBuffer_Release(&key);
    return res;
}

/* compute(core, family, addrs, out): Crypto-PAn of every address, no cache (IPv4 as uint32 host-order
 * values, IPv6 as 16 bytes each). */
static PyObject *compute(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap;
    int family;
    Py_buffer a = {0}, out = {0};
    if (!PyArg_ParseTuple(args, "Oiy*w*:compute", &cap, &family, &a, &out))
        return NULL;
    PyObject *res = NULL;
    Core *k = PyCapsule_GetPointer(cap, CORE_NAME);
    const Py_ssize_t w = family == 6 ? 16 : 4;
    if (!k)
        goto done;
    if ((family != 4 && family != 6) || a.len % w || out.len < a.len ||
        (family == 4 && (((uintptr_t)a.buf | (uintptr_t)out.buf) % 4))) {
        PyErr_SetString(PyExc_ValueError, "_accel_anon.compute: bad family, or arrays too short or misaligned");
        goto done;
    }
    int fail = 0;
    Py_ssize_t n = a.len / w;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !fail; i++)
        fail = family == 4 ? !cp4(k, ((const uint32_t *)a.buf)[i], (uint32_t *)out.buf + i)
                           : !cp6(k, (const uint8_t *)a.buf + 16 * i, (uint8_t *)out.buf + 16 * i);
    Py_END_ALLOW_THREADS
    if (fail)
        PyErr_SetString(PyExc_RuntimeError, "_accel_anon.compute: AES failed");
    else
        res = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&out);
    return res;
}

/* The Crypto-PAn core and cryptopan.py's cache tables t[0..5] (k4, v4, f4, k6, v6, f6) into c,
 * checked for size and alignment. */
static int cache_args(Ctx *c, PyObject *cap, Py_buffer *t, int bits4, int bits6, int recompute)
{
    c->core = PyCapsule_GetPointer(cap, CORE_NAME);
    if (!c->core)
        return 0;
    if (bits4 <= 0 || bits4 >= 40 || bits6 <= 0 || bits6 >= 40) {
        PyErr_SetString(PyExc_ValueError, "_accel_anon.rewrite: cache bits out of range");
        return 0;
    }
    if (!need(&t[0], (Py_ssize_t)4 << bits4, 4, "k4") || !need(&t[1], (Py_ssize_t)4 << bits4, 4, "v4") ||
        !need(&t[2], (Py_ssize_t)1 << bits4, 1, "f4") || !need(&t[3], (Py_ssize_t)16 << bits6, 1, "k6") ||
        !need(&t[4], (Py_ssize_t)16 << bits6, 1, "v6") || !need(&t[5], (Py_ssize_t)1 << bits6, 1, "f6"))
        return 0;
    c->ck4 = t[0].buf, c->cv4 = t[1].buf, c->cf4 = t[2].buf, c->cbits4 = bits4;
    c->ck6 = t[3].buf, c->cv6 = t[4].buf, c->cf6 = t[5].buf, c->cbits6 = bits6;
    c->recompute = recompute;
    c->memo4 = c->core->memo4;
    c->memo6 = c->core->memo6;
    return 1;
}

/* The counters of a walk as a tuple (and the malformed count where rewrite_records parsed). */
static PyObject *walk_result(const Ctx *c, const int64_t *malformed)
{
    if (c->cryptofail) {
        PyErr_SetString(PyExc_RuntimeError, "_accel_anon.rewrite: AES failed");
        return NULL;
    }
    PyObject *t = Py_BuildValue("(LLLLLLL)", (long long)c->anonymized, (long long)c->not_anonymized,
                                (long long)c->corrected, (long long)c->offload, (long long)c->truncated,
                                (long long)c->miss4, (long long)c->miss6);
    if (t && malformed) {
        PyObject *m = Py_BuildValue("(L)", (long long)*malformed);
        PyObject *both = m ? PySequence_Concat(t, m) : NULL;
        Py_XDECREF(m);
        Py_SETREF(t, both);
    }
    return t;
}

/* rewrite(core, k4, v4, f4, bits4, k6, v6, f6, bits6, <the 14 packet arguments>, recompute): the
 * apply walk in one pass, every image taken from (or computed into) cryptopan.py's caches. */
static PyObject *rewrite(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap;
    int recompute, bits4, bits6;
    enum { NB = 20 };
    Py_buffer b[NB];
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "Ow*w*w*iw*w*w*iw*y*y*y*y*y*y*y*y*y*y*y*y*y*p:rewrite", &cap, &b[14], &b[15],
                          &b[16], &bits4, &b[17], &b[18], &b[19], &bits6, &b[0], &b[1], &b[2], &b[3], &b[4],
                          &b[5], &b[6], &b[7], &b[8], &b[9], &b[10], &b[11], &b[12], &b[13], &recompute))
        return NULL;
    PyObject *res = NULL;
    Ctx c;
    memset(&c, 0, sizeof c);
    Arrays a;
    Py_ssize_t n;
    if (!cache_args(&c, cap, &b[14], bits4, bits6, recompute) || !packet_args(&c, &a, b, &n))
        goto done;
    walk(&c, &a, n);
    res = walk_result(&c, NULL);
done:
    for (int j = 0; j < NB; j++)
        if (b[j].obj)
            PyBuffer_Release(&b[j]);
    return res;
}

/* rewrite_records(core, k4, v4, f4, bits4, k6, v6, f6, bits6, buf, off, caplen, wirelen, linktype,
 * recompute): parse (_parse_packet.h) and rewrite every packet of the batch in one pass, without
 * the Headers arrays; rewrite's counters plus the count of malformed packets. None, with nothing
 * written, where parse.parse_c would not take the batch (a link type it does not know, a packet
 * outside buf): the caller then parses and rewrites the usual way. */
static PyObject *rewrite_records(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap;
    int recompute, bits4, bits6;
    long linktype;
    enum { NB = 10 }; /* t[0..5]: the cache tables; then buf, off, caplen, wirelen */
    Py_buffer b[NB];
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "Ow*w*w*iw*w*w*iw*y*y*y*lp:rewrite_records", &cap, &b[0], &b[1], &b[2], &bits4,
                          &b[3], &b[4], &b[5], &bits6, &b[6], &b[7], &b[8], &b[9], &linktype, &recompute))
        return NULL;
    PyObject *res = NULL;
    Ctx c;
    memset(&c, 0, sizeof c);
    if (!cache_args(&c, cap, b, bits4, bits6, recompute))
        goto done;
    Py_ssize_t n = b[7].len / 8;
    if (!need(&b[7], 8 * n, 8, "off") || !need(&b[8], 8 * n, 8, "caplen") || !need(&b[9], 8 * n, 8, "wirelen"))
        goto done;
    c.buf = b[6].buf;
    c.blen = b[6].len;
    const int64_t *off = b[7].buf, *caplen = b[8].buf, *wirelen = b[9].buf;
    int take = pp_supported_linktype(linktype);
    for (Py_ssize_t i = 0; i < n && take; i++)
        take = pp_inside(c.blen, off[i], caplen[i]);
    if (!take) {
        res = Py_NewRef(Py_None);
        goto done;
    }
    int64_t malformed = 0;
    walk_records(&c, off, caplen, wirelen, n, linktype, &malformed);
    res = walk_result(&c, &malformed);
done:
    for (int j = 0; j < NB; j++)
        if (b[j].obj)
            PyBuffer_Release(&b[j]);
    return res;
}

/* lookup(family, keys, k, v, f, bits, out, miss): cryptopan.py's direct-mapped cache, looked up
 * for a whole array of addresses in one call (the numpy version costs ~10 array passes per
 * call, ~0.4 ms per batch). Slots are computed exactly as CryptoPAn._slot4 / _slot6 do
 * (Fibonacci hashing of the value, IPv6 as two native 64-bit lanes), so both share the tables.
 * out[i] gets the cached image where slot i holds keys[i]; the indices of the other keys go
 * to miss[], in order. Returns the number of misses. */
static PyObject *lookup(PyObject *self, PyObject *args)
{
    (void)self;
    int family, bits;
    Py_buffer keys = {0}, k = {0}, v = {0}, f = {0}, out = {0}, miss = {0};
    PyObject *res = NULL;
    if (!PyArg_ParseTuple(args, "iy*y*y*y*iw*w*:lookup", &family, &keys, &k, &v, &f, &bits, &out, &miss))
        return NULL;
    const Py_ssize_t w = family == 6 ? 16 : 4; /* bytes per address */
    const Py_ssize_t n = keys.len / w, slots = (Py_ssize_t)1 << (bits > 0 && bits < 40 ? bits : 0);
    if ((family != 4 && family != 6) || bits <= 0 || bits >= 40 || keys.len % w || f.len < slots ||
        k.len < slots * (family == 6 ? 16 : 4) || v.len < slots * w || out.len < n * w ||
        miss.len < n * (Py_ssize_t)sizeof(Py_ssize_t) || ((uintptr_t)miss.buf % sizeof(Py_ssize_t)) ||
        (family == 4 && (((uintptr_t)keys.buf | (uintptr_t)k.buf | (uintptr_t)v.buf | (uintptr_t)out.buf) % 4))) {
        PyErr_SetString(PyExc_ValueError, "_accel_anon.lookup: arrays too short, misaligned or bad family");
        goto done;
    }
    const uint8_t *filled = f.buf;
    Py_ssize_t *missed = miss.buf, nmiss = 0;
    const int shift = 64 - bits;
    if (family == 4) {
        const uint32_t *a = keys.buf, *kt = k.buf, *vt = v.buf;
        uint32_t *o = out.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t slot = hash4(a[i]) >> shift;
            if (filled[slot] && kt[slot] == a[i])
                o[i] = vt[slot];
            else
                missed[nmiss++] = i;
        }
    } else {
        const uint8_t *a = keys.buf, *kt = k.buf, *vt = v.buf;
        uint8_t *o = out.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t slot = hash6(a + 16 * i) >> shift;
            if (filled[slot] && memcmp(kt + 16 * slot, a + 16 * i, 16) == 0)
                memcpy(o + 16 * i, vt + 16 * slot, 16);
            else
                missed[nmiss++] = i;
        }
    }
    res = PyLong_FromSsize_t(nmiss);
done:
    PyBuffer_Release(&keys);
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    PyBuffer_Release(&f);
    PyBuffer_Release(&out);
    PyBuffer_Release(&miss);
    return res;
}

static PyMethodDef methods[] = {
    {"core", core, METH_VARARGS, "core(key) -> a Crypto-PAn core (capsule) for a 32-byte key."},
    {"compute", compute, METH_VARARGS,
     "compute(core, family, addrs, out): Crypto-PAn of every address (4: uint32 values, 6: 16 bytes each)."},
    {"rewrite", rewrite, METH_VARARGS,
     "rewrite(core, k4, v4, f4, bits4, k6, v6, f6, bits6, buf, off, caplen, sel, l3, ipver, ethertype, proto, "
     "l4, iplen, src4, dst4, src6, dst6, recompute) -> (packets_anonymized, not_anonymized, checksums_corrected, "
     "offload_checksums, addresses_truncated, new4, new6): the apply walk in one pass, images from CryptoPAn's "
     "caches, computed and cached on a miss."},
    {"rewrite_records", rewrite_records, METH_VARARGS,
     "rewrite_records(core, k4, v4, f4, bits4, k6, v6, f6, bits6, buf, off, caplen, wirelen, linktype, recompute) "
     "-> rewrite's counters + (malformed,), or None where the batch is not one the C parser takes: every packet "
     "parsed and rewritten in one pass, without the Headers arrays."},
    {"lookup", lookup, METH_VARARGS,
     "lookup(family, keys, k, v, f, bits, out, miss) -> misses: CryptoPAn's direct-mapped cache looked up for "
     "every key; hits written to out, the indices of the others to miss."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_accel_anon",
                                    "Per-packet Crypto-PAn rewrite and checksum fixes (see anonymize.py).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__accel_anon(void) { return PyModule_Create(&moddef); }
