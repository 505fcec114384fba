/* Live capture with libpcap's pcap_dispatch, packets written straight as pcap records.
 *
 * Why: pcapy-ng's next_batch copies every packet twice (into its buffer, then into a bytes
 * object) and does not return the wire length, so the live source had to join reads (a third
 * copy) and estimate wire lengths by parsing truncated packets again (docs/PERFORMANCE.md,
 * path 6). Here libpcap's callback appends each packet once, as a little-endian microsecond
 * pcap record (16-byte header with the real wire length, then the bytes), to a buffer the
 * caller owns: the batch is then exactly what a pcap writer writes (Batch(records=True), as
 * the offline reader's), and successive dispatch calls append to the same buffer, which is
 * how reads are coalesced without a join.
 *
 * Live(interface, snaplen, promisc, timeout_ms, buffer_bytes)  pcap_create ... pcap_activate,
 *     then non-blocking (see capture_daemon/source.py: the caller waits on getfd() itself).
 *     .warning: pcap_activate's warning text, or None.
 * setfilter(expr)               pcap_compile (optimized, netmask 0 as pcapy-ng) + pcap_setfilter
 * set_fanout(group, mode)       join a PACKET_FANOUT group (after the filter)
 * dispatch(buf, pos, n, off, caplen, wirelen, sec, usec) -> (n, pos, full, error)
 * stats() -> (ps_recv, ps_drop, ps_ifdrop); datalink(); getfd(); close()
 *     (the names and results of pcapy-ng's methods, so that LiveSource uses either alike)
 * lib_version() -> pcap_lib_version() of the libpcap this module links
 *
 * Errors of the set-up calls raise OSError with libpcap's own text. dispatch reports a read
 * error as a string instead of raising, so the caller still gets the packets appended before
 * it (they are in buf and counted in the returned n and pos).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pcap/pcap.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <linux/if_packet.h>

typedef struct {
    PyObject_HEAD
    pcap_t *p;
    int busy;               /* a dispatch runs without the GIL: close must not free p */
    /* The packet that did not fit the caller's buffer: kept here and written first into the
     * next buffer, so that a full batch never loses one (see on_packet). */
    unsigned char *spill;
    size_t spill_cap;
    int spilled;
    struct pcap_pkthdr spill_hdr;
    PyObject *warning;
} Live;

/* Where on_packet writes: the caller's buffer and arrays, filled from pos / n. */
struct fill {
    Live *live;
    unsigned char *buf;
    Py_ssize_t len, pos;
    int64_t *off, *caplen, *wirelen, *sec, *usec;
    Py_ssize_t n, max;
    int nomem, lost;
};

static inline void put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static int fits(const struct fill *f, bpf_u_int32 caplen)
{
    return f->n < f->max && (Py_ssize_t)caplen <= f->len - f->pos - 16;
}

/* Caller checked fits(). */
static void append(struct fill *f, const struct pcap_pkthdr *h, const u_char *bytes)
{
    unsigned char *rec = f->buf + f->pos;
    put_le32(rec, (uint32_t)h->ts.tv_sec);
    put_le32(rec + 4, (uint32_t)h->ts.tv_usec);
    put_le32(rec + 8, h->caplen);
    put_le32(rec + 12, h->len);
    memcpy(rec + 16, bytes, h->caplen);
    f->off[f->n] = f->pos + 16;
    f->caplen[f->n] = h->caplen;
    f->wirelen[f->n] = h->len;
    f->sec[f->n] = h->ts.tv_sec;
    f->usec[f->n] = h->ts.tv_usec;
    f->pos += 16 + (Py_ssize_t)h->caplen;
    f->n++;
}

