/*
 * serialize.c - Python objects -> bytes, execnet 2.x opcode set.
 *
 * Output is byte-identical to stock execnet for every object it accepts.
 * Dispatch is on the exact type (as stock does): subclasses of builtins
 * are refused with DumpError; instances of the configured Channel class
 * (subclasses included) are written as 'B' + id.
 *
 * Everything is written into one growing buffer: a small buffer on the C
 * stack first, then a bytes object grown geometrically with
 * _PyBytes_Resize() and shrunk to size at the end, so the result costs at
 * most one copy and a large bytes/str payload is copied exactly once.
 * exn_serialize_frame_into() instead appends frames to a caller's malloc()
 * buffer: the engine's outgoing buffer, so a send copies nothing.
 */
#include "_execnet.h"

/* Opcodes written by dumps (see WIRE.md). */
#define OP_NONE 'L'
#define OP_TRUE 'R'
#define OP_FALSE 'C'
#define OP_INT 'F'
#define OP_LONGINT 'H'
#define OP_FLOAT 'D'
#define OP_COMPLEX 'T'
#define OP_BYTES 'A'
#define OP_STR 'N'
#define OP_LIST 'K'
#define OP_DICT 'J'
#define OP_TUPLE '@'
#define OP_SET 'O'
#define OP_FROZENSET 'E'
#define OP_SETITEM 'P'
#define OP_CHANNEL 'B'
#define OP_STOP 'Q'

#define WRITER_STACK_SIZE 256

typedef struct {
    char *buf;           /* points at `stack` or into `bytes` */
    Py_ssize_t pos;      /* bytes written */
    Py_ssize_t cap;      /* bytes available at buf */
    PyObject *bytes;     /* NULL while the stack buffer is in use */
    exn_rawbuf *raw;     /* non-NULL: write into this malloc() buffer
                            (exn_serialize_frame_into) instead */
    char stack[WRITER_STACK_SIZE];
} writer_t;

/* Why a dump stopped on nesting: our bound, or the interpreter's. */
#define TOO_DEEP_OURS 1
#define TOO_DEEP_INTERP 2

typedef struct {
    writer_t w;
    PyObject *DumpError; /* strong refs for the duration of one call, */
    PyObject *Channel;   /* so configure() from another thread is safe */
    PyObject *str_id;
    int too_deep;        /* 0, TOO_DEEP_OURS or TOO_DEEP_INTERP */
} dumper_t;

/* ------------------------------------------------------------------ */
/* Buffer                                                              */
/* ------------------------------------------------------------------ */

static void
writer_init(writer_t *w)
{
    w->buf = w->stack;
    w->pos = 0;
    w->cap = WRITER_STACK_SIZE;
    w->bytes = NULL;
    w->raw = NULL;
}

/* Make room for at least `n` more bytes.  0, or -1 with MemoryError. */
static int
writer_grow(writer_t *w, Py_ssize_t n)
{
    Py_ssize_t need, newcap;

    if (n > PY_SSIZE_T_MAX - 64 - w->pos) {
        PyErr_NoMemory();
        return -1;
    }
    need = w->pos + n;
    newcap = w->cap <= PY_SSIZE_T_MAX / 2 ? w->cap * 2 : PY_SSIZE_T_MAX;
    if (newcap < need) {
        /* A big item (one large bytes or str): size for it exactly, plus
           a little slack for the opcodes that follow it. */
        newcap = need + 64;
    }
    if (w->raw != NULL) {
        char *p = realloc(w->raw->data, (size_t)newcap);
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        w->raw->data = p;
        w->raw->cap = (size_t)newcap;
        w->buf = p;
        w->cap = newcap;
        return 0;
    }
    if (w->bytes == NULL) {
        w->bytes = PyBytes_FromStringAndSize(NULL, newcap);
        if (w->bytes == NULL) {
            return -1;
        }
        memcpy(PyBytes_AS_STRING(w->bytes), w->stack, (size_t)w->pos);
    }
    else if (_PyBytes_Resize(&w->bytes, newcap) < 0) {
        /* _PyBytes_Resize freed the object and set it to NULL. */
        return -1;
    }
    w->buf = PyBytes_AS_STRING(w->bytes);
    w->cap = newcap;
    return 0;
}

static inline int
writer_reserve(writer_t *w, Py_ssize_t n)
{
    if (w->cap - w->pos >= n) {
        return 0;
    }
    return writer_grow(w, n);
}

