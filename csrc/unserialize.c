/*
 * unserialize.c - bytes -> Python objects, execnet 2.x opcode set.
 *
 * This is the hostile-input surface: the bytes come from the other end of
 * a pipe or socket.  Rules kept throughout:
 *   - every length or count is checked against the input left (or the
 *     stack size) before anything is allocated for it;
 *   - no C recursion: a postfix stack machine over an explicit stack;
 *   - containers deeper than EXN_MAX_DEPTH are refused, so hashing or
 *     freeing what we built cannot exhaust the C stack either;
 *   - every malformed input raises LoadError (MemoryError stays itself,
 *     and errors raised by channel_factory propagate unchanged);
 *   - on any error every object on the stack is released.
 */
#include "_execnet.h"

#include <stdarg.h>
#include <stdio.h>

/* A list item costs at least 7 input bytes: 'F' + index, one opcode for
   the value, 'P'.  Used to bound what a 'K' count may allocate. */
#define MIN_LIST_ITEM_SIZE 7

#define LOADER_STACK_INLINE 64

/* read_count() limit: the bytes left after the length field. */
#define REST_OF_INPUT (-1)

typedef struct {
    PyObject *obj;       /* owned reference */
    int depth;           /* container nesting of obj; 0 for scalars */
} slot_t;

typedef struct {
    const unsigned char *start;
    const unsigned char *p;
    const unsigned char *end;
    PyObject *LoadError;         /* strong ref for the call */
    PyObject **strcache;         /* the module's (EXN_STRCACHE_SIZE), or NULL */
    PyObject *channel_factory;   /* borrowed; NULL if none */
    int strflags;                /* EXN_STR_* bits */
    Py_ssize_t list_budget;      /* list slots 'K' may still allocate */
    slot_t *stack;
    Py_ssize_t size;
    Py_ssize_t cap;
    slot_t inline_stack[LOADER_STACK_INLINE];
} loader_t;

/* ------------------------------------------------------------------ */
/* Errors                                                              */
/* ------------------------------------------------------------------ */

/* Describe opcode byte `op` for messages: "'K' (0x4b)" or "0x02". */
static void
describe_op(unsigned char op, char *buf, size_t size)
{
    if (op >= 0x21 && op < 0x7f && op != '\'') {
        snprintf(buf, size, "'%c' (0x%02x)", op, op);
    }
    else {
        snprintf(buf, size, "0x%02x", op);
    }
}

/* Raise LoadError with a printf-style message.  Always returns -1. */
static int
load_error(loader_t *L, const char *format, ...)
{
    PyObject *msg;
    va_list vargs;

    va_start(vargs, format);
    msg = PyUnicode_FromFormatV(format, vargs);
    va_end(vargs);
    if (msg != NULL) {
        PyErr_SetObject(L->LoadError, msg);
        Py_DECREF(msg);
    }
    return -1;
}

/* Raise LoadError for an opcode at `off` that needs `n` more bytes than
   are left.  Always returns -1. */
static int
truncated(loader_t *L, unsigned char op, Py_ssize_t off, Py_ssize_t n)
{
    char opname[24];
    describe_op(op, opname, sizeof(opname));
    return load_error(L,
                      "truncated input: opcode %s at offset %zd needs %zd "
                      "bytes, only %zd left",
                      opname, off, n, (Py_ssize_t)(L->end - L->p));
}

/* ------------------------------------------------------------------ */
/* Stack                                                               */
/* ------------------------------------------------------------------ */

/* Push `obj` (a new reference, stolen even on failure).  NULL obj means
   its constructor failed: return -1 with that error kept. */
static int
push(loader_t *L, PyObject *obj, int depth)
{
    if (obj == NULL) {
        return -1;
    }
    if (L->size == L->cap) {
        /* The stack never holds more slots than input bytes were read,
           so this cannot overflow. */
        Py_ssize_t newcap = L->cap * 2;
        slot_t *items;
        if (L->stack == L->inline_stack) {
            items = PyMem_Malloc((size_t)newcap * sizeof(slot_t));
            if (items != NULL) {
                memcpy(items, L->stack, (size_t)L->size * sizeof(slot_t));
            }
        }
        else {
            items = PyMem_Realloc(L->stack, (size_t)newcap * sizeof(slot_t));
        }
        if (items == NULL) {
            Py_DECREF(obj);
            PyErr_NoMemory();
            return -1;
        }
        L->stack = items;
        L->cap = newcap;
    }
    L->stack[L->size].obj = obj;
    L->stack[L->size].depth = depth;
    L->size++;
    return 0;
}

