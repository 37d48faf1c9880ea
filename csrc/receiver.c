/*
 * receiver.c - Engine.run_receiver(): read frames from rfd and deliver
 * them.  The loop blocks in read() without the GIL, then, with the GIL,
 * delivers every complete frame in its buffer in order while holding the
 * caller's dispatch lock once per batch: CHANNEL_DATA for a routed
 * channel straight to its ChannelQueue (in C) or callable, everything
 * else to dispatch().  A DATA payload that is one big bytes object is
 * read straight into that object (see doc/internals.rst, "The receiver
 * loop").
 */
#include "engine.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>

/* Receive buffer: first size, and the size above which an emptied buffer
   shrinks back. */
#define RBUF_SIZE ((size_t)256 * 1024)
#define KEEP_RBUF ((size_t)1 << 20)
/* A DATA frame whose payload is one bytes object of at least this size
   is read straight into that bytes object. */
#define BIG_DIRECT ((int32_t)64 * 1024)
/* Recently delivered big bytes objects the receiver keeps, so that one
   the consumer has dropped again can take the next payload of the same
   size: its pages are mapped and warm, where a fresh 1 MiB allocation
   costs page faults (and glibc's arena trimming makes them recur).
   Only objects up to RECYCLE_MAX are kept, and all are let go as soon
   as the stream goes idle. */
#define RECYCLE_SLOTS 4
#define RECYCLE_MAX ((Py_ssize_t)16 << 20)
/* No data for this long means idle. */
#define SPARE_IDLE_MS 10

typedef struct {
    EngineObject *self;
    exn_module_state *st;
    PyObject *dispatch;         /* borrowed (the caller's arguments) */
    PyObject *factory;          /* borrowed; NULL if None */
    PyObject *callback_error;   /* borrowed */
    PyObject *acquire;          /* owned: lock.acquire */
    PyObject *release;          /* owned: lock.release */
    char *buf;                  /* malloc(); frames in [start, end) */
    size_t start, end, cap;
    PyObject *big;              /* a big 'A' payload being read, or NULL */
    int32_t big_chid;
    size_t big_have;            /* bytes of it read so far */
    int after_big;              /* the last frame was a big payload */
    PyObject *spare[RECYCLE_SLOTS];  /* owned, or NULL: see RECYCLE_MAX */
    int spare_next;             /* the slot to fill next (ring order) */
} receiver_t;

/* Keep a delivered big payload (steals the reference). */
static void
spare_keep(receiver_t *R, PyObject *item)
{
#ifdef Py_GIL_DISABLED
    /* Exclusive ownership can't be read off the refcount there. */
    Py_DECREF(item);
#else
    PyObject *old;

    if (PyBytes_GET_SIZE(item) > RECYCLE_MAX) {
        Py_DECREF(item);
        return;
    }
    old = R->spare[R->spare_next];
    R->spare[R->spare_next] = item;
    R->spare_next = (R->spare_next + 1) % RECYCLE_SLOTS;
    Py_XDECREF(old);
#endif
}

/* A kept bytes object of exactly n bytes that nobody else references
   any more, made fresh (its cached hash forgotten), or NULL.  Kept
   objects nobody references but of another size are freed. */
static PyObject *
spare_take(receiver_t *R, Py_ssize_t n)
{
    PyObject *found = NULL;
    int i;

    for (i = 0; i < RECYCLE_SLOTS; i++) {
        PyObject *o = R->spare[i];
        if (o == NULL || Py_REFCNT(o) != 1) {
            continue;
        }
        R->spare[i] = NULL;
        if (found == NULL && PyBytes_GET_SIZE(o) == n) {
            found = o;
        }
        else {
            Py_DECREF(o);
        }
    }
    if (found != NULL) {
        /* Only this receiver can reach it now, and its contents are
           about to be replaced: the cached hash must go too. */
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
        ((PyBytesObject *)found)->ob_shash = -1;
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
    }
    return found;
}

static void
spare_clear(receiver_t *R)
{
    int i;

    for (i = 0; i < RECYCLE_SLOTS; i++) {
        Py_CLEAR(R->spare[i]);
    }
}

static int
spare_any(receiver_t *R)
{
    int i;

    for (i = 0; i < RECYCLE_SLOTS; i++) {
        if (R->spare[i] != NULL) {
            return 1;
        }
    }
    return 0;
}

