/* C accelerator of capture_daemon/anonymize.py: Anonymizer.apply, per packet.
 *
 * Same result, byte for byte and counter for counter, as the numpy reference (Anonymizer with
 * accelerated=False); see the module docstring of anonymize.py for WHAT is rewritten and which
 * checksum rules apply. Crypto-PAn itself stays in Python (cryptopan.py, vectorized + cached):
 *
 *   run(0, ...)  "collect": walk every selected packet exactly as apply does; each address it
 *                would anonymize (an address "site": IPv4 as the uint32 host-order value of the
 *                big-endian address, IPv6 as 16 bytes, zero-padded where not captured) goes
 *                into a hash table, the distinct ones into a4 / a6, and site k's entry number
 *                into i4[k] / i6[k]. Returns (sites4, distinct4, sites6, distinct6, overflow);
 *                on overflow nothing is valid but the site counts: the caller grows its
 *                arrays to them and calls again.
 *   run(1, ...)  "apply": the same walk, in the same order, taking site k's anonymized address
 *                from a4[i4[k]] / a6[i6[k]] (the Crypto-PAn images of the distinct ones),
 *                writing it and fixing checksums; returns (sites4, sites6, packets_anonymized,
 *                not_anonymized, checksums_corrected, offload_checksums, addresses_truncated).
 * Deduplicating in C means Crypto-PAn's (cached) lookup runs once per distinct address of the
 * batch instead of once per occurrence.
 *
 * Per packet the steps run in the order the numpy code runs them over the batch (IPv4/IPv6
 * header and L4 incremental update, cut or bogus IP headers, ARP, ICMP errors / neighbour
 * discovery, then the whole-packet L4 recompute), so every read sees the same bytes. Packets
 * are independent (every read and write lies inside the packet), so doing the batch packet by
 * packet gives the batch-at-a-time result. The address bytes collected are never written
 * before the apply walk reaches them (outer addresses, options, the quoted header and the ND
 * targets are disjoint), so pass 1 reads what the numpy code reads.
 *
 * Every access is checked against the packet's end (min(off + caplen, len(buf))) and 0.
 * Checksum arithmetic is done on unfolded int64 sums with the numpy code's fold (end-around
 * carry as 1 + (s - 1) mod 0xFFFF with a floor modulo, 0 only for 0).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { PROTO_ICMP = 1, PROTO_TCP = 6, PROTO_UDP = 17, PROTO_ICMPV6 = 58 };

typedef struct {
    uint8_t *buf;
    int64_t blen;
    const int64_t *off, *caplen, *l3, *l4, *iplen;
    const uint8_t *sel, *ipver, *proto;
    const uint16_t *et;
    const uint32_t *src4, *dst4;
    const uint8_t *src6, *dst6;
    int apply, recompute;
    /* Address sites, in walk order: site k of a family refers to entry i4[k] of a4 (collect:
     * the distinct original addresses, deduplicated with a hash table; apply: their images). */
    uint32_t *a4, *i4;
    int64_t n4, u4, cap4, cap_u4;
    uint8_t *a6;
    uint32_t *i6;
    int64_t n6, u6, cap6, cap_u6;
    int overflow, nomem, badindex;
    int32_t *t4, *t6; /* hash tables: entry + 1, 0 = empty */
    int64_t bits4, bits6;
    int64_t anonymized, not_anonymized, corrected, offload, truncated;
} Ctx;

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

/* ---- address sites: collect (dedup) / apply ----------------------------------------------- */
static inline uint64_t hash4(uint32_t v) { return (uint64_t)v * 0x9E3779B97F4A7C15ull; }
static inline uint64_t hash6(const uint8_t *a)
{
    uint64_t x, y;
    memcpy(&x, a, 8);
    memcpy(&y, a + 8, 8);
    return ((x * 0xC2B2AE3D27D4EB4Full) ^ y) * 0x9E3779B97F4A7C15ull;
}

