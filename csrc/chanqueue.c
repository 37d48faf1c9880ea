/*
 * chanqueue.c - execnet._execnet.ChannelQueue: the per-channel FIFO of
 * received items that ends, once, with a close.  It mirrors the pure
 * gateway_base.ChannelQueue (same methods, results and exceptions).
 *
 * Locking.  Every field is read and written only with the GIL held; the
 * GIL is the queue's mutex (no method releases it between looking at the
 * state and changing it, and no Python code runs in between).  Waiting
 * happens without the GIL on two PyThread locks used as semaphores, the
 * scheme of CPython's _queue.SimpleQueue:
 *
 *   lock         the getters' baton.  Held on behalf of waiting getters
 *                (`locked` says so) while the queue is empty and open.
 *                put() and close() release it; a getter that wakes up
 *                takes it, and passes it on (releases it) when it leaves
 *                something behind for the next getter: more items, or the
 *                close.  So any number of getters wait at once, and a
 *                close wakes them all, one after the other.
 *   closed_lock  an event: held from creation until close() releases it.
 *                wait_closed() waiters take it and give it back at once.
 *
 * Waits use PyThread_acquire_lock_timed(..., intr_flag=1) against a
 * monotonic deadline; on PY_LOCK_INTR the GIL is taken back, signal
 * handlers run (PyErr_CheckSignals: Ctrl-C in the main thread raises
 * KeyboardInterrupt) and the wait goes on with the time left, as
 * _thread.lock.acquire() does.
 */
#include "_execnet.h"

#include <math.h>
#include <time.h>

/* Longest single lock wait; longer timeouts wait in slices.  Keeps the
   microsecond count far below any platform's PY_TIMEOUT_MAX. */
#define MAX_WAIT_US ((PY_TIMEOUT_T)3600 * 1000000)

/* Smallest ring buffer, and the size above which an emptied queue gives
   its ring back. */
#define MIN_RING 8
#define KEEP_RING 1024

typedef struct {
    PyObject_HEAD
    PyObject **ring;        /* cap slots; owned references */
    Py_ssize_t head;        /* slot of the oldest item */
    Py_ssize_t count;       /* items queued */
    Py_ssize_t cap;         /* 0 or a power of two */
    int closed;
    int locked;             /* `lock` is held on behalf of the getters */
    PyThread_type_lock lock;
    PyThread_type_lock closed_lock;
} ChannelQueueObject;

/* ------------------------------------------------------------------ */
/* Time                                                                */
/* ------------------------------------------------------------------ */

/* Monotonic clock in nanoseconds. */
static int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Parse a timeout argument (NULL/None: no limit, else seconds as a real
   number).  Sets *timed and, if timed, *deadline (now_ns() based).
   0, or -1 with an exception set. */