/* pcap_dispatch's callback (GIL released: no Python API here). */
static void on_packet(u_char *user, const struct pcap_pkthdr *h, const u_char *bytes)
{
    struct fill *f = (struct fill *)user;
    Live *self = f->live;
    if (!self->spilled && fits(f, h->caplen)) {
        append(f, h, bytes);
        return;
    }
    /* No room: keep the packet and stop this dispatch. libpcap checks break_loop after every
     * packet (TPACKET_V3 and V2 readers alike) and resumes at the next one on the next call,
     * so at most one packet is ever kept here. */
    if (!self->spilled) {
        if (h->caplen > self->spill_cap) {
            unsigned char *bigger = realloc(self->spill, h->caplen);
            if (bigger == NULL) {
                f->nomem = 1;
                pcap_breakloop(self->p);
                return;
            }
            self->spill = bigger;
            self->spill_cap = h->caplen;
        }
        memcpy(self->spill, bytes, h->caplen);
        self->spill_hdr = *h;
        self->spilled = 1;
    } else {
        f->lost = 1;  /* a second packet after break_loop: libpcap did not stop (never seen) */
    }
    pcap_breakloop(self->p);
}

static PyObject *pcap_failure(pcap_t *p, int status)
{
    /* PCAP_ERROR's own text is "Generic error": libpcap's message says more */
    const char *detail = p ? pcap_geterr(p) : "";
    if (status == PCAP_ERROR && detail[0])
        return PyErr_Format(PyExc_OSError, "%s", detail);
    if (detail[0])
        return PyErr_Format(PyExc_OSError, "%s (%s)", pcap_statustostr(status), detail);
    return PyErr_Format(PyExc_OSError, "%s", pcap_statustostr(status));
}

/* The handle is open and no dispatch is running on it (libpcap's handles are not
 * thread-safe; dispatch runs without the GIL). */
static int need_open(Live *self)
{
    if (self->p == NULL) {
        PyErr_SetString(PyExc_ValueError, "capture handle is closed");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "capture handle in use by dispatch");
        return -1;
    }
    return 0;
}

static int Live_init(Live *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"interface", "snaplen", "promisc", "timeout_ms", "buffer_bytes", NULL};
    const char *iface;
    int snaplen, promisc, timeout_ms, buffer_bytes;
    char errbuf[PCAP_ERRBUF_SIZE] = "";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sipii", kwlist, &iface, &snaplen, &promisc,
                                     &timeout_ms, &buffer_bytes))
        return -1;
    if (self->p != NULL) {
        PyErr_SetString(PyExc_ValueError, "already open");
        return -1;
    }
    pcap_t *p = pcap_create(iface, errbuf);
    if (p == NULL) {
        PyErr_Format(PyExc_OSError, "%s", errbuf[0] ? errbuf : "pcap_create failed");
        return -1;
    }
    int status = pcap_set_snaplen(p, snaplen);
    if (status == 0)
        status = pcap_set_promisc(p, promisc);
    if (status == 0)
        status = pcap_set_timeout(p, timeout_ms);
    if (status == 0)
        status = pcap_set_buffer_size(p, buffer_bytes);
    if (status == 0)
        status = pcap_activate(p);
    if (status < 0) {
        pcap_failure(p, status);
        pcap_close(p);
        return -1;
    }
    Py_CLEAR(self->warning);
    if (status > 0) {  /* activated, with a warning (e.g. promiscuous mode not supported) */
        const char *detail = pcap_geterr(p);
        self->warning = detail[0] ? PyUnicode_FromFormat("%s (%s)", pcap_statustostr(status), detail)
                                  : PyUnicode_FromString(pcap_statustostr(status));
        if (self->warning == NULL) {
            pcap_close(p);
            return -1;
        }
    }
    /* With TPACKET_V3 a blocking read may wait forever while no packets come (the kernel
     * retires a block only when it holds packets): the caller waits on getfd() itself. */
    if (pcap_setnonblock(p, 1, errbuf) < 0) {
        PyErr_Format(PyExc_OSError, "%s", errbuf);
        pcap_close(p);
        return -1;
    }
    int snap = pcap_snapshot(p);
    self->spill_cap = snap > 0 ? (size_t)snap : 262144;
    self->spill = malloc(self->spill_cap);
    if (self->spill == NULL) {
        pcap_close(p);
        PyErr_NoMemory();
        return -1;
    }
    self->p = p;
    return 0;
}

static void Live_close_handle(Live *self)
{
    if (self->p != NULL) {
        pcap_close(self->p);
        self->p = NULL;
    }
    free(self->spill);
    self->spill = NULL;
    self->spill_cap = 0;
    self->spilled = 0;
}

