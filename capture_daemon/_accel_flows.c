/* The flow meter's per-packet work in C: keys, grouping, segmenting, merge into the flow
 * table, expiry.  A line-by-line port of the numpy reference (capture_daemon/flows.py,
 * NumpyFlowMeter): same records, same fields, same end reasons, same order, same slot
 * numbers (the reference's slot allocator and free stack are reproduced, because slot order
 * decides the order of records expired by advance(), flush() and the table bound).
 *
 * Only the CPython C API and the buffer protocol: the Python wrapper (flows.CFlowMeter)
 * passes C-contiguous numpy arrays of parse.Headers' dtypes; this file checks every
 * buffer's length and item size, and every offset it reads from the packet buffer.
 * Integer arithmetic on times and lengths wraps (as numpy's int64 does), done in uint64.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

#define END_IDLE 1
#define END_ACTIVE 2
#define END_DETECTED 3
#define END_FORCED 4
#define END_RESOURCES 5
#define TCP_FIN 0x01
#define TCP_RST 0x04
#define PROTO_TCP 6
#define IDX_BITS 20
#define REC_SIZE 94
#define BIG ((int64_t)1 << 62)

static inline int64_t wadd(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }
static inline int64_t wsub(int64_t a, int64_t b) { return (int64_t)((uint64_t)a - (uint64_t)b); }

typedef struct {
    int64_t start, end;
    uint64_t packets, octets, rpackets, roctets;
    uint64_t k[5];
    uint8_t flags, rflags, tos, fin, init_rev, used;
} Flow;

typedef struct { Flow f; Py_ssize_t slot; int reason; } Seg;

/* A batch's first segment of a flow already in the table continues that flow. */
static inline void merge_segment(Flow *f, const Flow *seg)
{
    if (seg->end > f->end) f->end = seg->end;
    if (seg->start < f->start) f->start = seg->start;
    f->packets += seg->packets; f->octets += seg->octets;
    f->rpackets += seg->rpackets; f->roctets += seg->roctets;
    f->flags |= seg->flags; f->rflags |= seg->rflags; f->fin |= seg->fin;
}
typedef struct { Seg *v; Py_ssize_t n, cap; } SegList;

/* one metered packet: one cache line, so the walks in group order touch one line each */
typedef struct {
    uint64_t k[5];
    int64_t t, ln;
    uint8_t fl, tos, rev, pad[5];
} Pkt;
_Static_assert(sizeof(Pkt) == 64, "Pkt is one cache line");

typedef struct {
    PyObject_HEAD
    int64_t idle_us, active_us, end_us, scan_us;
    int64_t max_flows;
    int biflow;
    uint64_t hc[5];
    /* table */
    Flow *tab;
    Py_ssize_t cap;
    /* The reference's free stack, bottom to top: the never-used slots [virgin, cap) in
     * descending order (implicit), then the freed slots fstack[0 .. nexp) (explicit).
     * Slots from virgin up are never touched, so their pages are never resident. */
    int32_t *fstack;
    Py_ssize_t nexp, fcap, virgin;
    Py_ssize_t nactive;
    int32_t *ht;                 /* open addressing, -1 empty, value = slot */
    size_t htmask;
    /* time */
    int have_now, have_scan;
    int flush_phase;             /* flush_part(): 0 start, 1 FIN/RST pass, 2 forced pass */
    Py_ssize_t flush_pos;
    int64_t now, next_scan;
    /* output records, RECORD_DTYPE layout */
    PyObject *out;               /* bytearray handed over by take() as it is (no copy) */
    Py_ssize_t nout, outcap;
    /* stats */
    uint64_t st_packets, st_non_ip, st_records, st_forced, st_fallbacks;
    /* per-batch scratch */
    Py_ssize_t scap;
    void *pbase, *qbase;
    Pkt *P, *Q;                  /* packets in arrival order, in group order */
    uint64_t *comp, *comp2;
    int32_t *order, *gstart, *gslot;
    SegList segB, segC, segD, expA;
} Meter;

/* ---- helpers ---------------------------------------------------------------------------- */

static uint64_t key_hash(const uint64_t *k)
{
    uint64_t h = 0x243F6A8885A308D3ULL;
    for (int i = 0; i < 5; i++) {
        h ^= k[i];
        h *= 0xFF51AFD7ED558CCDULL;
        h ^= h >> 32;
    }
    h *= 0xC4CEB9FE1A85EC53ULL;
    h ^= h >> 29;
    return h;
}

static int8_t reason_of(int fin, int64_t last, int64_t start, int64_t now,
                        int64_t idle_us, int64_t end_us, int64_t active_us)
{
    int64_t d_end = fin ? wadd(last, wadd(end_us, 1)) : BIG;
    int64_t d_idle = wadd(last, wadd(idle_us, 1));
    int64_t d_act = wadd(start, active_us);
    int64_t first = d_end < d_idle ? d_end : d_idle;
    if (d_act < first) first = d_act;
    int r = 0;
    if (d_act == first) r = END_ACTIVE;
    if (d_idle == first) r = END_IDLE;
    if (d_end == first) r = END_DETECTED;
    return now >= first ? (int8_t)r : 0;
}

