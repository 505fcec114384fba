/* C accelerator of capture_daemon.parse.parse: one pass over the packets of a batch.
 *
 * parse(buf, off, caplen, wirelen, linktype, outs) -> bool
 *
 *   buf                      uint8 buffer (the batch's packets; any layout, offsets are absolute)
 *   off, caplen, wirelen     int64 buffers, n entries each
 *   linktype                 int (a DLT_* value parse.py supports)
 *   outs                     tuple of the 17 output buffers, in Headers field order, allocated by
 *                            the caller (np.empty) with Headers' dtypes; every entry is written.
 *
 * Returns True when done; False, with the outputs undefined, when the batch is one this code
 * does not take (unsupported link type, a packet outside buf): the caller then runs the numpy
 * reference, which gives the reference's answer (or exception) for it.
 *
 * Semantics are parse.parse_numpy's, field by field. Every byte read is inside its packet
 * (off <= pos, pos + width <= off + caplen) and the packet inside buf (checked per packet
 * before anything is read), so hostile packets cannot make it read out of bounds.
 * Only the CPython C API and the buffer protocol: no numpy headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum {
    DLT_NULL = 0, DLT_EN10MB = 1, DLT_RAW_BSD = 12, DLT_RAW_OBSD = 14, LINKTYPE_RAW = 101,
    DLT_LOOP = 108, DLT_LINUX_SLL = 113, DLT_IPV4 = 228, DLT_IPV6 = 229, DLT_LINUX_SLL2 = 276,
};
enum { ETH_IPV4 = 0x0800, ETH_IPV6 = 0x86DD, ETH_ARP = 0x0806 };
enum { MAX_VLAN_TAGS = 4, MAX_IPV6_EXT_HEADERS = 8 };

enum {
    F_ETHERTYPE, F_L3, F_IPVER, F_VLAN, F_PROTO, F_L4, F_FRAG_LATER, F_SPORT, F_DPORT, F_TCPFLAGS,
    F_TOS, F_IPLEN, F_SRC4, F_DST4, F_SRC6, F_DST6, F_MALFORMED, N_FIELDS
};
/* item size and element count per packet of each output */
static const Py_ssize_t FIELD_ITEMSIZE[N_FIELDS] = {2, 8, 1, 4, 1, 8, 1, 2, 2, 1, 1, 8, 4, 4, 1, 1, 1};
static const Py_ssize_t FIELD_PER_PACKET[N_FIELDS] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 16, 16, 1};
/* struct format characters accepted for each (numpy exports int64 as 'l', bool as '?') */
static const char *FIELD_FORMATS[N_FIELDS] = {
    "H", "lq", "B", "i", "B", "lq", "?", "H", "H", "B", "B", "lq", "I", "I", "B", "B", "?"};

typedef struct {
    uint16_t *ethertype;
    int64_t *l3;
    uint8_t *ipver;
    int32_t *vlan;
    uint8_t *proto;
    int64_t *l4;
    uint8_t *frag_later;
    uint16_t *sport, *dport;
    uint8_t *tcpflags, *tos;
    int64_t *iplen;
    uint32_t *src4, *dst4;
    uint8_t *src6, *dst6;
    uint8_t *malformed;
} Out;

/* int64 addition/subtraction that wraps like numpy's instead of being undefined */
static inline int64_t wadd(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }
static inline int64_t wsub(int64_t a, int64_t b) { return (int64_t)((uint64_t)a - (uint64_t)b); }

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}
static inline int is_vlan_tpid(unsigned et) { return et == 0x8100 || et == 0x88A8 || et == 0x9100; }
static inline int is_ipv6_ext(unsigned nh) {
    return nh == 0 || nh == 43 || nh == 60 || nh == 44 || nh == 51 || nh == 135;
}
static inline int is_port_proto(unsigned p) { return p == 6 || p == 17 || p == 132 || p == 136; }