static int
parse_timeout(PyObject *timeout, int *timed, int64_t *deadline)
{
    double secs;

    *timed = 0;
    *deadline = 0;
    if (timeout == NULL || timeout == Py_None) {
        return 0;
    }
    secs = PyFloat_AsDouble(timeout);
    if (secs == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    if (isnan(secs)) {
        PyErr_SetString(PyExc_ValueError, "timeout must not be NaN");
        return -1;
    }
    if (secs > 1e9) {
        return 0;           /* 30 years: as good as no limit */
    }
    *timed = 1;
    *deadline = now_ns() + (secs > 0 ? (int64_t)(secs * 1e9) : 0);
    return 0;
}

/* get() refuses a negative timeout, whether or not it would wait, as
   queue.Queue.get() does (and so stock execnet's receive()).  0, or -1
   with ValueError (or the TypeError of a non-number). */
static int
check_not_negative(PyObject *timeout)
{
    double secs = PyFloat_AsDouble(timeout);

    if (secs == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    if (secs < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "'timeout' must be a non-negative number");
        return -1;
    }
    return 0;
}

/* Microseconds to wait in the next lock wait: -1 without a limit, else
   the time left (rounded up, at least 0), at most MAX_WAIT_US. */
static PY_TIMEOUT_T
wait_us(int timed, int64_t deadline)
{
    int64_t left;
    if (!timed) {
        return -1;
    }
    left = deadline - now_ns();
    if (left <= 0) {
        return 0;
    }
    left = (left + 999) / 1000;
    return left > MAX_WAIT_US ? MAX_WAIT_US : (PY_TIMEOUT_T)left;
}

/* Block on `lock` with the GIL released for at most `us` microseconds
   (-1: no limit).  Returns PY_LOCK_ACQUIRED, PY_LOCK_FAILURE (time is
   up), or PY_LOCK_INTR after signal handlers ran without raising; -1
   with the handlers' exception set. */
static int
wait_lock(PyThread_type_lock lock, PY_TIMEOUT_T us)
{
    PyLockStatus r;

    if (us == 0) {
        return PY_LOCK_FAILURE;
    }
    /* Release the GIL: the wait may take long, and the putter needs it. */
    Py_BEGIN_ALLOW_THREADS
    r = PyThread_acquire_lock_timed(lock, us, 1);
    Py_END_ALLOW_THREADS
    if (r == PY_LOCK_INTR && PyErr_CheckSignals() < 0) {
        return -1;
    }
    return (int)r;
}

/* ------------------------------------------------------------------ */
/* Ring buffer                                                         */
/* ------------------------------------------------------------------ */

/* Double the ring (or make the first one).  0, or -1 with MemoryError. */
static int
ring_grow(ChannelQueueObject *q)
{
    Py_ssize_t newcap = q->cap ? q->cap * 2 : MIN_RING;
    PyObject **ring;

    if (newcap > PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(PyObject *)) {
        PyErr_NoMemory();
        return -1;
    }
    ring = PyMem_Malloc((size_t)newcap * sizeof(PyObject *));
    if (ring == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    /* Unwrap: the oldest item goes to slot 0. */
    for (Py_ssize_t i = 0; i < q->count; i++) {
        ring[i] = q->ring[(q->head + i) & (q->cap - 1)];
    }
    PyMem_Free(q->ring);
    q->ring = ring;
    q->head = 0;
    q->cap = newcap;
    return 0;
}

/* Remove and return the oldest item (a reference the caller owns); the
   queue must not be empty. */
static PyObject *
ring_pop(ChannelQueueObject *q)
{
    PyObject *item = q->ring[q->head];
    q->ring[q->head] = NULL;
    q->head = (q->head + 1) & (q->cap - 1);
    q->count--;
    if (q->count == 0) {
        q->head = 0;
    }
    return item;
}

/* An empty queue gives a big ring back, so a burst does not pin memory. */
static void
ring_trim(ChannelQueueObject *q)
{
    if (q->count == 0 && q->cap > KEEP_RING) {
        PyMem_Free(q->ring);
        q->ring = NULL;
        q->cap = 0;
        q->head = 0;
    }
}

/* ------------------------------------------------------------------ */
/* C API                                                               */
/* ------------------------------------------------------------------ */

int
exn_chanqueue_put(PyObject *op, PyObject *item)
{
    ChannelQueueObject *q = (ChannelQueueObject *)op;

    if (q->closed) {
        return 0;
    }
    if (q->count == q->cap && ring_grow(q) < 0) {
        return -1;
    }
    q->ring[(q->head + q->count) & (q->cap - 1)] = Py_NewRef(item);
    q->count++;
    if (q->locked) {
        /* A getter waits (or will look again): hand it the baton. */
        q->locked = 0;
        PyThread_release_lock(q->lock);
    }
    return 1;
}

/* ------------------------------------------------------------------ */
/* Methods                                                             */
/* ------------------------------------------------------------------ */

/* __new__: ChannelQueue() takes no arguments.  New reference or NULL. */
static PyObject *
chanqueue_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    ChannelQueueObject *self;

    if (PyTuple_GET_SIZE(args) != 0
        || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "ChannelQueue() takes no arguments");
        return NULL;
    }
    self = (ChannelQueueObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->lock = PyThread_allocate_lock();
    self->closed_lock = PyThread_allocate_lock();
    if (self->lock == NULL || self->closed_lock == NULL) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_MemoryError, "cannot allocate lock");
        return NULL;
    }
    /* Held until close(): wait_closed() blocks on it. */
    (void)PyThread_acquire_lock(self->closed_lock, NOWAIT_LOCK);
    return (PyObject *)self;
}

PyDoc_STRVAR(put_doc,
"put($self, item, /)\n"
"--\n"
"\n"
"Append item; return False (dropping it) if the queue is closed.");

static PyObject *
chanqueue_put(ChannelQueueObject *self, PyObject *item)
{
    int r = exn_chanqueue_put((PyObject *)self, item);
    if (r < 0) {
        return NULL;
    }
    return PyBool_FromLong(r);
}

PyDoc_STRVAR(close_doc,
"close($self, /)\n"
"--\n"
"\n"
"Mark the end; return False if the queue was closed already.");

static PyObject *
chanqueue_close(ChannelQueueObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->closed) {
        Py_RETURN_FALSE;
    }
    self->closed = 1;
    PyThread_release_lock(self->closed_lock);
    if (self->locked) {
        /* Wake the getters; each passes the baton on. */
        self->locked = 0;
        PyThread_release_lock(self->lock);
    }
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(is_closed_doc,
"is_closed($self, /)\n"
"--\n"
"\n"
"True once close() was called.");

