/* Walk classic pcap savefile records in a buffer: the offline reader's inner loop.
 *
 * scan(buf, start, end, swap, nsec, max_caplen, off, caplen, wirelen, sec, usec)
 *   -> (n, pos, bad_caplen)
 *
 * buf: bytes-like holding records from offset `start` to `end`; off/caplen/wirelen/sec/usec:
 * writable int64 buffers, as many packets as they hold at most. Records are read while a whole
 * record (16-byte header + caplen bytes) lies before `end`. `off` gets the offset of each
 * packet's data (after its record header). swap: the file is big-endian; nsec: timestamps are
 * nanoseconds (converted to microseconds, floor). A caplen above max_caplen stops the walk and
 * is returned as bad_caplen (the file is corrupt; libpcap refuses it the same way); else
 * bad_caplen is -1. pos is where the first unread record starts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t rd32(const unsigned char *p, int swap)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return swap ? __builtin_bswap32(v) : v;
}

static int get_out(PyObject *obj, Py_buffer *view, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->itemsize != 8 || view->len % 8 != 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous int64 array", name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *scan(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *buf_obj, *outs[5];
    Py_ssize_t start, end;
    int swap, nsec;
    long long max_caplen;
    static const char *names[5] = {"off", "caplen", "wirelen", "sec", "usec"};
    if (!PyArg_ParseTuple(args, "OnnppLOOOOO", &buf_obj, &start, &end, &swap, &nsec, &max_caplen,
                          &outs[0], &outs[1], &outs[2], &outs[3], &outs[4]))
        return NULL;

    Py_buffer in, out[5];
    if (PyObject_GetBuffer(buf_obj, &in, PyBUF_SIMPLE) < 0)
        return NULL;
    int got = 0;
    for (; got < 5; got++)
        if (get_out(outs[got], &out[got], names[got]) < 0)
            break;
    PyObject *result = NULL;
    if (got < 5)
        goto done;
    if (start < 0 || end < start || end > in.len) {
        PyErr_SetString(PyExc_ValueError, "start/end outside the buffer");
        goto done;
    }
    Py_ssize_t cap = out[0].len / 8;
    for (int i = 1; i < 5; i++)
        if (out[i].len / 8 < cap)
            cap = out[i].len / 8;

    const unsigned char *b = in.buf;
    int64_t *o_off = out[0].buf, *o_cap = out[1].buf, *o_wire = out[2].buf;
    int64_t *o_sec = out[3].buf, *o_usec = out[4].buf;
    Py_ssize_t pos = start, n = 0;
    long long bad = -1;
    while (n < cap && end - pos >= 16) {
        const unsigned char *h = b + pos;
        uint32_t incl = rd32(h + 8, swap);
        if ((long long)incl > max_caplen) {
            bad = incl;
            break;
        }
        if ((Py_ssize_t)incl > end - pos - 16)
            break;
        uint32_t frac = rd32(h + 4, swap);
        o_sec[n] = rd32(h, swap);
        o_usec[n] = nsec ? frac / 1000 : frac;
        o_cap[n] = incl;
        o_wire[n] = rd32(h + 12, swap);
        o_off[n] = pos + 16;
        pos += 16 + (Py_ssize_t)incl;
        n++;
    }
    result = Py_BuildValue("nnL", n, pos, bad);
done:
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&out[i]);
    PyBuffer_Release(&in);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "Walk pcap records: (n, next position, bad caplen or -1)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_accel_read", "pcap savefile record walker (gims capture path)", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__accel_read(void) { return PyModule_Create(&module); }