/* With an exception set: if it is a DataFormatError, take it as the
   reason the loop ends (*reason, return 1); else leave it set for
   run_receiver to propagate (return -1). */
static int
error_or_reason(receiver_t *R, PyObject **reason)
{
    if (R->st->DataFormatError != NULL
        && PyErr_ExceptionMatches(R->st->DataFormatError)) {
        *reason = exn_fetch_exception();
        return *reason != NULL ? 1 : -1;
    }
    return -1;
}

/* End the loop with a new `cls(message)` instance as the reason. */
static int
stop_with(PyObject **reason, PyObject *cls, const char *format, ...)
{
    PyObject *msg;
    va_list vargs;

    va_start(vargs, format);
    msg = PyUnicode_FromFormatV(format, vargs);
    va_end(vargs);
    if (msg == NULL) {
        return -1;
    }
    *reason = PyObject_CallOneArg(cls, msg);
    Py_DECREF(msg);
    return *reason != NULL ? 1 : -1;
}

/* Hand a decoded item to its route target (both owned by the caller).
   0, 1 (stop, *reason set) or -1 (exception to propagate). */
static int
deliver_item(receiver_t *R, int32_t chid, PyObject *target, PyObject *item,
             PyObject **reason)
{
    PyObject *res, *exc, *idobj;

    if (Py_IS_TYPE(target, R->st->ChannelQueueType)) {
        return exn_chanqueue_put(target, item) < 0 ? -1 : 0;
    }
    res = PyObject_CallOneArg(target, item);
    if (res != NULL) {
        Py_DECREF(res);
        return 0;
    }
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;      /* KeyboardInterrupt, SystemExit, ... */
    }
    exc = exn_fetch_exception();
    if (exc == NULL) {
        return -1;
    }
    idobj = PyLong_FromLong(chid);
    if (idobj == NULL) {
        Py_DECREF(exc);
        return -1;
    }
    res = PyObject_CallFunctionObjArgs(R->callback_error, idobj, exc, NULL);
    Py_DECREF(idobj);
    Py_DECREF(exc);
    if (res == NULL) {
        return error_or_reason(R, reason);
    }
    Py_DECREF(res);
    return 0;
}

/* Call dispatch(msgcode, chid, payload).  0, 1 (stop: *reason set, NULL
   meaning "dispatch returned true") or -1. */
static int
call_dispatch(receiver_t *R, int msgcode, int32_t chid, PyObject *payload,
              PyObject **reason)
{
    PyObject *res;
    int truth;

    res = PyObject_CallFunction(R->dispatch, "iiO", msgcode, (int)chid,
                                payload);
    if (res == NULL) {
        return error_or_reason(R, reason);
    }
    truth = PyObject_IsTrue(res);
    Py_DECREF(res);
    if (truth < 0) {
        return error_or_reason(R, reason);
    }
    if (truth) {
        *reason = NULL;
        return 1;
    }
    return 0;
}

/* Deliver one complete frame.  0, 1 (stop, *reason) or -1. */
static int
deliver_frame(receiver_t *R, int msgcode, int32_t chid,
              const char *payload, Py_ssize_t len, PyObject **reason)
{
    PyObject *target = NULL, *item, *bytes;
    int rc;

    if (msgcode == MSG_CHANNEL_DATA) {
        target = exn_route_get(&R->self->routes, chid);
    }
    if (target != NULL) {
        /* The target may be unrouted (and freed) by code that runs while
           we decode or deliver: hold it. */
        Py_INCREF(target);
        item = exn_unserialize_loads(
            R->st, (const unsigned char *)payload, len, R->factory,
            (R->self->py2str ? EXN_STR_PY2_AS_PY3 : 0)
            | (R->self->py3str ? EXN_STR_PY3_AS_PY2 : 0));
        if (item == NULL) {
            Py_DECREF(target);
            return error_or_reason(R, reason);
        }
        rc = deliver_item(R, chid, target, item, reason);
        Py_DECREF(item);
        Py_DECREF(target);
        return rc;
    }
    bytes = PyBytes_FromStringAndSize(payload, len);
    if (bytes == NULL) {
        return -1;
    }
    rc = call_dispatch(R, msgcode, chid, bytes, reason);
    Py_DECREF(bytes);
    return rc;
}

/* Deliver the big 'A' payload read straight into R->big (its 'Q' has
   been checked).  0, 1 or -1. */