/* The put_* helpers need room reserved by the caller. */
static inline void
put_byte(writer_t *w, char c)
{
    w->buf[w->pos++] = c;
}

static inline void
put_be32(writer_t *w, uint32_t v)
{
    exn_put_be32((unsigned char *)w->buf + w->pos, v);
    w->pos += 4;
}

static inline void
put_double(writer_t *w, double d)
{
    uint64_t bits;
    unsigned char *p = (unsigned char *)w->buf + w->pos;
    memcpy(&bits, &d, sizeof(bits));
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)(bits & 0xff);
        bits >>= 8;
    }
    w->pos += 8;
}

/* Write one opcode.  0, or -1 with MemoryError. */
static inline int
write_op(writer_t *w, char op)
{
    if (writer_reserve(w, 1) < 0) {
        return -1;
    }
    put_byte(w, op);
    return 0;
}

/* Write an opcode followed by a 32-bit big-endian value. */
static inline int
write_op_be32(writer_t *w, char op, uint32_t v)
{
    if (writer_reserve(w, 5) < 0) {
        return -1;
    }
    put_byte(w, op);
    put_be32(w, v);
    return 0;
}

/* Return the finished bytes object (new reference) and reset the writer;
   NULL with MemoryError set. */
static PyObject *
writer_finish(writer_t *w)
{
    PyObject *result;
    if (w->bytes == NULL) {
        return PyBytes_FromStringAndSize(w->stack, w->pos);
    }
    result = w->bytes;
    w->bytes = NULL;
    if (w->pos != w->cap && _PyBytes_Resize(&result, w->pos) < 0) {
        return NULL;
    }
    return result;
}

static void
writer_discard(writer_t *w)
{
    Py_CLEAR(w->bytes);
}

/* ------------------------------------------------------------------ */
/* Encoders, one per type                                              */
/* ------------------------------------------------------------------ */

static int save(dumper_t *d, PyObject *obj, int depth);

/* Raise DumpError for a length that does not fit the 32-bit field. */
static int
too_large(dumper_t *d, const char *what, Py_ssize_t n)
{
    PyErr_Format(d->DumpError,
                 "can't serialize %s of length %zd: longer than 2**31-1",
                 what, n);
    return -1;
}

/* int: 'F' + int32 when it fits, else 'H' + length + decimal digits. */
static int
save_int(dumper_t *d, PyObject *obj)
{
    writer_t *w = &d->w;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);

    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (!overflow && v >= INT32_MIN && v <= INT32_MAX) {
        return write_op_be32(w, OP_INT, (uint32_t)(int32_t)v);
    }
    if (!overflow) {
        /* Fits in 64 bits: format it here. */
        char tmp[24];
        char *end = tmp + sizeof(tmp);
        char *p = end;
        unsigned long long u = v < 0 ? 0ull - (unsigned long long)v
                                     : (unsigned long long)v;
        do {
            *--p = (char)('0' + (int)(u % 10));
            u /= 10;
        } while (u != 0);
        if (v < 0) {
            *--p = '-';
        }
        Py_ssize_t n = end - p;
        if (writer_reserve(w, 5 + n) < 0) {
            return -1;
        }
        put_byte(w, OP_LONGINT);
        put_be32(w, (uint32_t)n);
        memcpy(w->buf + w->pos, p, (size_t)n);
        w->pos += n;
        return 0;
    }
    else {
        /* Big int: let Python format it (may hit the int max str digits
           limit, which becomes a DumpError). */
        Py_ssize_t n;
        const char *digits;
        PyObject *text = PyObject_Str(obj);
        if (text == NULL) {
            if (PyErr_ExceptionMatches(PyExc_ValueError)) {
                exn_err_chain(d->DumpError, 1, "can't serialize int");
            }
            return -1;
        }
        digits = PyUnicode_AsUTF8AndSize(text, &n);
        if (digits == NULL) {
            Py_DECREF(text);
            return -1;
        }
        if (n > INT32_MAX) {
            Py_DECREF(text);
            return too_large(d, "int text", n);
        }
        if (writer_reserve(w, 5 + n) < 0) {
            Py_DECREF(text);
            return -1;
        }
        put_byte(w, OP_LONGINT);
        put_be32(w, (uint32_t)n);
        memcpy(w->buf + w->pos, digits, (size_t)n);
        w->pos += n;
        Py_DECREF(text);
        return 0;
    }
}