/* (Re)build a table of 2**bits slots over the first u entries. 0 on allocation failure. */
static int rehash(int32_t **tab, int64_t bits, int64_t u, int v6, const Ctx *c)
{
    int32_t *t = PyMem_RawCalloc((size_t)1 << bits, sizeof(int32_t));
    if (!t)
        return 0;
    uint64_t mask = ((uint64_t)1 << bits) - 1;
    for (int64_t j = 0; j < u; j++) {
        uint64_t h = (v6 ? hash6(c->a6 + 16 * j) : hash4(c->a4[j])) >> (64 - bits);
        while (t[h])
            h = (h + 1) & mask;
        t[h] = (int32_t)(j + 1);
    }
    PyMem_RawFree(*tab);
    *tab = t;
    return 1;
}

static void put4(Ctx *c, uint32_t v)
{
    int64_t k = c->n4++;
    if (c->overflow || c->nomem)
        return;
    if (k >= c->cap4 || c->u4 >= c->cap_u4 || c->u4 >= INT32_MAX - 1) {
        c->overflow = 1;
        return;
    }
    if ((c->u4 + 1) * 2 > ((int64_t)1 << c->bits4)) {
        if (!rehash(&c->t4, c->bits4 + 1, c->u4, 0, c)) {
            c->nomem = 1;
            return;
        }
        c->bits4++;
    }
    uint64_t mask = ((uint64_t)1 << c->bits4) - 1, h = hash4(v) >> (64 - c->bits4);
    for (;;) {
        int32_t e = c->t4[h];
        if (!e) {
            c->a4[c->u4] = v;
            c->t4[h] = (int32_t)(c->u4 + 1);
            c->i4[k] = (uint32_t)c->u4++;
            return;
        }
        if (c->a4[e - 1] == v) {
            c->i4[k] = (uint32_t)(e - 1);
            return;
        }
        h = (h + 1) & mask;
    }
}

static void put6(Ctx *c, const uint8_t *v)
{
    int64_t k = c->n6++;
    if (c->overflow || c->nomem)
        return;
    if (k >= c->cap6 || c->u6 >= c->cap_u6 || c->u6 >= INT32_MAX - 1) {
        c->overflow = 1;
        return;
    }
    if ((c->u6 + 1) * 2 > ((int64_t)1 << c->bits6)) {
        if (!rehash(&c->t6, c->bits6 + 1, c->u6, 1, c)) {
            c->nomem = 1;
            return;
        }
        c->bits6++;
    }
    uint64_t mask = ((uint64_t)1 << c->bits6) - 1, h = hash6(v) >> (64 - c->bits6);
    for (;;) {
        int32_t e = c->t6[h];
        if (!e) {
            memcpy(c->a6 + 16 * c->u6, v, 16);
            c->t6[h] = (int32_t)(c->u6 + 1);
            c->i6[k] = (uint32_t)c->u6++;
            return;
        }
        if (memcmp(c->a6 + 16 * (e - 1), v, 16) == 0) {
            c->i6[k] = (uint32_t)(e - 1);
            return;
        }
        h = (h + 1) & mask;
    }
}

/* Apply: the image of the next site's address; 0 if the tables do not match (caller bug). */
static int get4(Ctx *c, uint32_t *v)
{
    int64_t k = c->n4++;
    if (k >= c->cap4 || c->i4[k] >= c->cap_u4) {
        c->badindex = 1;
        return 0;
    }
    *v = c->a4[c->i4[k]];
    return 1;
}

static const uint8_t *get6(Ctx *c)
{
    int64_t k = c->n6++;
    if (k >= c->cap6 || c->i6[k] >= c->cap_u6) {
        c->badindex = 1;
        return NULL;
    }
    return c->a6 + 16 * (int64_t)c->i6[k];
}