/* Drop the top `n` slots, releasing their objects. */
static void
pop_n(loader_t *L, Py_ssize_t n)
{
    while (n-- > 0) {
        L->size--;
        Py_CLEAR(L->stack[L->size].obj);
    }
}

/* Deepest container among the top `n` slots, plus one. */
static int
depth_of_top(loader_t *L, Py_ssize_t n)
{
    int depth = 0;
    for (Py_ssize_t i = L->size - n; i < L->size; i++) {
        if (L->stack[i].depth > depth) {
            depth = L->stack[i].depth;
        }
    }
    return depth + 1;
}

static int
too_deep(loader_t *L, unsigned char op, Py_ssize_t off)
{
    char opname[24];
    describe_op(op, opname, sizeof(opname));
    return load_error(L,
                      "opcode %s at offset %zd: data nested deeper than %d "
                      "levels", opname, off, EXN_MAX_DEPTH);
}

/* ------------------------------------------------------------------ */
/* Input                                                               */
/* ------------------------------------------------------------------ */

/* Read a 4-byte length or count for opcode `op` at `off`: 0 <= n, and
   n <= `limit`, where a negative limit means "the input left after the
   4 bytes".  0 and *out set, or -1 with LoadError. */
static int
read_count(loader_t *L, unsigned char op, Py_ssize_t off, Py_ssize_t limit,
           const char *what, Py_ssize_t *out)
{
    int32_t v;
    char opname[24];

    if (L->end - L->p < 4) {
        return truncated(L, op, off, 4);
    }
    v = exn_get_be32s(L->p);
    L->p += 4;
    if (limit < 0) {
        limit = L->end - L->p;
    }
    if (v < 0 || (Py_ssize_t)v > limit) {
        describe_op(op, opname, sizeof(opname));
        if (v < 0) {
            return load_error(L, "opcode %s at offset %zd: negative %s %d",
                              opname, off, what, (int)v);
        }
        return load_error(L,
                          "opcode %s at offset %zd: %s %d exceeds the "
                          "limit of %zd", opname, off, what, (int)v, limit);
    }
    *out = (Py_ssize_t)v;
    return 0;
}

/* Decode 'H'/'I' digits: ASCII [-]digits only.  New reference, or NULL
   with LoadError (or MemoryError). */
static PyObject *
parse_longint(loader_t *L, unsigned char op, Py_ssize_t off,
              const char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    char opname[24];
    char small[64];
    char *buf;
    PyObject *result;

    if (n > 0 && s[0] == '-') {
        i = 1;
    }
    if (i == n) {
        describe_op(op, opname, sizeof(opname));
        load_error(L, "opcode %s at offset %zd: empty integer", opname, off);
        return NULL;
    }
    for (Py_ssize_t j = i; j < n; j++) {
        if (s[j] < '0' || s[j] > '9') {
            describe_op(op, opname, sizeof(opname));
            load_error(L, "opcode %s at offset %zd: integer text is not "
                       "ASCII [-]digits", opname, off);
            return NULL;
        }
    }
    if (n - i <= 18) {
        /* Fits in 63 bits. */
        long long v = 0;
        for (Py_ssize_t j = i; j < n; j++) {
            v = v * 10 + (s[j] - '0');
        }
        return PyLong_FromLongLong(i ? -v : v);
    }
    buf = n < (Py_ssize_t)sizeof(small) ? small : PyMem_Malloc((size_t)n + 1);
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    memcpy(buf, s, (size_t)n);
    buf[n] = '\0';
    result = PyLong_FromString(buf, NULL, 10);
    if (buf != small) {
        PyMem_Free(buf);
    }
    if (result == NULL && PyErr_ExceptionMatches(PyExc_ValueError)) {
        describe_op(op, opname, sizeof(opname));
        exn_err_chain(L->LoadError, 1,
                      "opcode %s at offset %zd: bad integer", opname, off);
    }
    return result;
}

/* Read 8 bytes at p as a big-endian IEEE double. */
static double
get_double(const unsigned char *p)
{
    uint64_t bits = 0;
    double d;
    for (int i = 0; i < 8; i++) {
        bits = (bits << 8) | p[i];
    }
    memcpy(&d, &bits, sizeof(d));
    return d;
}

/* A short ASCII string from the cache, or a new one put there; NULL
   (no exception) if `s` is not short ASCII text or there is no cache,
   or NULL with MemoryError. */