static int out_reserve(Meter *m, Py_ssize_t more)
{
    if (m->out && m->nout + more <= m->outcap) return 0;
    if (more > PY_SSIZE_T_MAX / REC_SIZE / 4 - m->nout) { PyErr_NoMemory(); return -1; }
    Py_ssize_t nc = m->outcap * 2;
    if (nc < m->nout + more) nc = m->nout + more;     /* a known burst: exactly its size */
    if (nc < 256) nc = 256;
    if (!m->out) {
        m->out = PyByteArray_FromStringAndSize(NULL, nc * REC_SIZE);
        if (!m->out) return -1;
    } else if (PyByteArray_Resize(m->out, nc * REC_SIZE) < 0) {
        return -1;
    }
    m->outcap = nc;
    return 0;
}

static int emit(Meter *m, const Flow *f, int reason)
{
    if (out_reserve(m, 1) < 0) return -1;
    uint8_t *r = (uint8_t *)PyByteArray_AS_STRING(m->out) + (size_t)m->nout * REC_SIZE;
    memcpy(r + 0, &f->start, 8);
    memcpy(r + 8, &f->end, 8);
    memcpy(r + 16, &f->packets, 8);
    memcpy(r + 24, &f->octets, 8);
    memcpy(r + 32, &f->rpackets, 8);
    memcpy(r + 40, &f->roctets, 8);
    memcpy(r + 48, f->k, 40);
    r[88] = f->flags;
    r[89] = f->rflags;
    r[90] = f->tos;
    r[91] = f->fin ? 1 : 0;
    r[92] = f->init_rev ? 1 : 0;
    r[93] = (uint8_t)reason;
    m->nout++;
    m->st_records++;
    return 0;
}

/* The slot of key k, whose index position is home (key_hash(k) & htmask), or -1. */
static Py_ssize_t ht_find(Meter *m, const uint64_t *k, size_t home)
{
    size_t i = home;
    for (;;) {
        int32_t s = m->ht[i];
        if (s < 0) return -1;
        if (memcmp(m->tab[s].k, k, 40) == 0) return s;
        i = (i + 1) & m->htmask;
    }
}

static void ht_put(Meter *m, Py_ssize_t slot)
{
    size_t i = (size_t)key_hash(m->tab[slot].k) & m->htmask;
    while (m->ht[i] >= 0) i = (i + 1) & m->htmask;
    m->ht[i] = (int32_t)slot;
}

static void ht_del(Meter *m, Py_ssize_t slot)
{
    size_t i = (size_t)key_hash(m->tab[slot].k) & m->htmask;
    while (m->ht[i] != (int32_t)slot) i = (i + 1) & m->htmask;
    /* backward-shift deletion */
    size_t j = i;
    for (;;) {
        j = (j + 1) & m->htmask;
        int32_t s = m->ht[j];
        if (s < 0) break;
        size_t home = (size_t)key_hash(m->tab[s].k) & m->htmask;
        /* can s move to i?  yes unless home lies cyclically in (i, j] */
        int in_range = (i <= j) ? (home > i && home <= j) : (home > i || home <= j);
        if (!in_range) {
            m->ht[i] = s;
            i = j;
        }
    }
    m->ht[i] = -1;
}

static inline Py_ssize_t free_count(const Meter *m) { return m->cap - m->virgin + m->nexp; }

/* entry pos (from the bottom) of the reference's free stack */
static inline Py_ssize_t free_at(const Meter *m, Py_ssize_t pos)
{
    Py_ssize_t vr = m->cap - m->virgin;
    return pos < vr ? m->cap - 1 - pos : m->fstack[pos - vr];
}

/* reference: new = max(old * 2, old + need); new slots go to the bottom of the free stack
 * (here: the never-used run grows; nothing is written to the new slots) */
static int grow(Meter *m, Py_ssize_t need)
{
    Py_ssize_t old = m->cap;
    Py_ssize_t nc = old * 2 > old + need ? old * 2 : old + need;
    if (nc > INT32_MAX / 4) { PyErr_SetString(PyExc_MemoryError, "flow table too large"); return -1; }
    Flow *t = PyMem_Realloc(m->tab, (size_t)nc * sizeof(Flow));
    if (!t) { PyErr_NoMemory(); return -1; }
    m->tab = t;                  /* cap grows only once the index fits it too */
    size_t hsz = 1;
    while (hsz < (size_t)nc * 2) hsz <<= 1;
    if (hsz - 1 != m->htmask || !m->ht) {
        int32_t *h = PyMem_Malloc(hsz * sizeof(int32_t));
        if (!h) { PyErr_NoMemory(); return -1; }
        PyMem_Free(m->ht);
        m->ht = h;
        m->htmask = hsz - 1;
        memset(h, 0xFF, hsz * sizeof(int32_t));
        for (Py_ssize_t s = 0; s < m->virgin; s++)
            if (m->tab[s].used) ht_put(m, s);
    }
    m->cap = nc;
    return 0;
}

static int expire_slot(Meter *m, Py_ssize_t s, int reason)
{
    if (emit(m, &m->tab[s], reason) < 0) return -1;
    ht_del(m, s);
    m->tab[s].used = 0;
    m->fstack[m->nexp++] = (int32_t)s;      /* fcap >= virgin > every used slot */
    m->nactive--;
    return 0;
}

static int scratch(Meter *m, Py_ssize_t n)
{
    if (n + 1 <= m->scap) return 0;       /* gstart needs n + 1 entries */
    Py_ssize_t c = n + 1 < 1024 ? 1024 : n + 1;
#define RE(p, type, k) do { void *q = PyMem_Realloc(m->p, (size_t)c * (k) * sizeof(type)); \
        if (!q) { PyErr_NoMemory(); return -1; } m->p = q; } while (0)
    RE(comp, uint64_t, 1); RE(comp2, uint64_t, 1); RE(order, int32_t, 1);
    RE(gstart, int32_t, 1); RE(gslot, int32_t, 1);