static PyObject *
chanqueue_is_closed(ChannelQueueObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->closed);
}

PyDoc_STRVAR(drain_doc,
"drain($self, /)\n"
"--\n"
"\n"
"Remove and return every queued item, as a list.");

static PyObject *
chanqueue_drain(ChannelQueueObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = PyList_New(self->count);
    Py_ssize_t i = 0;

    if (list == NULL) {
        return NULL;
    }
    /* Move the references; nothing runs Python code in between. */
    while (self->count > 0) {
        PyList_SET_ITEM(list, i++, ring_pop(self));
    }
    ring_trim(self);
    return list;
}

/* Parse the optional `timeout` argument of get()/wait_closed() into
   *timeout (borrowed, NULL if absent).  0, or -1 with TypeError. */
static int
parse_timeout_arg(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                  PyObject *kwnames, PyObject **timeout)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;

    *timeout = NULL;
    if (nargs + nkw > 1) {
        PyErr_Format(PyExc_TypeError,
                     "%s() takes at most 1 argument (%zd given)", fname,
                     nargs + nkw);
        return -1;
    }
    if (nargs == 1) {
        *timeout = args[0];
    }
    else if (nkw == 1) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, 0);
        if (PyUnicode_CompareWithASCIIString(key, "timeout") != 0) {
            PyErr_Format(PyExc_TypeError,
                         "%s() got an unexpected keyword argument '%U'",
                         fname, key);
            return -1;
        }
        *timeout = args[0];
    }
    return 0;
}

/* Raise the configured TimeoutError: "no item after <timeout!r> seconds". */
static void
raise_timeout(ChannelQueueObject *self, PyObject *timeout)
{
    exn_module_state *st = exn_state_by_type(Py_TYPE(self));
    PyObject *cls;

    if (st == NULL) {
        return;
    }
    cls = st->TimeoutError ? st->TimeoutError : PyExc_TimeoutError;
    PyErr_Format(cls, "no item after %R seconds", timeout);
}

PyDoc_STRVAR(get_doc,
"get($self, /, timeout=None)\n"
"--\n"
"\n"
"Return the next item.  Once the queue is closed and empty raise\n"
"EOFError; raise TimeoutError if timeout seconds pass first.  Waits\n"
"without the GIL; Ctrl-C interrupts the wait in the main thread.");

static PyObject *
chanqueue_get(ChannelQueueObject *self, PyObject *const *args,
              Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *timeout;

    if (parse_timeout_arg("get", args, nargs, kwnames, &timeout) < 0) {
        return NULL;
    }
    return exn_chanqueue_get((PyObject *)self, timeout);
}

PyObject *
exn_chanqueue_get(PyObject *op, PyObject *timeout)
{
    ChannelQueueObject *self = (ChannelQueueObject *)op;
    PyObject *item;
    int64_t deadline;
    int timed;

    if (timeout != NULL && timeout != Py_None && check_not_negative(timeout) < 0) {
        return NULL;
    }
    if (self->count == 0 && !self->closed) {
        if (parse_timeout(timeout, &timed, &deadline) < 0) {
            return NULL;
        }
        while (self->count == 0 && !self->closed) {
            /* Take the baton without waiting if it is free, else wait for
               a put()/close() to hand it over. */
            int r = PyThread_acquire_lock_timed(self->lock, 0, 0);
            if (r != PY_LOCK_ACQUIRED) {
                PY_TIMEOUT_T us = wait_us(timed, deadline);
                if (us == 0) {
                    raise_timeout(self, timeout);
                    return NULL;
                }
                r = wait_lock(self->lock, us);
                if (r < 0) {
                    return NULL;
                }
                if (r != PY_LOCK_ACQUIRED) {
                    continue;   /* interrupted or a slice ended: re-check */
                }
            }
            self->locked = 1;
        }
    }
    item = self->count > 0 ? ring_pop(self) : NULL;
    if (self->locked && (self->count > 0 || self->closed)) {
        /* Something is left for the next getter: pass the baton on. */
        self->locked = 0;
        PyThread_release_lock(self->lock);
    }
    if (item == NULL) {
        PyErr_SetNone(PyExc_EOFError);
    }
    else {
        ring_trim(self);
    }
    return item;
}

PyDoc_STRVAR(wait_closed_doc,
"wait_closed($self, /, timeout=None)\n"
"--\n"
"\n"
"Wait until the queue is closed; return False if timeout seconds pass\n"
"first.");