static PyObject *
cached_ascii(loader_t *L, const unsigned char *s, Py_ssize_t n)
{
    uint32_t h = 2166136261u;
    unsigned char high = 0;
    PyObject **slot, *str;

    if (L->strcache == NULL || n > EXN_STRCACHE_MAXLEN) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        high |= s[i];
        h = (h ^ s[i]) * 16777619u;
    }
    if (high & 0x80) {
        return NULL;
    }
    slot = &L->strcache[(h ^ (h >> 16)) & (EXN_STRCACHE_SIZE - 1)];
    str = *slot;
    /* Only compact ASCII strings made below are ever stored. */
    if (str != NULL && PyUnicode_GET_LENGTH(str) == n
        && memcmp(PyUnicode_1BYTE_DATA(str), s, (size_t)n) == 0) {
        return Py_NewRef(str);
    }
    str = PyUnicode_New(n, 127);
    if (str == NULL) {
        return NULL;
    }
    memcpy(PyUnicode_1BYTE_DATA(str), s, (size_t)n);
    Py_XSETREF(*slot, Py_NewRef(str));
    return str;
}

/* Decode UTF-8 text for 'N'/'S'.  New reference, or NULL with LoadError
   (or MemoryError). */
static PyObject *
decode_utf8(loader_t *L, unsigned char op, Py_ssize_t off,
            const unsigned char *s, Py_ssize_t n)
{
    PyObject *result = cached_ascii(L, s, n);

    if (result != NULL || PyErr_Occurred()) {
        return result;
    }
    result = PyUnicode_DecodeUTF8((const char *)s, n, "strict");
    if (result == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        char opname[24];
        describe_op(op, opname, sizeof(opname));
        exn_err_chain(L->LoadError, 1,
                      "opcode %s at offset %zd: invalid UTF-8", opname, off);
    }
    return result;
}

/* ------------------------------------------------------------------ */
/* Container opcodes                                                   */
/* ------------------------------------------------------------------ */

/* '@': pop n items into a tuple. */
static int
load_tuple(loader_t *L, unsigned char op, Py_ssize_t off, Py_ssize_t n)
{
    int depth = depth_of_top(L, n);
    PyObject *tuple;

    if (depth > EXN_MAX_DEPTH) {
        return too_deep(L, op, off);
    }
    tuple = PyTuple_New(n);
    if (tuple == NULL) {
        return -1;
    }
    /* Move the references from the stack into the tuple. */
    for (Py_ssize_t i = 0; i < n; i++) {
        slot_t *s = &L->stack[L->size - n + i];
        PyTuple_SET_ITEM(tuple, i, s->obj);
        s->obj = NULL;
    }
    L->size -= n;
    return push(L, tuple, depth);
}

/* 'O' / 'E': pop n items into a set / frozenset. */
static int
load_set(loader_t *L, unsigned char op, Py_ssize_t off, Py_ssize_t n)
{
    int depth = depth_of_top(L, n);
    PyObject *set;

    if (depth > EXN_MAX_DEPTH) {
        return too_deep(L, op, off);
    }
    set = op == 'O' ? PySet_New(NULL) : PyFrozenSet_New(NULL);
    if (set == NULL) {
        return -1;
    }
    /* PySet_Add may fill a frozenset that nobody else has seen yet. */
    for (Py_ssize_t i = L->size - n; i < L->size; i++) {
        if (PySet_Add(set, L->stack[i].obj) < 0) {
            Py_DECREF(set);
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                char opname[24];
                describe_op(op, opname, sizeof(opname));
                exn_err_chain(L->LoadError, 1,
                              "opcode %s at offset %zd: unhashable set item",
                              opname, off);
            }
            return -1;
        }
    }
    pop_n(L, n);
    return push(L, set, depth);
}