/* Raise DumpError for a str that has no UTF-8 encoding (lone surrogates),
   chained to the UnicodeEncodeError Python's own codec gives. */
static int
str_not_encodable(dumper_t *d, PyObject *obj)
{
    PyObject *encoded = PyUnicode_AsUTF8String(obj);
    if (encoded != NULL) {
        /* Cannot happen: we found a surrogate.  Be safe anyway. */
        Py_DECREF(encoded);
        PyErr_SetString(d->DumpError, "strings must be utf-8 encodable");
        return -1;
    }
    /* Stock's message, with the codec error as the cause. */
    if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
        exn_err_chain(d->DumpError, 0, "strings must be utf-8 encodable");
    }
    return -1;
}

/* str: 'N' + length + UTF-8 bytes, encoded straight into the buffer. */
static int
save_str(dumper_t *d, PyObject *obj)
{
    writer_t *w = &d->w;
    Py_ssize_t len, n;
    int kind;
    const void *data;

#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(obj) < 0) {
        return -1;
    }
#endif
    len = PyUnicode_GET_LENGTH(obj);
    data = PyUnicode_DATA(obj);
    if (PyUnicode_IS_ASCII(obj)) {
        if (len > INT32_MAX) {
            return too_large(d, "str", len);
        }
        if (writer_reserve(w, 5 + len) < 0) {
            return -1;
        }
        put_byte(w, OP_STR);
        put_be32(w, (uint32_t)len);
        memcpy(w->buf + w->pos, data, (size_t)len);
        w->pos += len;
        return 0;
    }

    /* Pass 1: the exact UTF-8 size, and reject surrogates. */
    kind = PyUnicode_KIND(obj);
    n = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c < 0x80) {
            n += 1;
        }
        else if (c < 0x800) {
            n += 2;
        }
        else if (c < 0x10000) {
            if (c >= 0xD800 && c <= 0xDFFF) {
                return str_not_encodable(d, obj);
            }
            n += 3;
        }
        else {
            n += 4;
        }
    }
    if (n > INT32_MAX) {
        return too_large(d, "str", n);
    }
    if (writer_reserve(w, 5 + n) < 0) {
        return -1;
    }
    put_byte(w, OP_STR);
    put_be32(w, (uint32_t)n);

    /* Pass 2: encode. */
    unsigned char *p = (unsigned char *)w->buf + w->pos;
    for (Py_ssize_t i = 0; i < len; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c < 0x80) {
            *p++ = (unsigned char)c;
        }
        else if (c < 0x800) {
            *p++ = (unsigned char)(0xC0 | (c >> 6));
            *p++ = (unsigned char)(0x80 | (c & 0x3F));
        }
        else if (c < 0x10000) {
            *p++ = (unsigned char)(0xE0 | (c >> 12));
            *p++ = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
            *p++ = (unsigned char)(0x80 | (c & 0x3F));
        }
        else {
            *p++ = (unsigned char)(0xF0 | (c >> 18));
            *p++ = (unsigned char)(0x80 | ((c >> 12) & 0x3F));
            *p++ = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
            *p++ = (unsigned char)(0x80 | (c & 0x3F));
        }
    }
    w->pos += n;
    return 0;
}

/* bytes: 'A' + length + raw bytes (one memcpy). */
static int
save_bytes(dumper_t *d, PyObject *obj)
{
    writer_t *w = &d->w;
    Py_ssize_t n = PyBytes_GET_SIZE(obj);

    if (n > INT32_MAX) {
        return too_large(d, "bytes", n);
    }
    if (writer_reserve(w, 5 + n) < 0) {
        return -1;
    }
    put_byte(w, OP_BYTES);
    put_be32(w, (uint32_t)n);
    memcpy(w->buf + w->pos, PyBytes_AS_STRING(obj), (size_t)n);
    w->pos += n;
    return 0;
}

/* Count a container level.  0, or -1 with an exception set and
   d->too_deep recorded.  The DumpError is raised by the entry point once
   the C stack has unwound: creating an exception object this deep could
   itself fail with RecursionError. */
static int
enter_container(dumper_t *d, int depth)
{
    if (depth >= EXN_MAX_DEPTH) {
        d->too_deep = TOO_DEEP_OURS;
        PyErr_SetNone(PyExc_RecursionError);
        return -1;
    }
    if (Py_EnterRecursiveCall(" while serializing")) {
        d->too_deep = TOO_DEEP_INTERP;
        return -1;
    }
    return 0;
}