static PyObject *
chanqueue_wait_closed(ChannelQueueObject *self, PyObject *const *args,
                      Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *timeout;
    int64_t deadline;
    int timed;

    if (parse_timeout_arg("wait_closed", args, nargs, kwnames,
                          &timeout) < 0) {
        return NULL;
    }
    if (self->closed) {
        Py_RETURN_TRUE;
    }
    if (parse_timeout(timeout, &timed, &deadline) < 0) {
        return NULL;
    }
    while (!self->closed) {
        int r = wait_lock(self->closed_lock, wait_us(timed, deadline));
        if (r < 0) {
            return NULL;
        }
        if (r == PY_LOCK_ACQUIRED) {
            /* An event: let the next waiter through too. */
            PyThread_release_lock(self->closed_lock);
            Py_RETURN_TRUE;
        }
        if (r == PY_LOCK_FAILURE && wait_us(timed, deadline) == 0) {
            return PyBool_FromLong(self->closed);
        }
    }
    Py_RETURN_TRUE;
}

static Py_ssize_t
chanqueue_len(ChannelQueueObject *self)
{
    return self->count;
}

/* ------------------------------------------------------------------ */
/* GC and lifetime                                                     */
/* ------------------------------------------------------------------ */

static int
chanqueue_traverse(ChannelQueueObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    for (Py_ssize_t i = 0; i < self->count; i++) {
        Py_VISIT(self->ring[(self->head + i) & (self->cap - 1)]);
    }
    return 0;
}

/* Drop the items.  The ring is detached first: a __del__ run by a
   decref may use this queue again. */
static int
chanqueue_clear(ChannelQueueObject *self)
{
    PyObject **ring = self->ring;
    Py_ssize_t head = self->head, count = self->count, cap = self->cap;

    self->ring = NULL;
    self->head = self->count = self->cap = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_DECREF(ring[(head + i) & (cap - 1)]);
    }
    PyMem_Free(ring);
    return 0;
}

static void
chanqueue_dealloc(ChannelQueueObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);

    PyObject_GC_UnTrack(self);
    (void)chanqueue_clear(self);
    /* Unlock before freeing, as _thread.lock does. */
    if (self->lock != NULL) {
        if (self->locked) {
            PyThread_release_lock(self->lock);
        }
        PyThread_free_lock(self->lock);
    }
    if (self->closed_lock != NULL) {
        if (!self->closed) {
            PyThread_release_lock(self->closed_lock);
        }
        PyThread_free_lock(self->closed_lock);
    }
    PyMem_Free(self->ring);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* ------------------------------------------------------------------ */
/* Type                                                                */
/* ------------------------------------------------------------------ */

static PyMethodDef chanqueue_methods[] = {
    {"put", (PyCFunction)chanqueue_put, METH_O, put_doc},
    {"close", (PyCFunction)chanqueue_close, METH_NOARGS, close_doc},
    {"is_closed", (PyCFunction)chanqueue_is_closed, METH_NOARGS,
     is_closed_doc},
    {"drain", (PyCFunction)chanqueue_drain, METH_NOARGS, drain_doc},
    {"get", (PyCFunction)(void (*)(void))chanqueue_get,
     METH_FASTCALL | METH_KEYWORDS, get_doc},
    {"wait_closed", (PyCFunction)(void (*)(void))chanqueue_wait_closed,
     METH_FASTCALL | METH_KEYWORDS, wait_closed_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(chanqueue_doc,
"ChannelQueue()\n"
"--\n"
"\n"
"FIFO of received items that ends, once, with a close.\n"
"\n"
"get(timeout) returns the next item; once the queue is closed and empty\n"
"it raises EOFError; TimeoutError when timeout passes first.");

static PyType_Slot chanqueue_slots[] = {
    {Py_tp_doc, (void *)chanqueue_doc},
    {Py_tp_new, chanqueue_new},
    {Py_tp_dealloc, chanqueue_dealloc},
    {Py_tp_traverse, chanqueue_traverse},
    {Py_tp_clear, chanqueue_clear},
    {Py_tp_methods, chanqueue_methods},
    {Py_sq_length, chanqueue_len},
    {Py_mp_length, chanqueue_len},
    {0, NULL},
};

static PyType_Spec chanqueue_spec = {
    .name = "execnet._execnet.ChannelQueue",
    .basicsize = sizeof(ChannelQueueObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC
             | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = chanqueue_slots,
};

int
exn_chanqueue_init(PyObject *m, exn_module_state *st)
{
    st->ChannelQueueType = (PyTypeObject *)PyType_FromModuleAndSpec(
        m, &chanqueue_spec, NULL);
    if (st->ChannelQueueType == NULL) {
        return -1;
    }
    return PyModule_AddType(m, st->ChannelQueueType);
}
