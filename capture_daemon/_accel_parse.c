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
 * Semantics are parse.parse_numpy's, field by field; each packet is read by _parse_packet.h
 * (shared with _accel_anon.c), which never reads outside the packet or the buffer.
 * Only the CPython C API and the buffer protocol: no numpy headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_parse_packet.h"

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

/* Parse packets 0..n-1 (the per-packet step is _parse_packet.h's). Returns 0, or -1 (nothing
 * reliable written) when a packet lies outside buf. */
static int parse_all(const uint8_t *buf, int64_t buflen, const int64_t *offs, const int64_t *caplens,
                     const int64_t *wirelens, Py_ssize_t n, long lt, const Out *out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PpHeaders h;
        if (pp_parse(buf, buflen, offs[i], caplens[i], wirelens[i], lt, &h, out->src6 + (size_t)i * 16,
                     out->dst6 + (size_t)i * 16) < 0)
            return -1;
        out->ethertype[i] = (uint16_t)h.ethertype;
        out->l3[i] = h.l3;
        out->ipver[i] = (uint8_t)h.ipver;
        out->vlan[i] = h.vlan;
        out->proto[i] = (uint8_t)h.proto;
        out->l4[i] = h.l4;
        out->frag_later[i] = (uint8_t)h.frag_later;
        out->sport[i] = (uint16_t)h.sport;
        out->dport[i] = (uint16_t)h.dport;
        out->tcpflags[i] = (uint8_t)h.tcpflags;
        out->tos[i] = (uint8_t)h.tos;
        out->iplen[i] = h.iplen;
        out->src4[i] = h.src4;
        out->dst4[i] = h.dst4;
        out->malformed[i] = (uint8_t)h.malformed;
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
    if (!pp_supported_linktype(lt))
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