static int
deliver_big(receiver_t *R, PyObject **reason)
{
    PyObject *item = R->big, *target, *payload;
    int32_t chid = R->big_chid;
    Py_ssize_t n;
    int rc;

    R->big = NULL;
    R->after_big = 1;
    target = exn_route_get(&R->self->routes, chid);
    if (target != NULL) {
        Py_INCREF(target);
        rc = deliver_item(R, chid, target, item, reason);
        Py_DECREF(target);
        spare_keep(R, item);
        return rc;
    }
    /* Not routed (any more): dispatch wants the payload bytes back. */
    n = PyBytes_GET_SIZE(item);
    payload = PyBytes_FromStringAndSize(NULL, n + A_OVERHEAD);
    if (payload == NULL) {
        Py_DECREF(item);
        return -1;
    }
    {
        char *p = PyBytes_AS_STRING(payload);
        p[0] = 'A';
        exn_put_be32((unsigned char *)p + 1, (uint32_t)n);
        memcpy(p + A_PREFIX, PyBytes_AS_STRING(item), (size_t)n);
        p[A_PREFIX + n] = 'Q';
    }
    Py_DECREF(item);
    rc = call_dispatch(R, MSG_CHANNEL_DATA, chid, payload, reason);
    Py_DECREF(payload);
    return rc;
}

/* Call lock.acquire() or lock.release() (`meth`), keeping an exception
   that is already set.  0, or -1 with an exception set. */