/* 'P': pop value and key/index, store them into the list or dict below. */
static int
load_setitem(loader_t *L, Py_ssize_t off)
{
    slot_t *cont, *key, *value;
    int depth;

    if (L->size < 3) {
        return load_error(L, "opcode 'P' (0x50) at offset %zd: needs a "
                          "container, a key and a value, stack has %zd",
                          off, L->size);
    }
    cont = &L->stack[L->size - 3];
    key = &L->stack[L->size - 2];
    value = &L->stack[L->size - 1];
    depth = value->depth + 1;

    if (PyList_CheckExact(cont->obj)) {
        Py_ssize_t n = PyList_GET_SIZE(cont->obj);
        Py_ssize_t idx;
        if (!PyLong_Check(key->obj)) {
            return load_error(L, "opcode 'P' (0x50) at offset %zd: list "
                              "index must be int, not %.100s", off,
                              Py_TYPE(key->obj)->tp_name);
        }
        idx = PyLong_AsSsize_t(key->obj);
        if (idx == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                return -1;
            }
            PyErr_Clear();
            idx = PY_SSIZE_T_MAX;
        }
        if (idx < 0 && idx >= -n) {
            idx += n;       /* as list[idx] = value would */
        }
        if (idx < 0 || idx >= n) {
            return load_error(L, "opcode 'P' (0x50) at offset %zd: list "
                              "index out of range", off);
        }
        if (depth > cont->depth) {
            if (depth > EXN_MAX_DEPTH) {
                return too_deep(L, 'P', off);
            }
            cont->depth = depth;
        }
        /* Steals the value reference; the old item (None) is released. */
        PyList_SetItem(cont->obj, idx, value->obj);
        value->obj = NULL;
        L->size--;
        pop_n(L, 1);
        return 0;
    }
    if (PyDict_CheckExact(cont->obj)) {
        if (key->depth + 1 > depth) {
            depth = key->depth + 1;
        }
        if (depth > EXN_MAX_DEPTH) {
            return too_deep(L, 'P', off);
        }
        if (PyDict_SetItem(cont->obj, key->obj, value->obj) < 0) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                exn_err_chain(L->LoadError, 1, "opcode 'P' (0x50) at offset "
                              "%zd: unhashable dict key", off);
            }
            return -1;
        }
        if (depth > cont->depth) {
            cont->depth = depth;
        }
        pop_n(L, 2);
        return 0;
    }
    return load_error(L, "opcode 'P' (0x50) at offset %zd: target is "
                      "%.100s, not a list or dict", off,
                      Py_TYPE(cont->obj)->tp_name);
}

/* ------------------------------------------------------------------ */
/* The machine                                                         */
/* ------------------------------------------------------------------ */

/* Run until 'Q'.  Returns the one result (new reference), or NULL with
   an exception set; the caller releases the stack. */