static void Live_dealloc(Live *self)
{
    Live_close_handle(self);
    Py_CLEAR(self->warning);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Live_close(Live *self, PyObject *unused)
{
    (void)unused;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "close during dispatch");
        return NULL;
    }
    Live_close_handle(self);
    Py_RETURN_NONE;
}

static PyObject *Live_setfilter(Live *self, PyObject *args)
{
    const char *expr;
    if (!PyArg_ParseTuple(args, "s", &expr) || need_open(self) < 0)
        return NULL;
    struct bpf_program prog;
    if (pcap_compile(self->p, &prog, expr, 1, 0) < 0)
        return pcap_failure(self->p, PCAP_ERROR);
    int status = pcap_setfilter(self->p, &prog);
    pcap_freecode(&prog);
    if (status < 0)
        return pcap_failure(self->p, PCAP_ERROR);
    Py_RETURN_NONE;
}

/* PACKET_FANOUT: the same setsockopt as pcapy-ng's set_fanout (group id in the low 16 bits,
 * the mode in the high ones). */
static PyObject *Live_set_fanout(Live *self, PyObject *args)
{
    int group, mode;
    if (!PyArg_ParseTuple(args, "ii", &group, &mode) || need_open(self) < 0)
        return NULL;
    int fd = pcap_fileno(self->p);
    int arg = (group & 0xffff) | (mode << 16);
    if (fd < 0 || setsockopt(fd, SOL_PACKET, PACKET_FANOUT, &arg, sizeof arg) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static int get_array(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->itemsize != 8 || view->len % 8 != 0) {
        PyErr_SetString(PyExc_TypeError, "off/caplen/wirelen/sec/usec must be contiguous int64 arrays");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* dispatch(buf, pos, n, off, caplen, wirelen, sec, usec) -> (n, pos, full, error)
 *
 * Appends the packets libpcap has ready as records at buf[pos:], their fields at index n of
 * the arrays, without blocking. full: a packet did not fit (buf or the arrays are full); it is
 * kept and goes first into the next buffer. error: libpcap's message when the read failed
 * (the interface went down, ...), else None. */
static PyObject *Live_dispatch(Live *self, PyObject *args)
{
    PyObject *buf_obj, *arr_obj[5];
    Py_ssize_t pos, n;
    if (!PyArg_ParseTuple(args, "OnnOOOOO", &buf_obj, &pos, &n, &arr_obj[0], &arr_obj[1],
                          &arr_obj[2], &arr_obj[3], &arr_obj[4]) || need_open(self) < 0)
        return NULL;
    Py_buffer out, arr[5];
    if (PyObject_GetBuffer(buf_obj, &out, PyBUF_WRITABLE) < 0)
        return NULL;
    int got = 0;
    PyObject *result = NULL;
    for (; got < 5; got++)
        if (get_array(arr_obj[got], &arr[got]) < 0)
            goto done;
    Py_ssize_t max = arr[0].len / 8;
    for (int i = 1; i < 5; i++)
        if (arr[i].len / 8 < max)
            max = arr[i].len / 8;
    if (pos < 0 || pos > out.len || n < 0 || n > max) {
        PyErr_SetString(PyExc_ValueError, "pos/n outside the buffer or arrays");
        goto done;
    }
    struct fill f = {self, out.buf, out.len, pos, arr[0].buf, arr[1].buf, arr[2].buf,
                     arr[3].buf, arr[4].buf, n, max, 0, 0};
    if (self->spilled) {
        if (!fits(&f, self->spill_hdr.caplen)) {  /* not even into an empty batch: too small */
            if (n == 0) {
                PyErr_SetString(PyExc_ValueError, "buffer too small for one packet");
                goto done;
            }
            result = Py_BuildValue("nnOO", f.n, f.pos, Py_True, Py_None);
            goto done;
        }
        append(&f, &self->spill_hdr, self->spill);
        self->spilled = 0;
    }
    int status = 0;
    if (f.n < f.max) {
        /* at most as many packets as the arrays hold: only a full buffer can stop the read */
        int count = f.max - f.n > 1 << 30 ? 1 << 30 : (int)(f.max - f.n);
        self->busy = 1;
        Py_BEGIN_ALLOW_THREADS
        status = pcap_dispatch(self->p, count, on_packet, (u_char *)&f);
        Py_END_ALLOW_THREADS
        self->busy = 0;
    }
    if (f.nomem) {
        PyErr_SetString(PyExc_MemoryError, "no memory to keep a packet for the next batch");
        goto done;
    }
    if (f.lost) {
        PyErr_SetString(PyExc_RuntimeError, "libpcap went on after pcap_breakloop: a packet was lost");
        goto done;
    }
    PyObject *error = Py_None;
    if (status == PCAP_ERROR) {
        error = PyUnicode_FromString(pcap_geterr(self->p));
        if (error == NULL)
            goto done;
    } else {
        Py_INCREF(error);
    }
    result = Py_BuildValue("nnON", f.n, f.pos, self->spilled || f.n == f.max ? Py_True : Py_False,
                           error);
done:
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&arr[i]);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *Live_stats(Live *self, PyObject *unused)
{
    (void)unused;
    struct pcap_stat st;
    if (need_open(self) < 0)
        return NULL;
    if (pcap_stats(self->p, &st) < 0)
        return pcap_failure(self->p, PCAP_ERROR);
    return Py_BuildValue("kkk", (unsigned long)st.ps_recv, (unsigned long)st.ps_drop,
                         (unsigned long)st.ps_ifdrop);
}

static PyObject *Live_datalink(Live *self, PyObject *unused)
{
    (void)unused;
    return need_open(self) < 0 ? NULL : PyLong_FromLong(pcap_datalink(self->p));
}

static PyObject *Live_getfd(Live *self, PyObject *unused)
{
    (void)unused;
    return need_open(self) < 0 ? NULL : PyLong_FromLong(pcap_get_selectable_fd(self->p));
}

static PyObject *Live_get_warning(Live *self, void *closure)
{
    (void)closure;
    PyObject *w = self->warning ? self->warning : Py_None;
    Py_INCREF(w);
    return w;
}

static PyMethodDef Live_methods[] = {
    {"setfilter", (PyCFunction)Live_setfilter, METH_VARARGS, "Compile and set a BPF filter."},
    {"set_fanout", (PyCFunction)Live_set_fanout, METH_VARARGS, "Join a PACKET_FANOUT group (group, mode)."},
    {"dispatch", (PyCFunction)Live_dispatch, METH_VARARGS,
     "Append ready packets as pcap records: (n, pos, full, error)."},
    {"stats", (PyCFunction)Live_stats, METH_NOARGS, "(ps_recv, ps_drop, ps_ifdrop)"},
    {"datalink", (PyCFunction)Live_datalink, METH_NOARGS, "The link-layer type (DLT)."},
    {"getfd", (PyCFunction)Live_getfd, METH_NOARGS, "The descriptor to wait on."},
    {"close", (PyCFunction)Live_close, METH_NOARGS, "Close the capture (idempotent)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Live_getset[] = {
    {"warning", (getter)Live_get_warning, NULL, "pcap_activate's warning, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LiveType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "capture_daemon._accel_live.Live",
    .tp_basicsize = sizeof(Live),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A live libpcap capture read with pcap_dispatch into pcap records.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Live_init,
    .tp_dealloc = (destructor)Live_dealloc,
    .tp_methods = Live_methods,
    .tp_getset = Live_getset,
};

static PyObject *lib_version(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyUnicode_FromString(pcap_lib_version());
}

static PyMethodDef methods[] = {
    {"lib_version", lib_version, METH_NOARGS, "pcap_lib_version() of the linked libpcap."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_accel_live", "live capture into pcap records (gims capture path)", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__accel_live(void)
{
    if (PyType_Ready(&LiveType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&LiveType);
    if (PyModule_AddObject(m, "Live", (PyObject *)&LiveType) < 0
        || PyModule_AddIntConstant(m, "PACKET_FANOUT_HASH", PACKET_FANOUT_HASH) < 0) {
        Py_DECREF(&LiveType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