static int
call_lock(PyObject *meth)
{
    PyObject *exc = PyErr_Occurred() ? exn_fetch_exception() : NULL;
    PyObject *res = PyObject_CallNoArgs(meth);

    if (exc != NULL) {
        if (res == NULL) {
            PyErr_Clear();
        }
        Py_XDECREF(res);
        exn_restore_exception(exc);
        return -1;
    }
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

/* Deliver every complete frame in the buffer (and a finished big
   payload), in order, holding the dispatch lock once for the batch.
   0 (need more data), 1 (stop, *reason set) or -1. */
static int
deliver_batch(receiver_t *R, PyObject **reason)
{
    int locked = 0, rc = 0;

    for (;;) {
        const unsigned char *p = (const unsigned char *)R->buf + R->start;
        size_t avail = R->end - R->start;
        int msgcode;
        int32_t chid, len;

        if (R->big != NULL) {
            if (R->big_have < (size_t)PyBytes_GET_SIZE(R->big)
                || avail == 0) {
                break;
            }
            if (p[0] != 'Q') {
                rc = stop_with(reason, R->st->LoadError,
                               "bytes payload of channel %d not followed "
                               "by the STOP opcode", (int)R->big_chid);
                break;
            }
            R->start++;
            if (!locked && call_lock(R->acquire) < 0) {
                rc = -1;
                break;
            }
            locked = 1;
            rc = deliver_big(R, reason);
            if (rc != 0) {
                break;
            }
            continue;
        }
        if (avail < EXN_FRAME_HEADER_SIZE) {
            break;
        }
        msgcode = (signed char)p[0];
        chid = exn_get_be32s(p + 1);
        len = exn_get_be32s(p + 5);
        if (len < 0) {
            rc = stop_with(reason, R->st->LoadError,
                           "negative frame length %d", (int)len);
            break;
        }
        if (avail - EXN_FRAME_HEADER_SIZE < (size_t)len) {
            break;
        }
        R->start += EXN_FRAME_HEADER_SIZE + (size_t)len;
        if (!locked && call_lock(R->acquire) < 0) {
            rc = -1;
            break;
        }
        locked = 1;
        rc = deliver_frame(R, msgcode, chid,
                           (const char *)p + EXN_FRAME_HEADER_SIZE, len,
                           reason);
        if (rc != 0) {
            break;
        }
    }
    if (locked && call_lock(R->release) < 0) {
        if (rc == 1) {
            Py_CLEAR(*reason);
        }
        rc = -1;
    }
    return rc;
}

/* After a batch: if the incomplete frame at the start of the buffer is a
   big DATA frame holding one bytes object, allocate that object and
   continue reading into it directly.  0, or -1 with MemoryError. */
static int
maybe_start_big(receiver_t *R)
{
    const unsigned char *p = (const unsigned char *)R->buf + R->start;
    size_t avail = R->end - R->start, have;
    int32_t len, n;

    if (R->big != NULL || avail < EXN_FRAME_HEADER_SIZE + A_PREFIX) {
        return 0;
    }
    len = exn_get_be32s(p + 5);
    if (p[0] != MSG_CHANNEL_DATA || len < BIG_DIRECT + A_OVERHEAD
        || p[EXN_FRAME_HEADER_SIZE] != 'A') {
        return 0;
    }
    n = exn_get_be32s(p + EXN_FRAME_HEADER_SIZE + 1);
    if (n != len - A_OVERHEAD) {
        return 0;
    }
    R->big = spare_take(R, n);
    if (R->big != NULL) {
        R->self->recycled++;
    }
    else {
        R->big = PyBytes_FromStringAndSize(NULL, n);
        if (R->big == NULL) {
            return -1;
        }
    }
    R->big_chid = exn_get_be32s(p + 1);
    have = avail - (EXN_FRAME_HEADER_SIZE + A_PREFIX);
    if (have > (size_t)n) {
        have = (size_t)n;
    }
    memcpy(PyBytes_AS_STRING(R->big), p + EXN_FRAME_HEADER_SIZE + A_PREFIX,
           have);
    R->big_have = have;
    R->start += EXN_FRAME_HEADER_SIZE + A_PREFIX + have;
    return 0;
}

/* Make room to read: compact the buffer, grow it when a frame fills it
   (only as its bytes arrive, so a hostile length costs nothing), shrink
   it back when empty.  0, or -1 with MemoryError. */
static int
prepare_read(receiver_t *R)
{
    size_t avail = R->end - R->start;

    if (avail == 0 && R->cap > KEEP_RBUF) {
        char *p;
        /* Empty: rewind first, so no offset points past the smaller
           buffer. */
        R->start = R->end = 0;
        p = realloc(R->buf, RBUF_SIZE);
        if (p != NULL) {
            R->buf = p;
            R->cap = RBUF_SIZE;
        }
    }
    if (R->start > 0) {
        memmove(R->buf, R->buf + R->start, avail);
        R->start = 0;
        R->end = avail;
    }
    if (R->end == R->cap) {
        /* A whole buffer of one incomplete frame (the header is in). */
        size_t want = EXN_FRAME_HEADER_SIZE
                      + (size_t)exn_get_be32s((unsigned char *)R->buf + 5);
        size_t newcap = R->cap * 2;
        char *p;
        if (newcap > want) {
            newcap = want;
        }
        p = realloc(R->buf, newcap);
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        R->buf = p;
        R->cap = newcap;
    }
    return 0;
}

/* Read more: into the big payload if one is in progress, else into the
   buffer; the GIL is released while read() blocks.  0 (got data), 1
   (stop: *reason is the EOFError/OSError) or -1 (a signal handler
   raised). */
static int
read_more(receiver_t *R, PyObject **reason)
{
    ssize_t n;
    int saved_errno = 0, rfd = R->self->rfd;

    for (;;) {
        if (R->big != NULL && R->big_have < (size_t)PyBytes_GET_SIZE(R->big)) {
            char *dst = PyBytes_AS_STRING(R->big);
            size_t want = (size_t)PyBytes_GET_SIZE(R->big);
            size_t have = R->big_have;
            int r;
            /* Nobody else sees R->big yet: fill it without the GIL. */
            Py_BEGIN_ALLOW_THREADS
            r = exn_fdio_read_full(rfd, dst, want, &have);
            saved_errno = errno;
            Py_END_ALLOW_THREADS
            R->big_have = have;
            n = r == 0 ? 1 : r == 1 ? 0 : -1;
        }
        else {
            size_t room;
            if (prepare_read(R) < 0) {
                return -1;
            }
            room = R->cap - R->end;
            if (R->big != NULL) {
                /* Its bytes are in: read its STOP opcode and no further
                   than the header of what follows (see below). */
                room = 1 + EXN_FRAME_HEADER_SIZE + A_PREFIX;
            }
            else if (R->end == R->start) {
                if (spare_any(R)) {
                    int r;
                    /* Wait a moment for more: a sender between two
                       payloads is not idle. */
                    Py_BEGIN_ALLOW_THREADS
                    r = exn_fdio_poll(rfd, POLLIN, SPARE_IDLE_MS);
                    Py_END_ALLOW_THREADS
                    if (r == 0) {
                        /* The stream is idle: let go of kept payloads. */
                        spare_clear(R);
                    }
                }
                if (R->after_big) {
                    /* Another big payload may follow: read only as far
                       as its header, so that its bytes are read straight
                       into their object and not copied there. */
                    R->after_big = 0;
                    room = EXN_FRAME_HEADER_SIZE + A_PREFIX;
                }
            }
            if (room > R->cap - R->end) {
                room = R->cap - R->end;
            }
            /* Block in read() without the GIL: the senders need it. */
            Py_BEGIN_ALLOW_THREADS
            n = exn_fdio_read(rfd, R->buf + R->end, room);
            saved_errno = errno;
            Py_END_ALLOW_THREADS
            if (n > 0) {
                R->end += (size_t)n;
            }
        }
        if (n > 0) {
            return 0;
        }
        if (n == 0) {
            size_t avail = R->end - R->start;
            if (R->big == NULL && avail == 0) {
                return stop_with(reason, PyExc_EOFError,
                                 "connection closed");
            }
            if (R->big == NULL && avail < EXN_FRAME_HEADER_SIZE) {
                return stop_with(reason, PyExc_EOFError,
                                 "connection closed inside a frame header");
            }
            return stop_with(reason, PyExc_EOFError,
                             "connection closed inside a frame");
        }
        if (saved_errno == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                return -1;
            }
            continue;
        }
        if (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK) {
            int r;
            Py_BEGIN_ALLOW_THREADS
            r = exn_fdio_poll(rfd, POLLIN, -1);
            Py_END_ALLOW_THREADS
            (void)r;
            continue;
        }
        errno = saved_errno;
        PyErr_SetFromErrno(PyExc_OSError);
        *reason = exn_fetch_exception();
        return *reason != NULL ? 1 : -1;
    }
}