/* ---- address sites ------------------------------------------------------------------------ */
/* The IPv4 address at p, captured up to e. Collect: push its zero-padded value. Apply: write the
 * next anonymized value where captured, add the word sums of the captured old / new bytes.
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
    if (!c->apply) {
        put4(c, ((uint32_t)old[0] << 24) | ((uint32_t)old[1] << 16) | ((uint32_t)old[2] << 8) | old[3]);
        return 0;
    }
    uint32_t v;
    if (!get4(c, &v))
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
    if (!c->apply) {
        put6(c, old);
        return 0;
    }
    const uint8_t *nw = get6(c);
    if (!nw)
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
                    if (addr4(c, s, aend, &o, &n) && c->apply)
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
static void ipv4(Ctx *c, Py_ssize_t i, int64_t l3, int64_t e, Whole *w)
{
    uint32_t so = c->src4[i], d = c->dst4[i];
    uint32_t ns = 0, nd = 0;
    if (!c->apply) {
        put4(c, so);
        put4(c, d);
    } else if (!get4(c, &ns) || !get4(c, &nd)) {
        return;
    }
    int ihl = (c->buf[l3] & 0x0F) * 4;
    int64_t eo = e < l3 + ihl ? e : l3 + ihl;
    if (!c->apply) {
        if (ihl > 20)
            ipv4_options(c, l3, eo);
        return;
    }
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

    int64_t l4 = c->l4[i];
    int more_frags = (c->buf[l3 + 6] & 0x20) != 0;
    int64_t l4len = c->iplen[i] - ihl;
    l4_checksum(c, l3, l4, e, c->proto[i], l4 >= 0, more_frags, l4len, old_sum, new_sum, 4, c->iplen[i], w);
}

static int is_ext(int nh) { return nh == 0 || nh == 43 || nh == 60 || nh == 44 || nh == 51 || nh == 135; }

static void ipv6(Ctx *c, Py_ssize_t i, int64_t l3, int64_t e, Whole *w)
{
    const uint8_t *so = c->src6 + 16 * i, *d = c->dst6 + 16 * i;
    if (!c->apply) {
        put6(c, so);
        put6(c, d);
        return;
    }
    uint8_t nw[32];
    const uint8_t *ns = get6(c), *nd = get6(c);
    if (!ns || !nd)
        return;
    memcpy(nw, ns, 16);
    memcpy(nw + 16, nd, 16);
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
    int64_t l4 = c->l4[i];
    int has_l4 = l4 >= 0 && !rh_active;
    int64_t l4len = c->iplen[i] - (l4 - l3);
    l4_checksum(c, l3, l4, e, c->proto[i], has_l4, first_frag, l4len, old_sum, new_sum, 16, c->iplen[i], w);
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
    int64_t before = c->apply ? gather_sum(c, q, e, span) : 0;
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
    if (!c->apply)
        return;
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

static void icmp4_errors(Ctx *c, Py_ssize_t i, int64_t e)
{
    int64_t l4 = c->l4[i], q = l4 + 8;
    if (c->proto[i] != PROTO_ICMP || l4 < 0 || !(q < e))
        return;
    int t = c->buf[l4];
    if (!(t == 3 || t == 4 || t == 5 || t == 11 || t == 12))
        return;
    if ((c->buf[q] >> 4) != 4 || !(q + 12 < e))
        return;
    quoted(c, l4, e, 0);
}

static void icmp6_payload(Ctx *c, Py_ssize_t i, int64_t e)
{
    int64_t l4 = c->l4[i], q = l4 + 8;
    if (c->proto[i] != PROTO_ICMPV6 || l4 < 0 || !(q < e))
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
    int64_t before = c->apply ? gather_sum(c, q, e, 16 * nf) : 0;
    int64_t os = 0, ns = 0;
    int part = 0;
    for (int j = 0; j < nf; j++)
        part |= addr6(c, q + 16 * j, e, &os, &ns);
    if (!c->apply)
        return;
    if (part)
        c->truncated++;
    int64_t after = gather_sum(c, q, e, 16 * nf);
    adjust(c, l4 + 2, e, before, after, 8 * nf);
}

/* ---- non-IP or unparsed IP (Anonymizer._cut_or_bogus_ip, _arp) ---------------------------- */
static int cut_or_bogus(Ctx *c, Py_ssize_t i, int64_t l3, int64_t e)
{
    int et = c->et[i];
    if (!((et == 0x0800 || et == 0x86DD) && l3 < e))
        return 0;
    int version = c->buf[l3] >> 4;
    int v4 = et == 0x0800 && version == 4, v6 = et == 0x86DD && version == 6;
    if (!v4 && !v6) {
        if (c->apply)
            c->not_anonymized++;
        return 0;
    }
    int64_t os = 0, ns = 0;
    if (v4 && l3 + 12 < e) {
        int part = addr4(c, l3 + 12, e, &os, &ns);
        part |= addr4(c, l3 + 16, e, &os, &ns);
        if (c->apply) {
            c->truncated += part;
            put16(c, l3 + 10, incremental(get16(c, l3 + 10), os, ns, 4));
        }
        return 1;
    }
    if (v6 && l3 + 8 < e) {
        int part = addr6(c, l3 + 8, e, &os, &ns);
        part |= addr6(c, l3 + 24, e, &os, &ns);
        if (c->apply)
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
        if (c->apply)
            c->not_anonymized++;
        return 0;
    }
    if (!(l3 + 8 + hlen < e))
        return 0;
    int64_t spa = l3 + 8 + hlen, tpa = spa + 4 + hlen, os = 0, ns = 0;
    int part = addr4(c, spa, e, &os, &ns);
    part |= addr4(c, tpa, e, &os, &ns);
    if (c->apply)
        c->truncated += part;
    return 1;
}