/* Turn a nesting failure recorded in d->too_deep into DumpError. */
static void
raise_too_deep(dumper_t *d)
{
    if (d->too_deep == TOO_DEEP_OURS) {
        PyErr_Clear();
        PyErr_Format(d->DumpError,
                     "object too deeply nested (>%d levels) or recursive",
                     EXN_MAX_DEPTH);
    }
    else if (PyErr_ExceptionMatches(PyExc_RecursionError)) {
        exn_err_chain(d->DumpError, 0,
                      "object too deeply nested (>%d levels) or recursive",
                      EXN_MAX_DEPTH);
    }
}

/* list: 'K' n, then per item: index as 'F', the item, 'P'. */
static int
save_list(dumper_t *d, PyObject *obj, int depth)
{
    writer_t *w = &d->w;
    Py_ssize_t n = PyList_GET_SIZE(obj);
    Py_ssize_t i, count_pos;
    int rc = -1;

    if (n > INT32_MAX) {
        return too_large(d, "list", n);
    }
    if (enter_container(d, depth) < 0) {
        return -1;
    }
    if (write_op_be32(w, OP_LIST, (uint32_t)n) < 0) {
        goto done;
    }
    count_pos = w->pos - 4;
    /* Re-check the size: an item's Channel.id lookup may run Python code
       that shrinks the list; then the count is patched to what was
       written, so the output still loads. */
    for (i = 0; i < n && i < PyList_GET_SIZE(obj); i++) {
        PyObject *item = PyList_GET_ITEM(obj, i);
        int r;
        if (write_op_be32(w, OP_INT, (uint32_t)i) < 0) {
            goto done;
        }
        Py_INCREF(item);
        r = save(d, item, depth + 1);
        Py_DECREF(item);
        if (r < 0 || write_op(w, OP_SETITEM) < 0) {
            goto done;
        }
    }
    if (i < n) {
        exn_put_be32((unsigned char *)w->buf + count_pos, (uint32_t)i);
    }
    rc = 0;
done:
    Py_LeaveRecursiveCall();
    return rc;
}

/* tuple: the items, then '@' n. */
static int
save_tuple(dumper_t *d, PyObject *obj, int depth)
{
    Py_ssize_t n = PyTuple_GET_SIZE(obj);
    int rc = -1;

    if (n > INT32_MAX) {
        return too_large(d, "tuple", n);
    }
    if (enter_container(d, depth) < 0) {
        return -1;
    }
    /* A tuple keeps its items alive; no extra references needed. */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (save(d, PyTuple_GET_ITEM(obj, i), depth + 1) < 0) {
            goto done;
        }
    }
    rc = write_op_be32(&d->w, OP_TUPLE, (uint32_t)n);
done:
    Py_LeaveRecursiveCall();
    return rc;
}

/* dict: 'J', then per entry: key, value, 'P'. */
static int
save_dict(dumper_t *d, PyObject *obj, int depth)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    int rc = -1;

    if (enter_container(d, depth) < 0) {
        return -1;
    }
    if (write_op(&d->w, OP_DICT) < 0) {
        goto done;
    }
    while (PyDict_Next(obj, &pos, &key, &value)) {
        int r;
        /* Hold the entry: Python code run by a Channel.id lookup could
           remove it from the dict. */
        Py_INCREF(key);
        Py_INCREF(value);
        r = save(d, key, depth + 1);
        if (r == 0) {
            r = save(d, value, depth + 1);
        }
        Py_DECREF(key);
        Py_DECREF(value);
        if (r < 0 || write_op(&d->w, OP_SETITEM) < 0) {
            goto done;
        }
    }
    rc = 0;
done:
    Py_LeaveRecursiveCall();
    return rc;
}

/* set / frozenset: the items, then 'O' / 'E' and the count. */
static int
save_set(dumper_t *d, PyObject *obj, int depth, char op)
{
    PyObject *it = NULL;
    PyObject *item;
    Py_ssize_t n = 0;
    int rc = -1;

    if (PySet_GET_SIZE(obj) > INT32_MAX) {
        return too_large(d, "set", PySet_GET_SIZE(obj));
    }
    if (enter_container(d, depth) < 0) {
        return -1;
    }
    it = PyObject_GetIter(obj);
    if (it == NULL) {
        goto done;
    }
    while ((item = PyIter_Next(it)) != NULL) {
        int r = save(d, item, depth + 1);
        Py_DECREF(item);
        if (r < 0) {
            goto done;
        }
        n++;
    }
    if (PyErr_Occurred()) {
        goto done;
    }
    if (n > INT32_MAX) {
        too_large(d, "set", n);
        goto done;
    }
    rc = write_op_be32(&d->w, op, (uint32_t)n);
done:
    Py_XDECREF(it);
    Py_LeaveRecursiveCall();
    return rc;
}