const char exn_run_receiver_doc[] = PyDoc_STR(
"run_receiver($self, dispatch, channel_factory, callback_error, lock, /)\n"
"--\n"
"\n"
"Read and deliver frames until EOF, an error, or dispatch() returns\n"
"true.  CHANNEL_DATA for a routed channel goes to its ChannelQueue or\n"
"callable (callback_error(channelid, exc) when that raises an\n"
"Exception); every other frame to dispatch(msgcode, channelid,\n"
"payload).  lock is held while a batch is delivered.  Returns the reason\n"
"the loop ended as an exception instance (EOFError, LoadError, OSError),\n"
"or None after dispatch() returned true.");

PyObject *
exn_engine_run_receiver(EngineObject *self, PyObject *const *args,
                    Py_ssize_t nargs)
{
    receiver_t R;
    PyObject *reason = NULL;
    PyObject *module;
    int rc;

    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError,
                     "run_receiver() takes exactly 4 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    if (self->receiving) {
        PyErr_SetString(PyExc_RuntimeError,
                        "run_receiver() is already running");
        return NULL;
    }
    memset(&R, 0, sizeof(R));
    /* Keep the module (its state) alive while the loop runs. */
    module = Py_NewRef(self->module);
    R.self = self;
    R.st = exn_state(module);
    if (exn_state_check_configured(R.st) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    R.dispatch = args[0];
    R.factory = args[1] == Py_None ? NULL : args[1];
    R.callback_error = args[2];
    R.acquire = PyObject_GetAttr(args[3], R.st->str_acquire);
    R.release = R.acquire ? PyObject_GetAttr(args[3], R.st->str_release)
                          : NULL;
    R.buf = malloc(RBUF_SIZE);
    R.cap = RBUF_SIZE;
    if (R.release == NULL || R.buf == NULL) {
        if (R.buf == NULL && !PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        rc = -1;
        goto done;
    }
    self->receiving = 1;
    for (;;) {
        rc = deliver_batch(&R, &reason);
        if (rc != 0) {
            break;
        }
        if (maybe_start_big(&R) < 0) {
            rc = -1;
            break;
        }
        rc = read_more(&R, &reason);
        if (rc != 0) {
            break;
        }
    }
    self->receiving = 0;

done:
    Py_XDECREF(R.big);
    spare_clear(&R);
    free(R.buf);
    Py_XDECREF(R.acquire);
    Py_XDECREF(R.release);
    Py_DECREF(module);
    if (rc < 0) {
        return NULL;
    }
    if (reason == NULL) {
        Py_RETURN_NONE;
    }
    return reason;
}