#undef RE
    /* one spare Pkt for the 64-byte alignment */
    void *pb = PyMem_Realloc(m->pbase, ((size_t)c + 1) * sizeof(Pkt));
    if (!pb) { PyErr_NoMemory(); return -1; }
    m->pbase = pb;
    void *qb = PyMem_Realloc(m->qbase, ((size_t)c + 1) * sizeof(Pkt));
    if (!qb) { PyErr_NoMemory(); return -1; }
    m->qbase = qb;
    m->P = (Pkt *)(((uintptr_t)m->pbase + 63) & ~(uintptr_t)63);
    m->Q = (Pkt *)(((uintptr_t)m->qbase + 63) & ~(uintptr_t)63);
    m->scap = c;
    return 0;
}

/* ---- object ------------------------------------------------------------------------------ */

static void Meter_dealloc(Meter *m)
{
    PyMem_Free(m->tab); PyMem_Free(m->fstack); PyMem_Free(m->ht); Py_XDECREF(m->out);
    PyMem_Free(m->pbase); PyMem_Free(m->qbase); PyMem_Free(m->comp); PyMem_Free(m->comp2);
    PyMem_Free(m->order); PyMem_Free(m->gstart); PyMem_Free(m->gslot);
    PyMem_Free(m->segB.v); PyMem_Free(m->segC.v); PyMem_Free(m->segD.v); PyMem_Free(m->expA.v);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static int Meter_init(Meter *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"idle_us", "active_us", "end_us", "scan_us", "max_flows",
                             "biflow", "hash_c", NULL};
    long long idle, act, end, scan, maxf;
    int bi;
    PyObject *hc;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LLLLLpO", kwlist, &idle, &act, &end, &scan,
                                     &maxf, &bi, &hc))
        return -1;
    if (m->tab) { PyErr_SetString(PyExc_RuntimeError, "already initialized"); return -1; }
    PyObject *seq = PySequence_Fast(hc, "hash_c must be a sequence of 5 integers");
    if (!seq) return -1;
    if (PySequence_Fast_GET_SIZE(seq) != 5) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "hash_c must have 5 integers");
        return -1;
    }
    for (int i = 0; i < 5; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLongMask(PySequence_Fast_GET_ITEM(seq, i));
        if (v == (unsigned long long)-1 && PyErr_Occurred()) { Py_DECREF(seq); return -1; }
        m->hc[i] = v;
    }
    Py_DECREF(seq);
    m->idle_us = idle; m->active_us = act; m->end_us = end; m->scan_us = scan;
    m->max_flows = maxf; m->biflow = bi;
    m->cap = 0;
    return grow(m, 1024);      /* 0 -> 1024 slots, free stack [1023 .. 0] as the reference */
}

/* numpy fancy-index semantics: a negative position counts from the end (checked before) */
static inline uint8_t byte_at(const uint8_t *buf, Py_ssize_t len, int64_t l3, int64_t j)
{
    int64_t p = wadd(l3, j);
    if (p < 0) p = wadd(p, len);
    return (p >= 0 && p < len) ? buf[p] : 0;
}

typedef struct { Py_buffer b; int ok; } Buf;

