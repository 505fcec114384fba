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

static inline void put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
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

/* records(buf, off, caplen, wirelen, sec, usec, out) -> bytes written
 *
 * The pcap records (little-endian 16-byte header, then the packet's bytes) of packets lying
 * anywhere in buf, back to back into out (a writable byte buffer of sum(16 + caplen) bytes).
 * Header fields are the low 32 bits of the int64 inputs, as numpy's astype("<u4") gives them.
 */
static PyObject *records(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *buf_obj, *arr_obj[5], *out_obj;
    if (!PyArg_ParseTuple(args, "OOOOOOO", &buf_obj, &arr_obj[0], &arr_obj[1], &arr_obj[2],
                          &arr_obj[3], &arr_obj[4], &out_obj))
        return NULL;
    Py_buffer in, out, arr[5];
    int got = 0, have_out = 0;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(buf_obj, &in, PyBUF_SIMPLE) < 0)
        return NULL;
    for (; got < 5; got++) {
        if (PyObject_GetBuffer(arr_obj[got], &arr[got], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
            goto done;
        if (arr[got].itemsize != 8 || arr[got].len % 8 != 0) {
            PyErr_SetString(PyExc_TypeError, "packet fields must be contiguous int64 arrays");
            got++;
            goto done;
        }
    }
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE) < 0)
        goto done;
    have_out = 1;
    Py_ssize_t n = arr[0].len / 8;
    for (int i = 1; i < 5; i++)
        if (arr[i].len / 8 != n) {
            PyErr_SetString(PyExc_ValueError, "packet field arrays differ in length");
            goto done;
        }
    const int64_t *off = arr[0].buf, *cap = arr[1].buf, *wire = arr[2].buf;
    const int64_t *sec = arr[3].buf, *usec = arr[4].buf;
    const unsigned char *src = in.buf;
    unsigned char *dst = out.buf;
    Py_ssize_t pos = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (off[i] < 0 || cap[i] < 0 || cap[i] > in.len - off[i]) {
            PyErr_Format(PyExc_ValueError, "packet %zd lies outside the buffer", i);
            goto done;
        }
        if (16 + cap[i] > out.len - pos) {
            PyErr_SetString(PyExc_ValueError, "output buffer too small");
            goto done;
        }
        put_le32(dst + pos, (uint32_t)sec[i]);
        put_le32(dst + pos + 4, (uint32_t)usec[i]);
        put_le32(dst + pos + 8, (uint32_t)cap[i]);
        put_le32(dst + pos + 12, (uint32_t)wire[i]);
        memcpy(dst + pos + 16, src + off[i], (size_t)cap[i]);
        pos += 16 + (Py_ssize_t)cap[i];
    }
    result = PyLong_FromSsize_t(pos);
done:
    if (have_out)
        PyBuffer_Release(&out);
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&arr[i]);
    PyBuffer_Release(&in);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "Walk pcap records: (n, next position, bad caplen or -1)."},
    {"records", records, METH_VARARGS, "Write packets as little-endian pcap records into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_accel_read", "pcap savefile record walker (gims capture path)", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__accel_read(void) { return PyModule_Create(&module); }