static PyObject *
run(loader_t *L)
{
    for (;;) {
        Py_ssize_t off, n;
        unsigned char op;
        char opname[24];

        if (L->p >= L->end) {
            load_error(L, "truncated input: no STOP opcode 'Q' after %zd "
                       "bytes", (Py_ssize_t)(L->end - L->start));
            return NULL;
        }
        off = L->p - L->start;
        op = *L->p++;
        switch (op) {
        case 'L':
            if (push(L, Py_NewRef(Py_None), 0) < 0) {
                return NULL;
            }
            break;
        case 'R':
            if (push(L, Py_NewRef(Py_True), 0) < 0) {
                return NULL;
            }
            break;
        case 'C':
            if (push(L, Py_NewRef(Py_False), 0) < 0) {
                return NULL;
            }
            break;
        case 'F':
        case 'G':
            if (L->end - L->p < 4) {
                truncated(L, op, off, 4);
                return NULL;
            }
            if (push(L, PyLong_FromLong(exn_get_be32s(L->p)), 0) < 0) {
                return NULL;
            }
            L->p += 4;
            break;
        case 'H':
        case 'I':
            if (read_count(L, op, off, REST_OF_INPUT, "length", &n) < 0) {
                return NULL;
            }
            if (push(L, parse_longint(L, op, off, (const char *)L->p, n),
                     0) < 0) {
                return NULL;
            }
            L->p += n;
            break;
        case 'D':
            if (L->end - L->p < 8) {
                truncated(L, op, off, 8);
                return NULL;
            }
            if (push(L, PyFloat_FromDouble(get_double(L->p)), 0) < 0) {
                return NULL;
            }
            L->p += 8;
            break;
        case 'T':
            if (L->end - L->p < 16) {
                truncated(L, op, off, 16);
                return NULL;
            }
            if (push(L, PyComplex_FromDoubles(get_double(L->p),
                                              get_double(L->p + 8)),
                     0) < 0) {
                return NULL;
            }
            L->p += 16;
            break;
        case 'A':
        case 'M':
        case 'N':
        case 'S': {
            PyObject *obj;
            if (read_count(L, op, off, REST_OF_INPUT, "length", &n) < 0) {
                return NULL;
            }
            if (op == 'A'
                || (op == 'M' && !(L->strflags & EXN_STR_PY2_AS_PY3))
                || (op == 'N' && (L->strflags & EXN_STR_PY3_AS_PY2))) {
                obj = PyBytes_FromStringAndSize((const char *)L->p, n);
            }
            else if (op == 'M') {
                obj = PyUnicode_DecodeLatin1((const char *)L->p, n, NULL);
            }
            else {
                obj = decode_utf8(L, op, off, L->p, n);
            }
            if (push(L, obj, 0) < 0) {
                return NULL;
            }
            L->p += n;
            break;
        }
        case 'K': {
            PyObject *list;
            Py_ssize_t limit;
            /* Each item needs MIN_LIST_ITEM_SIZE bytes of what is left,
               and all lists together at most that share of the input. */
            if (L->end - L->p >= 4) {
                limit = (L->end - L->p - 4) / MIN_LIST_ITEM_SIZE;
                if (limit > L->list_budget) {
                    limit = L->list_budget;
                }
            }
            else {
                limit = 0;
            }
            if (read_count(L, op, off, limit, "list size", &n) < 0) {
                return NULL;
            }
            L->list_budget -= n;
            list = PyList_New(n);
            if (list == NULL) {
                return NULL;
            }
            for (Py_ssize_t i = 0; i < n; i++) {
                PyList_SET_ITEM(list, i, Py_NewRef(Py_None));
            }
            if (push(L, list, 1) < 0) {
                return NULL;
            }
            break;
        }
        case 'J':
            if (push(L, PyDict_New(), 1) < 0) {
                return NULL;
            }
            break;
        case '@':
        case 'O':
        case 'E':
            if (read_count(L, op, off, L->size, "item count", &n) < 0) {
                return NULL;
            }
            if ((op == '@' ? load_tuple(L, op, off, n)
                           : load_set(L, op, off, n)) < 0) {
                return NULL;
            }
            break;
        case 'P':
            if (load_setitem(L, off) < 0) {
                return NULL;
            }
            break;
        case 'B': {
            PyObject *id, *channel;
            if (L->end - L->p < 4) {
                truncated(L, op, off, 4);
                return NULL;
            }
            if (L->channel_factory == NULL) {
                load_error(L, "opcode 'B' (0x42) at offset %zd: a channel, "
                           "but no channel_factory was given", off);
                return NULL;
            }
            id = PyLong_FromLong(exn_get_be32s(L->p));
            if (id == NULL) {
                return NULL;
            }
            L->p += 4;
            channel = PyObject_CallOneArg(L->channel_factory, id);
            Py_DECREF(id);
            if (push(L, channel, 0) < 0) {
                return NULL;
            }
            break;
        }
        case 'Q': {
            PyObject *result;
            if (L->size != 1) {
                load_error(L, "opcode 'Q' (0x51) at offset %zd: STOP with "
                           "%zd objects on the stack, expected 1",
                           off, L->size);
                return NULL;
            }
            if (L->p != L->end) {
                load_error(L, "trailing data: %zd bytes after STOP at "
                           "offset %zd", (Py_ssize_t)(L->end - L->p), off);
                return NULL;
            }
            result = L->stack[0].obj;
            L->stack[0].obj = NULL;
            L->size = 0;
            return result;
        }
        default:
            describe_op(op, opname, sizeof(opname));
            load_error(L, "unknown opcode %s at offset %zd", opname, off);
            return NULL;
        }
    }
}

PyObject *
exn_unserialize_loads(exn_module_state *st, const unsigned char *data,
                      Py_ssize_t len, PyObject *channel_factory,
                      int strflags)
{
    loader_t L;
    PyObject *result;

    L.start = data;
    L.p = data;
    L.end = data + len;
    L.LoadError = Py_NewRef(st->LoadError);
#ifdef Py_GIL_DISABLED
    L.strcache = NULL;          /* the cache relies on the GIL */
#else
    L.strcache = st->strcache;
#endif
    L.channel_factory = channel_factory;
    L.strflags = strflags;
    L.list_budget = len / MIN_LIST_ITEM_SIZE;
    L.stack = L.inline_stack;
    L.size = 0;
    L.cap = LOADER_STACK_INLINE;

    result = run(&L);

    pop_n(&L, L.size);
    if (L.stack != L.inline_stack) {
        PyMem_Free(L.stack);
    }
    Py_DECREF(L.LoadError);
    return result;
}