static int getbuf(PyObject *o, Buf *x, Py_ssize_t n, Py_ssize_t item, const char *name, int writable)
{
    x->ok = 0;
    if (PyObject_GetBuffer(o, &x->b, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    x->ok = 1;
    if (n >= 0 && (x->b.len != n * item || x->b.itemsize != (item > 8 ? 1 : item))) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes", name, n, item);
        return -1;
    }
    return 0;
}

static void relbuf(Buf *x) { if (x->ok) PyBuffer_Release(&x->b); x->ok = 0; }

/* stable LSD radix sort of the comp words on bits IDX_BITS..63 (4 passes of 11 bits) */
static void radix_sort(uint64_t *a, uint64_t *tmp, Py_ssize_t n)
{
    Py_ssize_t cnt[2048];
    for (int pass = 0; pass < 4; pass++) {
        int sh = IDX_BITS + 11 * pass;
        memset(cnt, 0, sizeof cnt);
        for (Py_ssize_t i = 0; i < n; i++) cnt[(a[i] >> sh) & 2047]++;
        Py_ssize_t s = 0;
        for (int d = 0; d < 2048; d++) { Py_ssize_t c = cnt[d]; cnt[d] = s; s += c; }
        for (Py_ssize_t i = 0; i < n; i++) tmp[cnt[(a[i] >> sh) & 2047]++] = a[i];
        uint64_t *x = a; a = tmp; tmp = x;
    }
    /* 4 passes: the result is back in the original array */
}

static const Pkt *g_pkts;      /* qsort has no context argument; the GIL serializes calls */
static int cmp_exact(const void *pa, const void *pb)
{
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    const uint64_t *ka = g_pkts[a].k, *kb = g_pkts[b].k;
    for (int i = 0; i < 5; i++)
        if (ka[i] != kb[i]) return ka[i] < kb[i] ? -1 : 1;
    return a < b ? -1 : (a > b);
}


static int seg_push(SegList *l, const Flow *f, Py_ssize_t slot, int reason)
{
    if (l->n == l->cap) {
        Py_ssize_t c = l->cap ? l->cap * 2 : 64;
        Seg *v = PyMem_Realloc(l->v, (size_t)c * sizeof(Seg));
        if (!v) { PyErr_NoMemory(); return -1; }
        l->v = v;
        l->cap = c;
    }
    if (f) l->v[l->n].f = *f;
    l->v[l->n].slot = slot;
    l->v[l->n].reason = reason;
    l->n++;
    return 0;
}

typedef struct { int64_t end; Py_ssize_t slot; } EndSlot;
static int cmp_endslot(const void *pa, const void *pb)
{
    const EndSlot *a = pa, *b = pb;
    if (a->end != b->end) return a->end < b->end ? -1 : 1;
    return a->slot < b->slot ? -1 : (a->slot > b->slot);
}

static int enforce_bound(Meter *m)
{
    Py_ssize_t over = m->nactive - (Py_ssize_t)m->max_flows;
    if (over <= 0) return 0;
    EndSlot *v = PyMem_Malloc((size_t)m->nactive * sizeof(EndSlot));
    if (!v) { PyErr_NoMemory(); return -1; }
    Py_ssize_t k = 0;
    for (Py_ssize_t s = 0; s < m->virgin; s++)
        if (m->tab[s].used) { v[k].end = m->tab[s].end; v[k].slot = s; k++; }
    qsort(v, (size_t)k, sizeof(EndSlot), cmp_endslot);
    m->st_forced += (uint64_t)over;
    for (Py_ssize_t i = 0; i < over && i < k; i++)
        if (expire_slot(m, v[i].slot, END_RESOURCES) < 0) { PyMem_Free(v); return -1; }
    PyMem_Free(v);
    return 0;
}

/* add(ts, ipver, src4, dst4, src6, dst6, vlan, sport, dport, proto, tcpflags, tos, iplen, sel,
 *     buf, l3) -- buf/l3 None: addresses from the header arrays; else read back from buf */
static PyObject *Meter_add(Meter *m, PyObject *args)
{
    PyObject *o[16];
    if (!PyArg_UnpackTuple(args, "add", 16, 16, &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                           &o[7], &o[8], &o[9], &o[10], &o[11], &o[12], &o[13], &o[14], &o[15]))
        return NULL;
    if (!m->tab) { PyErr_SetString(PyExc_RuntimeError, "not initialized"); return NULL; }
    m->flush_phase = 0;
    Buf B[16];
    memset(B, 0, sizeof B);
    PyObject *ret = NULL;
    SegList *segB = &m->segB, *segC = &m->segC, *segD = &m->segD, *expA = &m->expA;
    segB->n = segC->n = segD->n = expA->n = 0;
    Py_ssize_t n;
    /* ts first: it gives n */
    if (getbuf(o[0], &B[0], -1, 8, "ts", 0) < 0) goto done;
    if (B[0].b.itemsize != 8) { PyErr_SetString(PyExc_ValueError, "ts: int64 expected"); goto done; }
    n = B[0].b.len / 8;
    static const Py_ssize_t isz[14] = {8, 1, 4, 4, 16, 16, 4, 2, 2, 1, 1, 1, 8, 1};
    static const char *nm[14] = {"ts", "ipver", "src4", "dst4", "src6", "dst6", "vlan", "sport",
                                 "dport", "proto", "tcpflags", "tos", "iplen", "sel"};
    for (int i = 1; i < 14; i++)
        if (getbuf(o[i], &B[i], n, isz[i], nm[i], 0) < 0) goto done;
    int readback = o[14] != Py_None;
    Py_ssize_t buflen = 0;
    const uint8_t *pbuf = NULL;
    const int64_t *l3 = NULL;
    if (readback) {
        if (getbuf(o[14], &B[14], -1, 1, "buf", 0) < 0) goto done;
        if (B[14].b.itemsize != 1) { PyErr_SetString(PyExc_ValueError, "buf: uint8 expected"); goto done; }
        if (getbuf(o[15], &B[15], n, 8, "l3", 0) < 0) goto done;
        buflen = B[14].b.len;
        pbuf = B[14].b.buf;
        l3 = B[15].b.buf;
    }
    const int64_t *ts = B[0].b.buf;
    const uint8_t *ipver = B[1].b.buf;
    const uint32_t *src4 = B[2].b.buf, *dst4 = B[3].b.buf;
    const uint8_t *src6 = B[4].b.buf, *dst6 = B[5].b.buf;
    const int32_t *vlan = B[6].b.buf;
    const uint16_t *sport = B[7].b.buf, *dport = B[8].b.buf;
    const uint8_t *proto = B[9].b.buf, *tcpf = B[10].b.buf, *tosv = B[11].b.buf;
    const int64_t *iplen = B[12].b.buf;
    const uint8_t *sel = B[13].b.buf;

    /* the reference reads addresses back for every IPv4/IPv6 packet (selected or not):
     * numpy indexing semantics, negative positions count from the end, else IndexError */
    if (readback) {
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t lo, hi;
            if (ipver[i] == 4) { lo = 12; hi = 20; }
            else if (ipver[i] == 6) { lo = 8; hi = 40; }
            else continue;
            if (l3[i] >= 0 && l3[i] <= buflen - hi) continue;
            for (Py_ssize_t j = lo; j < hi; j++) {
                int64_t p = wadd(l3[i], j);
                if (p < 0) p = wadd(p, buflen);
                if (p < 0 || p >= buflen) {
                    PyErr_SetString(PyExc_IndexError, "network header offset outside the batch buffer");
                    goto done;
                }
            }
        }
    }
#define BYTE_AT(i, j) byte_at(pbuf, buflen, l3[i], (j))

    Py_ssize_t nsel = 0, mm = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!sel[i]) continue;
        nsel++;
        if (ipver[i] == 4 || ipver[i] == 6) mm++;
    }
    m->st_non_ip += (uint64_t)(nsel - mm);
    if (mm == 0) { ret = PyLong_FromLong(0); goto done; }
    if (scratch(m, mm) < 0) goto done;

    /* ---- keys */
    uint64_t octsum = 0;
    int64_t tmax = INT64_MIN;
    Py_ssize_t q = 0;
    Pkt *P = m->P, *Q = m->Q;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!sel[i] || !(ipver[i] == 4 || ipver[i] == 6)) continue;
        Pkt *pk = &P[q];
        uint64_t *k = pk->k;
        int fast = readback && l3[i] >= 0 && l3[i] <= buflen - 40;
        if (ipver[i] == 4) {
            uint32_t s, d;
            if (fast) {
                const uint8_t *b = pbuf + l3[i] + 12;
                s = ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
                d = ((uint32_t)b[4] << 24) | ((uint32_t)b[5] << 16) | ((uint32_t)b[6] << 8) | b[7];
            } else if (readback) {
                s = ((uint32_t)BYTE_AT(i, 12) << 24) | ((uint32_t)BYTE_AT(i, 13) << 16)
                    | ((uint32_t)BYTE_AT(i, 14) << 8) | BYTE_AT(i, 15);
                d = ((uint32_t)BYTE_AT(i, 16) << 24) | ((uint32_t)BYTE_AT(i, 17) << 16)
                    | ((uint32_t)BYTE_AT(i, 18) << 8) | BYTE_AT(i, 19);
            } else { s = src4[i]; d = dst4[i]; }
            k[0] = 0; k[1] = s; k[2] = 0; k[3] = d;
        } else if (fast) {
            memcpy(k, pbuf + l3[i] + 8, 32);   /* native-order views, as .view(np.uint64) */
        } else if (readback) {
            uint8_t a[32];
            for (int j = 0; j < 32; j++) a[j] = BYTE_AT(i, 8 + j);
            memcpy(k, a, 32);
        } else {
            memcpy(k, src6 + 16 * (size_t)i, 16);
            memcpy(k + 2, dst6 + 16 * (size_t)i, 16);
        }
        int64_t v = vlan[i];
        uint64_t vl = (uint64_t)((v < 0 ? -1 : (v & 0xFFF)) + 1);
        uint64_t sp = sport[i], dp = dport[i];
        uint8_t rv = 0;
        if (m->biflow) {
            rv = (k[0] > k[2]) || (k[0] == k[2] && ((k[1] > k[3]) || (k[1] == k[3] && sp > dp)));
            if (rv) {
                uint64_t x;
                x = k[0]; k[0] = k[2]; k[2] = x;
                x = k[1]; k[1] = k[3]; k[3] = x;
                x = sp; sp = dp; dp = x;
            }
        }
        k[4] = ((uint64_t)ipver[i] << 56) | ((uint64_t)proto[i] << 48) | (vl << 32) | (sp << 16) | dp;
        pk->rev = rv;
        pk->t = ts[i];
        if (ts[i] > tmax) tmax = ts[i];
        int64_t l = iplen[i] > 0 ? iplen[i] : 0;
        pk->ln = l;
        octsum += (uint64_t)l;
        pk->fl = proto[i] == PROTO_TCP ? tcpf[i] : 0;
        pk->tos = tosv[i];
        q++;
    }