static void packet(Ctx *c, Py_ssize_t i)
{
    int64_t o = c->off[i], cl = c->caplen[i];
    if (o < 0 || cl <= 0 || o >= c->blen)
        return; /* nothing captured: nothing to rewrite (numpy: every check fails too) */
    int64_t e = o + cl < c->blen ? o + cl : c->blen;
    int64_t l3 = c->l3[i];
    if (l3 < 0)
        return;
    int ver = c->ipver[i];
    Whole w = {0, 0, 0, 0, 0, 0};
    if (ver == 4) {
        if (!ok(l3, 20, e))
            return; /* parse guarantees it; headers that lie are left alone */
        ipv4(c, i, l3, e, &w);
        icmp4_errors(c, i, e);
        c->anonymized++;
    } else if (ver == 6) {
        if (!ok(l3, 40, e))
            return;
        ipv6(c, i, l3, e, &w);
        icmp6_payload(c, i, e);
        c->anonymized++;
    } else if (c->et[i] == 0x0806) {
        c->anonymized += arp(c, l3, e);
    } else {
        c->anonymized += cut_or_bogus(c, i, l3, e);
    }
    if (c->apply && c->recompute && w.have && ok(w.start, w.stop - w.start, e) && ok(w.cs_pos, 2, e))
        recompute_whole(c, &w);
}

/* ---- Python entry point ------------------------------------------------------------------- */
static int need(Py_buffer *b, Py_ssize_t bytes, Py_ssize_t align, const char *name)
{
    if (b->len < bytes || ((uintptr_t)b->buf % (uintptr_t)align) != 0) {
        PyErr_Format(PyExc_ValueError, "_accel_anon.run: %s too short or misaligned", name);
        return 0;
    }
    return 1;
}