/* Channel: 'B' + the int32 `.id` attribute. */
static int
save_channel(dumper_t *d, PyObject *obj)
{
    int overflow = 0;
    long long id;
    PyObject *idobj = PyObject_GetAttr(obj, d->str_id);

    if (idobj == NULL) {
        if (PyErr_ExceptionMatches(PyExc_Exception)) {
            exn_err_chain(d->DumpError, 1,
                          "can't serialize %.100s: no usable channel id",
                          Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    if (!PyLong_Check(idobj)) {
        PyErr_Format(d->DumpError,
                     "can't serialize channel: id must be int, not %.100s",
                     Py_TYPE(idobj)->tp_name);
        Py_DECREF(idobj);
        return -1;
    }
    id = PyLong_AsLongLongAndOverflow(idobj, &overflow);
    Py_DECREF(idobj);
    if (id == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow || id < INT32_MIN || id > INT32_MAX) {
        PyErr_SetString(d->DumpError,
                        "can't serialize channel: id out of 32-bit range");
        return -1;
    }
    return write_op_be32(&d->w, OP_CHANNEL, (uint32_t)(int32_t)id);
}

/* Append the encoding of `obj`; `depth` containers enclose it.
   0, or -1 with an exception set. */
static int
save(dumper_t *d, PyObject *obj, int depth)
{
    writer_t *w = &d->w;
    PyTypeObject *tp = Py_TYPE(obj);

    if (tp == &PyLong_Type) {
        return save_int(d, obj);
    }
    if (tp == &PyUnicode_Type) {
        return save_str(d, obj);
    }
    if (obj == Py_None) {
        return write_op(w, OP_NONE);
    }
    if (tp == &PyBool_Type) {
        return write_op(w, obj == Py_True ? OP_TRUE : OP_FALSE);
    }
    if (tp == &PyBytes_Type) {
        return save_bytes(d, obj);
    }
    if (tp == &PyFloat_Type) {
        if (writer_reserve(w, 9) < 0) {
            return -1;
        }
        put_byte(w, OP_FLOAT);
        put_double(w, PyFloat_AS_DOUBLE(obj));
        return 0;
    }
    if (tp == &PyDict_Type) {
        return save_dict(d, obj, depth);
    }
    if (tp == &PyList_Type) {
        return save_list(d, obj, depth);
    }
    if (tp == &PyTuple_Type) {
        return save_tuple(d, obj, depth);
    }
    if (tp == &PySet_Type) {
        return save_set(d, obj, depth, OP_SET);
    }
    if (tp == &PyFrozenSet_Type) {
        return save_set(d, obj, depth, OP_FROZENSET);
    }
    if (tp == &PyComplex_Type) {
        Py_complex c = ((PyComplexObject *)obj)->cval;
        if (writer_reserve(w, 17) < 0) {
            return -1;
        }
        put_byte(w, OP_COMPLEX);
        put_double(w, c.real);
        put_double(w, c.imag);
        return 0;
    }
    switch (PyObject_IsInstance(obj, d->Channel)) {
    case 1:
        return save_channel(d, obj);
    case 0:
        break;
    default:
        return -1;
    }
    PyErr_Format(d->DumpError, "can't serialize %R", (PyObject *)tp);
    return -1;
}

/* ------------------------------------------------------------------ */
/* Entry points                                                        */
/* ------------------------------------------------------------------ */

static void
dumper_init(dumper_t *d, exn_module_state *st)
{
    writer_init(&d->w);
    d->DumpError = Py_NewRef(st->DumpError);
    d->Channel = Py_NewRef(st->Channel);
    d->str_id = Py_NewRef(st->str_id);
    d->too_deep = 0;
}

static void
dumper_release(dumper_t *d)
{
    writer_discard(&d->w);
    Py_CLEAR(d->DumpError);
    Py_CLEAR(d->Channel);
    Py_CLEAR(d->str_id);
}

PyObject *
exn_serialize_dumps(exn_module_state *st, PyObject *obj)
{
    dumper_t d;
    PyObject *result = NULL;

    dumper_init(&d, st);
    if (save(&d, obj, 0) < 0 || write_op(&d.w, OP_STOP) < 0) {
        if (d.too_deep) {
            raise_too_deep(&d);
        }
        goto done;
    }
    result = writer_finish(&d.w);
done:
    dumper_release(&d);
    return result;
}

PyObject *
exn_serialize_frame(exn_module_state *st, int msgcode, int32_t channelid,
                    PyObject *obj)
{
    dumper_t d;
    PyObject *result = NULL;
    Py_ssize_t payload;

    dumper_init(&d, st);
    /* Header first, its length patched once the payload is written. */
    d.w.pos = EXN_FRAME_HEADER_SIZE;
    if (save(&d, obj, 0) < 0 || write_op(&d.w, OP_STOP) < 0) {
        if (d.too_deep) {
            raise_too_deep(&d);
        }
        goto done;
    }
    payload = d.w.pos - EXN_FRAME_HEADER_SIZE;
    if (payload > INT32_MAX) {
        PyErr_Format(d.DumpError,
                     "can't send a payload of %zd bytes in one frame "
                     "(the limit is 2**31-1)", payload);
        goto done;
    }
    exn_frame_pack_header((unsigned char *)d.w.buf, msgcode, channelid,
                          (int32_t)payload);
    result = writer_finish(&d.w);
done:
    dumper_release(&d);
    return result;
}

PyObject *
exn_serialize_rawframe(int msgcode, int32_t channelid, const char *data,
                       Py_ssize_t len)
{
    PyObject *result;
    char *p;

    if (len > INT32_MAX) {
        PyErr_Format(PyExc_ValueError,
                     "can't send a payload of %zd bytes in one frame "
                     "(the limit is 2**31-1)", len);
        return NULL;
    }
    result = PyBytes_FromStringAndSize(NULL, EXN_FRAME_HEADER_SIZE + len);
    if (result == NULL) {
        return NULL;
    }
    p = PyBytes_AS_STRING(result);
    exn_frame_pack_header((unsigned char *)p, msgcode, channelid,
                          (int32_t)len);
    if (len > 0) {
        memcpy(p + EXN_FRAME_HEADER_SIZE, data, (size_t)len);
    }
    return result;
}

int
exn_serialize_frame_into(exn_module_state *st, exn_rawbuf *rb, int msgcode,
                         int32_t channelid, PyObject *obj)
{
    dumper_t d;
    Py_ssize_t start = (Py_ssize_t)rb->len;
    Py_ssize_t payload;
    int rc = -1;

    if (obj == NULL) {
        /* An empty payload: the header alone; needs no configure(). */
        if (rb->cap - rb->len < EXN_FRAME_HEADER_SIZE) {
            size_t newcap = rb->cap * 2 + 256;
            char *p = realloc(rb->data, newcap);
            if (p == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            rb->data = p;
            rb->cap = newcap;
        }
        exn_frame_pack_header((unsigned char *)rb->data + rb->len, msgcode,
                              channelid, 0);
        rb->len += EXN_FRAME_HEADER_SIZE;
        return 0;
    }
    dumper_init(&d, st);
    d.w.raw = rb;
    d.w.buf = rb->data;
    d.w.cap = (Py_ssize_t)rb->cap;
    d.w.pos = start;
    /* Header first, its length patched once the payload is written. */
    if (writer_reserve(&d.w, EXN_FRAME_HEADER_SIZE) < 0) {
        goto done;
    }
    d.w.pos += EXN_FRAME_HEADER_SIZE;
    if (save(&d, obj, 0) < 0 || write_op(&d.w, OP_STOP) < 0) {
        if (d.too_deep) {
            raise_too_deep(&d);
        }
        goto done;
    }
    payload = d.w.pos - start - EXN_FRAME_HEADER_SIZE;
    if (payload > INT32_MAX) {
        PyErr_Format(d.DumpError,
                     "can't send a payload of %zd bytes in one frame "
                     "(the limit is 2**31-1)", payload);
        goto done;
    }
    exn_frame_pack_header((unsigned char *)d.w.buf + start, msgcode,
                          channelid, (int32_t)payload);
    rb->len = (size_t)d.w.pos;
    rc = 0;
done:
    d.w.raw = NULL;     /* the buffer belongs to rb */
    dumper_release(&d);
    return rc;
}