#undef BYTE_AT
    m->st_packets += (uint64_t)mm;
    if (!m->have_now || tmax > m->now) { m->now = tmax; m->have_now = 1; }

    /* ---- group: hash order (44-bit hash, arrival order inside), exact order on collision */
    int32_t *order = m->order;
    int exact = mm >= ((Py_ssize_t)1 << IDX_BITS);
    int32_t *gstart = m->gstart, *gslot = m->gslot;
    Py_ssize_t G = 0;
    if (!exact) {
        const uint64_t *hc = m->hc;
        for (Py_ssize_t i = 0; i < mm; i++) {
            const uint64_t *k = P[i].k;
            uint64_t h = k[0] * hc[0] ^ k[1] * hc[1] ^ k[2] * hc[2] ^ k[3] * hc[3] ^ k[4] * hc[4];
            h ^= h >> 31;
            h *= hc[4];
            h ^= h >> 29;
            m->comp[i] = (h & ~(((uint64_t)1 << IDX_BITS) - 1)) | (uint64_t)i;
        }
        radix_sort(m->comp, m->comp2, mm);
        for (Py_ssize_t i = 0; i < mm; i++)
            Q[i] = P[m->comp[i] & (((uint64_t)1 << IDX_BITS) - 1)];
        /* a hash group must hold one key, else two keys share the hash: exact order */
        for (Py_ssize_t i = 0; i < mm; i++) {
            if (i == 0 || (m->comp[i] >> IDX_BITS) != (m->comp[i - 1] >> IDX_BITS))
                gstart[G++] = (int32_t)i;
            else if (memcmp(Q[i].k, Q[i - 1].k, 40)) {
                exact = 1;
                m->st_fallbacks++;
                break;
            }
        }
    }
    if (exact) {
        for (Py_ssize_t i = 0; i < mm; i++) order[i] = (int32_t)i;
        g_pkts = P;
        qsort(order, (size_t)mm, sizeof(int32_t), cmp_exact);
        G = 0;
        for (Py_ssize_t i = 0; i < mm; i++) {
            Q[i] = P[order[i]];
            if (i == 0 || memcmp(Q[i].k, Q[i - 1].k, 40))
                gstart[G++] = (int32_t)i;
        }
    }
    gstart[G] = (int32_t)mm;

    /* ---- phase A: table flows whose deadline passed before the group's first packet.
     * Each group's lookup is two dependent cache misses (the index, then the flow's key) on
     * tables of megabytes, and the groups' lookups are independent: both are requested from
     * memory ahead (the index LOOKAHEAD groups ahead, the flow half that), so they overlap. */
    enum { LOOKAHEAD = 16 };
    uint64_t *home = m->comp2;   /* the radix sort's scratch, free again: index positions */
    for (Py_ssize_t g = 0; g < G; g++)
        home[g] = key_hash(Q[gstart[g]].k) & m->htmask;
    for (Py_ssize_t g = 0; g < G; g++) {
        if (g + LOOKAHEAD < G)
            __builtin_prefetch(&m->ht[home[g + LOOKAHEAD]]);
        if (g + LOOKAHEAD / 2 < G) {
            int32_t ahead = m->ht[home[g + LOOKAHEAD / 2]];
            if (ahead >= 0) {   /* the 40-byte key may span two cache lines */
                __builtin_prefetch(m->tab[ahead].k);
                __builtin_prefetch((const char *)m->tab[ahead].k + sizeof m->tab[ahead].k - 1);
            }
        }
        const Pkt *f0 = &Q[gstart[g]];
        Py_ssize_t s = ht_find(m, f0->k, home[g]);
        gslot[g] = (int32_t)s;
        if (s >= 0) {
            Flow *f = &m->tab[s];
            int r = reason_of(f->fin, f->end, f->start, f0->t,
                              m->idle_us, m->end_us, m->active_us);
            if (r) {
                if (seg_push(expA, NULL, s, r) < 0) goto done;
                gslot[g] = -1;
            }
        }
    }
    static const int merge_order[3] = {END_ACTIVE, END_IDLE, END_DETECTED};
    for (int ro = 0; ro < 3; ro++)
        for (Py_ssize_t i = 0; i < expA->n; i++)
            if (expA->v[i].reason == merge_order[ro])
                if (expire_slot(m, expA->v[i].slot, expA->v[i].reason) < 0) goto done;

    /* candidates gate of the reference: t >= t_min + active (or a FIN-possible gap) */
    int64_t t_min = INT64_MAX;
    int possible_fin = 0;
    for (Py_ssize_t i = 0; i < mm; i++) {
        if (P[i].t < t_min) t_min = P[i].t;
        if (P[i].fl & (TCP_FIN | TCP_RST)) possible_fin = 1;
    }
    for (Py_ssize_t g = 0; g < G; g++) {
        if (gslot[g] >= 0) {
            Flow *f = &m->tab[gslot[g]];
            if (f->start < t_min) t_min = f->start;
            if (f->fin) possible_fin = 1;
        }
    }
    /* the reference computes t_min + active in Python integers: no wrap-around */
    int gate_never = t_min > INT64_MAX - m->active_us;
    int64_t act_gate = gate_never ? INT64_MAX : t_min + m->active_us;

    /* ---- walk each group: segments */
    for (Py_ssize_t g = 0; g < G; g++) {
        Py_ssize_t a = gstart[g], b = gstart[g + 1];
        Py_ssize_t slot = gslot[g];
        int prior = slot >= 0;
        int first_of_prior = prior;
        const uint64_t *k = Q[a].k;
        int64_t t0;
        int finseen;
        Flow seg;
        uint8_t init;
        if (prior) {
            t0 = m->tab[slot].start;
            finseen = m->tab[slot].fin;
            init = m->tab[slot].init_rev;
        } else {
            t0 = Q[a].t;
            finseen = 0;
            init = Q[a].rev;
        }
#define SEG_OPEN(pk) do { memset(&seg, 0, sizeof seg); memcpy(seg.k, k, 40); \
        seg.start = (pk)->t; seg.end = (pk)->t; seg.tos = (pk)->tos; seg.init_rev = init; } while (0)
        SEG_OPEN(&Q[a]);
        for (Py_ssize_t pos = a; pos < b; pos++) {
            const Pkt *p = &Q[pos];
            if (pos > a) {
                const Pkt *pp = p - 1;
                int64_t gap = wsub(p->t, pp->t);
                int split = gap > m->idle_us;
                if (!split) {
                    int A2 = wsub(p->t, t0) >= m->active_us;
                    int A1 = !gate_never && p->t >= act_gate;
                    int F1 = possible_fin && gap > m->end_us;
                    int F2 = finseen && gap > m->end_us;
                    split = F2 || (A2 && (A1 || F1));
                }
                if (split) {
                    int r = reason_of(finseen, pp->t, t0, p->t,
                                      m->idle_us, m->end_us, m->active_us);
                    if (!r) r = END_ACTIVE;
                    seg.fin = ((seg.flags | seg.rflags) & (TCP_FIN | TCP_RST)) != 0;
                    if (first_of_prior) {
                        merge_segment(&m->tab[slot], &seg);
                        if (seg_push(segB, NULL, slot, r) < 0) goto done;
                    } else {
                        if (seg_push(segC, &seg, -1, r) < 0) goto done;
                    }
                    first_of_prior = 0;
                    t0 = p->t;
                    finseen = 0;
                    init = p->rev;
                    SEG_OPEN(p);
                }
            }
            int64_t tp = p->t;
            if (tp < seg.start) seg.start = tp;
            if (tp > seg.end) seg.end = tp;
            if (p->rev == init) {
                seg.packets++;
                seg.octets += (uint64_t)p->ln;
                seg.flags |= p->fl;
            } else {
                seg.rpackets++;
                seg.roctets += (uint64_t)p->ln;
                seg.rflags |= p->fl;
            }
            if (p->fl & (TCP_FIN | TCP_RST)) finseen = 1;
        }