static PyObject *run(PyObject *self, PyObject *args)
{
    (void)self;
    int mode, recompute;
    enum { NB = 18 };
    Py_buffer b[NB];
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "iw*y*y*y*y*y*y*y*y*y*y*y*y*y*w*w*w*w*p:run", &mode, &b[0], &b[1], &b[2], &b[3],
                          &b[4], &b[5], &b[6], &b[7], &b[8], &b[9], &b[10], &b[11], &b[12], &b[13], &b[14],
                          &b[15], &b[16], &b[17], &recompute))
        return NULL;
    PyObject *res = NULL;
    Ctx c;
    memset(&c, 0, sizeof c);
    Py_ssize_t n = b[3].len; /* sel: one byte per packet */
    if (!need(&b[1], 8 * n, 8, "off") || !need(&b[2], 8 * n, 8, "caplen") || !need(&b[4], 8 * n, 8, "l3") ||
        !need(&b[5], n, 1, "ipver") || !need(&b[6], 2 * n, 2, "ethertype") || !need(&b[7], n, 1, "proto") ||
        !need(&b[8], 8 * n, 8, "l4") || !need(&b[9], 8 * n, 8, "iplen") || !need(&b[10], 4 * n, 4, "src4") ||
        !need(&b[11], 4 * n, 4, "dst4") || !need(&b[12], 16 * n, 1, "src6") || !need(&b[13], 16 * n, 1, "dst6") ||
        !need(&b[14], 0, 4, "a4") || !need(&b[15], 0, 4, "i4") || !need(&b[17], 0, 4, "i6"))
        goto done;
    c.buf = b[0].buf;
    c.blen = b[0].len;
    c.off = b[1].buf;
    c.caplen = b[2].buf;
    c.sel = b[3].buf;
    c.l3 = b[4].buf;
    c.ipver = b[5].buf;
    c.et = b[6].buf;
    c.proto = b[7].buf;
    c.l4 = b[8].buf;
    c.iplen = b[9].buf;
    c.src4 = b[10].buf;
    c.dst4 = b[11].buf;
    c.src6 = b[12].buf;
    c.dst6 = b[13].buf;
    c.a4 = b[14].buf;
    c.cap_u4 = b[14].len / 4;
    c.i4 = b[15].buf;
    c.cap4 = b[15].len / 4;
    c.a6 = b[16].buf;
    c.cap_u6 = b[16].len / 16;
    c.i6 = b[17].buf;
    c.cap6 = b[17].len / 4;
    c.apply = mode == 1;
    c.recompute = recompute;
    if (!c.apply) {
        c.bits4 = c.bits6 = 12;
        c.t4 = PyMem_RawCalloc((size_t)1 << c.bits4, sizeof(int32_t));
        c.t6 = PyMem_RawCalloc((size_t)1 << c.bits6, sizeof(int32_t));
        if (!c.t4 || !c.t6) {
            PyErr_NoMemory();
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        if (c.sel[i])
            packet(&c, i);
    Py_END_ALLOW_THREADS
    if (c.nomem)
        PyErr_NoMemory();
    else if (c.badindex)
        PyErr_SetString(PyExc_RuntimeError, "_accel_anon.run: address tables do not match the packets");
    else if (c.apply)
        res = Py_BuildValue("(LLLLLLL)", (long long)c.n4, (long long)c.n6, (long long)c.anonymized,
                            (long long)c.not_anonymized, (long long)c.corrected, (long long)c.offload,
                            (long long)c.truncated);
    else
        res = Py_BuildValue("(LLLLi)", (long long)c.n4, (long long)c.u4, (long long)c.n6, (long long)c.u6,
                            c.overflow);
done:
    PyMem_RawFree(c.t4);
    PyMem_RawFree(c.t6);
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
    {"lookup", lookup, METH_VARARGS,
     "lookup(family, keys, k, v, f, bits, out, miss) -> misses: CryptoPAn's direct-mapped cache looked up for "
     "every key; hits written to out, the indices of the others to miss."},
    {"run", run, METH_VARARGS,
     "run(mode, buf, off, caplen, sel, l3, ipver, ethertype, proto, l4, iplen, src4, dst4, src6, dst6, a4, i4, "
     "a6, i6, recompute): mode 0 collects the distinct addresses to anonymize into a4/a6 (site k -> entry i4[k] / "
     "i6[k]) and returns (sites4, distinct4, sites6, distinct6, overflow); mode 1 takes their images from a4/a6, "
     "writes them, fixes checksums and returns (sites4, sites6, packets_anonymized, not_anonymized, "
     "checksums_corrected, offload_checksums, addresses_truncated)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_accel_anon",
                                    "Per-packet Crypto-PAn rewrite and checksum fixes (see anonymize.py).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__accel_anon(void) { return PyModule_Create(&moddef); }