static int supported_linktype(long lt) {
    switch (lt) {
    case DLT_NULL: case DLT_EN10MB: case DLT_RAW_BSD: case DLT_RAW_OBSD: case LINKTYPE_RAW:
    case DLT_LOOP: case DLT_LINUX_SLL: case DLT_IPV4: case DLT_IPV6: case DLT_LINUX_SLL2:
        return 1;
    default:
        return 0;
    }
}

/* Parse packets 0..n-1. Returns 0, or -1 (nothing reliable written) when a packet lies
 * outside buf. */
static int parse_all(const uint8_t *buf, int64_t buflen, const int64_t *offs, const int64_t *caplens,
                     const int64_t *wirelens, Py_ssize_t n, long lt, const Out *out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const int64_t o = offs[i], c = caplens[i], w = wirelens[i];
        /* The packet must lie inside buf. A negative caplen is harmless (nothing is ever in
         * range then), but o itself must be sane so that o + small constants cannot wrap. */
        if (o < 0 || o > buflen || c > buflen - o)
            return -1;
        const int64_t e = o + c; /* no overflow: o >= 0 and c <= buflen - o */
        /* pos..pos+width-1 captured (pos >= o >= 0 and pos + width <= e <= buflen) */
#define OK(pos, width) ((pos) >= o && (pos) <= e - (width))
        int32_t vlan = -1;
        unsigned et;
        int64_t l3;
        int short_link;

        switch (lt) {
        case DLT_EN10MB:
        case DLT_LINUX_SLL: {
            int64_t pos = o + (lt == DLT_EN10MB ? 12 : 14);
            short_link = !OK(pos, 2);
            et = short_link ? 0 : be16(buf + pos);
            pos += 2;
            for (int k = 0; k < MAX_VLAN_TAGS; k++) {
                if (!(is_vlan_tpid(et) && OK(pos, 4)))
                    break;
                if (vlan < 0)
                    vlan = (int32_t)(be16(buf + pos) & 0x0FFF);
                et = be16(buf + pos + 2);
                pos += 4;
            }
            l3 = pos;
            break;
        }
        case DLT_LINUX_SLL2:
            et = OK(o, 2) ? be16(buf + o) : 0;
            l3 = o + 20;
            short_link = !OK(o, 20);
            break;
        case DLT_NULL:
        case DLT_LOOP: {
            uint32_t raw = OK(o, 4) ? be32(buf + o) : 0;
            if (lt == DLT_NULL && raw > 0xFFFF) /* host byte order of the capturing machine */
                raw = ((raw & 0xFFu) << 24) | ((raw & 0xFF00u) << 8) | ((raw >> 8) & 0xFF00u) | (raw >> 24);
            et = raw == 2 ? ETH_IPV4 : (raw == 10 || raw == 24 || raw == 28 || raw == 30) ? ETH_IPV6 : 0;
            l3 = o + 4;
            short_link = !OK(o, 4);
            break;
        }
        default: { /* the raw IP link types */
            unsigned version = OK(o, 1) ? (unsigned)(buf[o] >> 4) : 0;
            et = version == 4 ? ETH_IPV4 : version == 6 ? ETH_IPV6 : 0;
            l3 = o;
            short_link = 0;
            break;
        }
        }
        int malformed = short_link && w > 0;

        const int et4 = et == ETH_IPV4, et6 = et == ETH_IPV6;
        const int ip_claimed = et4 || et6;
        const unsigned first = OK(l3, 1) ? buf[l3] : 0; /* only used where l3 is captured */
        const unsigned version = first >> 4;
        if (ip_claimed && OK(l3, 1) && ((et4 && version != 4) || (et6 && version != 6)))
            malformed = 1;
        const int64_t wire_end = wadd(o, w);
        if ((et4 && wadd(l3, 20) > wire_end) || (et6 && wadd(l3, 40) > wire_end))
            malformed = 1;
        int is4 = et4 && OK(l3, 20) && version == 4;
        const int is6 = et6 && OK(l3, 40) && version == 6;

        unsigned proto = 0, tos = 0;
        int frag_later = 0;
        uint32_t src4 = 0, dst4 = 0;
        int64_t l4 = -1, iplen = 0;
        if (is4) {
            const int64_t ihl = (int64_t)(first & 0x0F) * 4;
            const int64_t total4 = be16(buf + l3 + 2);
            if (ihl < 20 || total4 < ihl) {
                malformed = 1;
                is4 = 0;
            } else {
                frag_later = (be16(buf + l3 + 6) & 0x1FFF) != 0;
                proto = buf[l3 + 9];
                tos = buf[l3 + 1];
                src4 = be32(buf + l3 + 12);
                dst4 = be32(buf + l3 + 16);
                if (!frag_later)
                    l4 = l3 + ihl;
                iplen = total4;
            }
        }
        uint8_t *s6 = out->src6 + (size_t)i * 16, *d6 = out->dst6 + (size_t)i * 16;
        if (is6) {
            memcpy(s6, buf + l3 + 8, 16);
            memcpy(d6, buf + l3 + 24, 16);
            tos = (unsigned)((be16(buf + l3) >> 4) & 0xFF);
            const int64_t plen6 = be16(buf + l3 + 4);
            iplen = plen6 == 0 ? wsub(w, l3 - o) : plen6 + 40;
            unsigned nh = buf[l3 + 6];
            int64_t pos = l3 + 40;
            for (int k = 0; k < MAX_IPV6_EXT_HEADERS; k++) {
                if (!is_ipv6_ext(nh) || !OK(pos, 8))
                    break; /* an unreadable header stays the final protocol, l4 points at it */
                const unsigned nxt = buf[pos];
                const int64_t hlen_byte = buf[pos + 1];
                int later = 0;
                int64_t hlen;
                if (nh == 44) {
                    later = (be16(buf + pos + 2) >> 3) != 0;
                    hlen = 8;
                } else if (nh == 51) {
                    hlen = (hlen_byte + 2) * 4;
                } else {
                    hlen = (hlen_byte + 1) * 8;
                }
                frag_later |= later;
                nh = nxt;
                pos += hlen;
                if (later)
                    break;
            }
            proto = nh;
            l4 = frag_later ? -1 : pos;
        } else {
            memset(s6, 0, 16);
            memset(d6, 0, 16);
        }
        /* Where the L4 header does not start inside the capture, there is none to look at. */
        if (!OK(l4, 1))
            l4 = -1;
        unsigned sport = 0, dport = 0, tcpflags = 0;
        if (l4 >= 0) {
            if (is_port_proto(proto) && OK(l4, 4)) {
                sport = be16(buf + l4);
                dport = be16(buf + l4 + 2);
            }
            if (((proto == 1 && is4) || (proto == 58 && is6)) && OK(l4, 2))
                dport = be16(buf + l4);
            if (proto == 6 && OK(l4, 14))
                tcpflags = buf[l4 + 13];
        }
#undef OK
        out->ethertype[i] = (uint16_t)et;
        out->l3[i] = (ip_claimed || et == ETH_ARP) ? l3 : -1;
        out->ipver[i] = is4 ? 4 : is6 ? 6 : 0;
        out->vlan[i] = vlan;
        out->proto[i] = (uint8_t)proto;
        out->l4[i] = l4;
        out->frag_later[i] = (uint8_t)frag_later;
        out->sport[i] = (uint16_t)sport;
        out->dport[i] = (uint16_t)dport;
        out->tcpflags[i] = (uint8_t)tcpflags;
        out->tos[i] = (uint8_t)tos;
        out->iplen[i] = iplen;
        out->src4[i] = src4;
        out->dst4[i] = dst4;
        out->malformed[i] = (uint8_t)malformed;
    }
    return 0;
}