#undef SEG_OPEN
        seg.fin = ((seg.flags | seg.rflags) & (TCP_FIN | TCP_RST)) != 0;
        if (first_of_prior) {
            merge_segment(&m->tab[slot], &seg);
        } else {
            if (seg_push(segD, &seg, -1, 0) < 0) goto done;
        }
    }
    /* ---- phase B: continued table flows that ended inside the batch */
    for (int ro = 0; ro < 3; ro++)
        for (Py_ssize_t i = 0; i < segB->n; i++)
            if (segB->v[i].reason == merge_order[ro])
                if (expire_slot(m, segB->v[i].slot, segB->v[i].reason) < 0) goto done;
    /* ---- phase C: segments closed inside the batch */
    if (out_reserve(m, segC->n) < 0) goto done;
    for (Py_ssize_t i = 0; i < segC->n; i++)
        if (emit(m, &segC->v[i].f, segC->v[i].reason) < 0) goto done;
    /* ---- phase D: open segments start new flows; slots from the top of the free stack */
    if (segD->n) {
        Py_ssize_t nd = segD->n;
        if (free_count(m) < nd && grow(m, nd - free_count(m)) < 0) goto done;
        Py_ssize_t new_virgin = m->virgin + (nd > m->nexp ? nd - m->nexp : 0);
        if (new_virgin > m->fcap) {         /* room to free every slot ever used */
            Py_ssize_t fc = m->fcap * 2 > new_virgin ? m->fcap * 2 : new_virgin;
            if (fc > m->cap) fc = m->cap;
            int32_t *fs = PyMem_Realloc(m->fstack, (size_t)fc * sizeof(int32_t));
            if (!fs) { PyErr_NoMemory(); goto done; }
            m->fstack = fs;
            m->fcap = fc;
        }
        Py_ssize_t base = free_count(m) - nd;
        for (Py_ssize_t i = 0; i < nd; i++) {
            Py_ssize_t s = free_at(m, base + i);
            m->tab[s] = segD->v[i].f;
            m->tab[s].used = 1;
            ht_put(m, s);
        }
        if (nd > m->nexp) { m->virgin = new_virgin; m->nexp = 0; }
        else m->nexp -= nd;
        m->nactive += nd;
    }
    if (enforce_bound(m) < 0) goto done;
    /* the batch's octets as numpy's int64 sum gives them (wrapped); the wrapper adds them
     * up in a Python int, as the reference does */
    ret = PyLong_FromLongLong((long long)(int64_t)octsum);
done:
    for (int i = 0; i < 16; i++) relbuf(&B[i]);
    return ret;
}

/* the reference's advance(): reasons of every flow at `now`, then expiry by reason
 * (end detected, idle, active), each in slot order */
static int scan(Meter *m, int64_t now)
{
    static const int adv_order[3] = {END_DETECTED, END_IDLE, END_ACTIVE};
    Py_ssize_t cnt[6] = {0};
    Py_ssize_t nexp = 0;
    int32_t *exp = NULL;
    for (Py_ssize_t s = 0; s < m->virgin; s++) {
        Flow *f = &m->tab[s];
        if (!f->used) continue;
        int r = reason_of(f->fin, f->end, f->start, now, m->idle_us, m->end_us, m->active_us);
        if (r) {
            if (!exp) {
                exp = PyMem_Malloc((size_t)m->nactive * 2 * sizeof(int32_t));
                if (!exp) { PyErr_NoMemory(); return -1; }
            }
            exp[2 * nexp] = (int32_t)s;
            exp[2 * nexp + 1] = r;
            nexp++;
            cnt[r]++;
        }
    }
    if (nexp && out_reserve(m, nexp) < 0) { PyMem_Free(exp); return -1; }
    for (int ro = 0; ro < 3 && nexp; ro++) {
        if (!cnt[adv_order[ro]]) continue;
        for (Py_ssize_t i = 0; i < nexp; i++)
            if (exp[2 * i + 1] == adv_order[ro])
                if (expire_slot(m, exp[2 * i], adv_order[ro]) < 0) { PyMem_Free(exp); return -1; }
    }
    PyMem_Free(exp);
    return 0;
}

static int advance(Meter *m, int64_t now)
{
    if (!m->have_now || now > m->now) { m->now = now; m->have_now = 1; }
    if (m->have_scan && now < m->next_scan) return 0;
    m->next_scan = wadd(now, m->scan_us);
    m->have_scan = 1;
    if (m->nactive == 0) return 0;
    return scan(m, now);
}