static int format_ok(const Py_buffer *v, const char *accepted) {
    const char *f = v->format ? v->format : "B";
    if (*f == '@' || *f == '=' || *f == '<')
        f++;
    return f[0] != '\0' && f[1] == '\0' && strchr(accepted, f[0]) != NULL;
}

/* A C-contiguous buffer of `count` items of `itemsize` bytes in one of the given formats. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize, Py_ssize_t count,
                      const char *formats, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->itemsize != itemsize || !format_ok(view, formats) ||
        (count >= 0 && view->len != itemsize * count)) {
        PyErr_Format(PyExc_ValueError, "%s: wrong item type or length", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *py_parse(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_buf, *o_off, *o_cap, *o_wire, *outs;
    long lt;
    if (!PyArg_ParseTuple(args, "OOOOlO!:parse", &o_buf, &o_off, &o_cap, &o_wire, &lt, &PyTuple_Type, &outs))
        return NULL;
    if (PyTuple_GET_SIZE(outs) != N_FIELDS) {
        PyErr_Format(PyExc_ValueError, "parse: expected %d output buffers", (int)N_FIELDS);
        return NULL;
    }
    if (!supported_linktype(lt))
        Py_RETURN_FALSE;

    Py_buffer vbuf, voff, vcap, vwire, vout[N_FIELDS];
    int nout = 0, ninp = 0;
    PyObject *result = NULL;
    if (get_buffer(o_buf, &vbuf, 0, 1, -1, "Bb", "buf") < 0)
        goto done;
    ninp++;
    if (get_buffer(o_off, &voff, 0, 8, -1, "lq", "off") < 0)
        goto done;
    ninp++;
    const Py_ssize_t n = voff.len / 8;
    if (get_buffer(o_cap, &vcap, 0, 8, n, "lq", "caplen") < 0)
        goto done;
    ninp++;
    if (get_buffer(o_wire, &vwire, 0, 8, n, "lq", "wirelen") < 0)
        goto done;
    ninp++;
    for (; nout < N_FIELDS; nout++) {
        if (get_buffer(PyTuple_GET_ITEM(outs, nout), &vout[nout], 1, FIELD_ITEMSIZE[nout],
                       n * FIELD_PER_PACKET[nout], FIELD_FORMATS[nout], "output") < 0)
            goto done;
    }
    Out out = {
        .ethertype = vout[F_ETHERTYPE].buf, .l3 = vout[F_L3].buf, .ipver = vout[F_IPVER].buf,
        .vlan = vout[F_VLAN].buf, .proto = vout[F_PROTO].buf, .l4 = vout[F_L4].buf,
        .frag_later = vout[F_FRAG_LATER].buf, .sport = vout[F_SPORT].buf, .dport = vout[F_DPORT].buf,
        .tcpflags = vout[F_TCPFLAGS].buf, .tos = vout[F_TOS].buf, .iplen = vout[F_IPLEN].buf,
        .src4 = vout[F_SRC4].buf, .dst4 = vout[F_DST4].buf, .src6 = vout[F_SRC6].buf,
        .dst6 = vout[F_DST6].buf, .malformed = vout[F_MALFORMED].buf,
    };
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = parse_all(vbuf.buf, (int64_t)vbuf.len, voff.buf, vcap.buf, vwire.buf, n, lt, &out);
    Py_END_ALLOW_THREADS
    result = rc == 0 ? Py_True : Py_False;
    Py_INCREF(result);
done:
    while (nout > 0)
        PyBuffer_Release(&vout[--nout]);
    if (ninp > 3) PyBuffer_Release(&vwire);
    if (ninp > 2) PyBuffer_Release(&vcap);
    if (ninp > 1) PyBuffer_Release(&voff);
    if (ninp > 0) PyBuffer_Release(&vbuf);
    return result;
}

static PyMethodDef methods[] = {
    {"parse", py_parse, METH_VARARGS,
     "parse(buf, off, caplen, wirelen, linktype, outs) -> bool: fill the 17 Headers arrays in outs."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_accel_parse", "C accelerator of capture_daemon.parse.parse.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__accel_parse(void) { return PyModule_Create(&module); }