static PyObject *Meter_advance(Meter *m, PyObject *arg)
{
    long long now = PyLong_AsLongLong(arg);
    if (now == -1 && PyErr_Occurred()) return NULL;
    if (!m->tab) { PyErr_SetString(PyExc_RuntimeError, "not initialized"); return NULL; }
    m->flush_phase = 0;
    if (advance(m, now) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Meter_flush(Meter *m, PyObject *Py_UNUSED(ignored))
{
    if (!m->tab) { PyErr_SetString(PyExc_RuntimeError, "not initialized"); return NULL; }
    m->flush_phase = 0;
    if (m->have_now) {
        m->have_scan = 0;
        if (advance(m, m->now) < 0) return NULL;
    }
    if (out_reserve(m, m->nactive) < 0) return NULL;
    for (Py_ssize_t s = 0; s < m->virgin; s++)
        if (m->tab[s].used && m->tab[s].fin)
            if (expire_slot(m, s, END_DETECTED) < 0) return NULL;
    for (Py_ssize_t s = 0; s < m->virgin; s++)
        if (m->tab[s].used)
            if (expire_slot(m, s, END_FORCED) < 0) return NULL;
    Py_RETURN_NONE;
}

/* flush() in parts of at most `max` records (the first part may hold more: the flows the
 * scan at the latest packet time expires); True when the table is empty.  The records and
 * their order are flush()'s.  Any add() or advance() in between starts a new flush. */
static PyObject *Meter_flush_part(Meter *m, PyObject *arg)
{
    Py_ssize_t max = PyLong_AsSsize_t(arg);
    if (max == -1 && PyErr_Occurred()) return NULL;
    if (max < 1) { PyErr_SetString(PyExc_ValueError, "max must be at least 1"); return NULL; }
    if (!m->tab) { PyErr_SetString(PyExc_RuntimeError, "not initialized"); return NULL; }
    Py_ssize_t start = m->nout;
    if (m->flush_phase == 0) {
        if (m->have_now) {
            m->have_scan = 0;
            if (advance(m, m->now) < 0) return NULL;
        }
        m->flush_phase = 1;
        m->flush_pos = 0;
    }
    while (m->flush_phase) {
        if (m->nout - start >= max) Py_RETURN_FALSE;
        if (m->flush_pos >= m->virgin) {
            m->flush_pos = 0;
            if (++m->flush_phase == 3) { m->flush_phase = 0; break; }
            continue;
        }
        Flow *f = &m->tab[m->flush_pos];
        if (f->used && (m->flush_phase == 2 || f->fin))
            if (expire_slot(m, m->flush_pos, m->flush_phase == 1 ? END_DETECTED : END_FORCED) < 0)
                return NULL;
        m->flush_pos++;
    }
    Py_RETURN_TRUE;
}

static PyObject *Meter_take(Meter *m, PyObject *Py_UNUSED(ignored))
{
    if (!m->out || m->nout == 0)
        return PyByteArray_FromStringAndSize(NULL, 0);
    PyObject *b = m->out;
    if (PyByteArray_Resize(b, m->nout * REC_SIZE) < 0) return NULL;
    m->out = NULL;                      /* the next emit starts a new one */
    m->nout = 0;
    m->outcap = 0;
    return b;
}

static PyObject *Meter_stats(Meter *m, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(KKKKKK)", (unsigned long long)m->st_packets, 0ULL, (unsigned long long)m->st_non_ip,
                         (unsigned long long)m->st_records, (unsigned long long)m->st_forced,
                         (unsigned long long)m->st_fallbacks);
}

static PyObject *Meter_active(Meter *m, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(m->nactive);
}

static PyObject *Meter_capacity(Meter *m, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(m->cap);
}

static PyMethodDef Meter_methods[] = {
    {"add", (PyCFunction)Meter_add, METH_VARARGS, "meter one batch"},
    {"advance", (PyCFunction)Meter_advance, METH_O, "packet time moved on (us)"},
    {"flush", (PyCFunction)Meter_flush, METH_NOARGS, "expire every flow"},
    {"flush_part", (PyCFunction)Meter_flush_part, METH_O, "flush in parts: True when done"},
    {"take", (PyCFunction)Meter_take, METH_NOARGS, "expired records as a bytearray"},
    {"stats", (PyCFunction)Meter_stats, METH_NOARGS,
     "(packets, 0 (octets: the wrapper sums add()'s returns), non_ip, records, forced_expiries, hash_fallbacks)"},
    {"active", (PyCFunction)Meter_active, METH_NOARGS, "flows in the table"},
    {"capacity", (PyCFunction)Meter_capacity, METH_NOARGS, "table slots"},
    {NULL, NULL, 0, NULL}
};

static PyTypeObject MeterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "capture_daemon._accel_flows.Meter",
    .tp_basicsize = sizeof(Meter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Meter_init,
    .tp_dealloc = (destructor)Meter_dealloc,
    .tp_methods = Meter_methods,
    .tp_doc = "flow table and per-packet metering (see flows.CFlowMeter)",
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "_accel_flows", "C flow meter (reference: flows.NumpyFlowMeter)", -1,
    NULL, NULL, NULL, NULL, NULL
};

PyMODINIT_FUNC PyInit__accel_flows(void)
{
    if (PyType_Ready(&MeterType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&moddef);
    if (!mod) return NULL;
    Py_INCREF(&MeterType);
    if (PyModule_AddObject(mod, "Meter", (PyObject *)&MeterType) < 0) {
        Py_DECREF(&MeterType);
        Py_DECREF(mod);
        return NULL;
    }
    PyModule_AddIntConstant(mod, "RECORD_SIZE", REC_SIZE);
    return mod;
}
