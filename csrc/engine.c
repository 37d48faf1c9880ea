/*
 * engine.c - execnet._execnet.Engine: frames over a (read fd, write fd)
 * pair.  Mirrors the pure gateway_base._Engine: send(), close_write(),
 * set_route(), clear_route(), py2str_as_py3str, py3str_as_py2str,
 * run_receiver().
 *
 * Send side (see doc/internals.rst for the full story).
 *
 *   mu        a pthread mutex held for short spells only.  Guards `fill`
 *             (the frames waiting to be written), `spare`, the flags and
 *             the writer role's state.  A sender serializes its object
 *             straight into `fill` while holding mu (and the GIL), then
 *             patches the frame header.  With the GIL held mu is only
 *             try-locked; a thread that must block on it releases the GIL
 *             first.  So no thread holds the GIL while it waits for mu,
 *             and the two cannot deadlock.
 *   the writer role  `writer_active` (under mu).  Its holder -- "the
 *             writer" -- takes `fill` (swapping in an empty buffer) under
 *             mu and writes it with the GIL released, again and again
 *             until it finds `fill` empty, under mu, and only then gives
 *             the role up (and, after close_write(), closes the fd).
 *   role_sem  a PyThread lock used as a semaphore, for the threads that
 *             must wait for the role (`role_waiters` of them): a writer
 *             that ends while some wait hands the role over by releasing
 *             role_sem instead of clearing writer_active.  Waiting on it
 *             is interruptible (PY_LOCK_INTR) and GIL-free.
 *
 * A sender appends under mu, then looks at the role (under mu).  If it is
 * free, the sender takes it and writes (its frame and whatever others
 * appended meanwhile); if not, the writer is bound to see the frame before
 * giving the role up, so send() returns at once: small sends from many
 * threads coalesce into one write().  A sender that finds more than
 * HIGH_WATER bytes pending waits for the role instead (backpressure), so
 * `fill` stays bounded.  A bytes object of BIG_BYTES or more is not
 * copied: its sender waits for the role and writes the pending frames and
 * the frame header with writev(), the object's own buffer with vmsplice()
 * when wfd is a pipe (writev() otherwise; the object is then held until
 * the peer surely read its pages, see "Zero-copy big bytes"), and the
 * final 'Q'.
 *
 * Deferred writes.  A lone thread sending a stream of small messages
 * would pay one write() -- and usually a wake-up of the peer's reader --
 * per message.  So, on an engine with batch_bursts set (gateways set it;
 * a bare Engine has it off; doc/internals.rst says what guards the data
 * it leaves pending at exit), when the role is
 * free but the previous frame was appended less than DEFER_NS ago, the
 * sender hands the role to the engine's flusher (a plain pthread,
 * started on the first such burst, that never touches Python objects)
 * and returns; the sends that follow find the role taken and just
 * append, and the flusher writes them in batches.  Everything else is unchanged: the role still has one holder,
 * the stream order is the append order, close_write() and big sends wait
 * for the role and so for the flusher, and a write error of the flusher
 * is raised by the next send.  A sender spaced further apart (a request
 * and its reply) still writes its frame itself, at once.  The flusher
 * exits after FLUSHER_IDLE_S without work; dealloc stops it.
 *
 * mu is a plain pthread mutex, not a PyThread lock: on Linux every
 * PyThread_acquire_lock*() call reads the monotonic clock to compute a
 * deadline, even for a try-lock, and that was a fifth of a small send.
 *
 * Receive side: run_receiver() is in receiver.c; engine.h holds what
 * the two files share (EngineObject, the route table's types).
 *
 * Without the GIL run only fdio.c functions, the mutex and PyThread lock
 * calls, memcpy/malloc/free on our own buffers.
 */
#include "engine.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <signal.h>
#include <structmember.h>
#include <time.h>


/* A top-level bytes object this big goes out without a copy (vmsplice,
   or writev). */
#define BIG_BYTES ((Py_ssize_t)64 * 1024)
/* Pending bytes above which a sender waits for the writer role. */
#define HIGH_WATER ((size_t)1 << 20)
/* Outgoing buffers bigger than this are freed after use. */
#define KEEP_WBUF ((size_t)4 << 20)
/* A frame appended within this long after the previous one is left to
   the flusher if the role is free (see "Deferred writes" above). */
#define DEFER_NS ((uint64_t)10000)
/* An idle flusher exits after this long. */
#define FLUSHER_IDLE_S 2
/* ------------------------------------------------------------------ */
/* Route table: channel id -> ChannelQueue or callable                */
/* ------------------------------------------------------------------ */

static inline size_t
route_hash(int32_t key, size_t mask)
{
    return ((uint32_t)key * 2654435761u) & mask;
}

/* The slot holding `key`, or the free slot that ends its probe run
   (there must be slots: cap > 0). */
static inline size_t
route_probe(const route_map *m, int32_t key)
{
    size_t mask = m->cap - 1, i;

    for (i = route_hash(key, mask); m->slots[i].target != NULL;
         i = (i + 1) & mask) {
        if (m->slots[i].key == key) {
            break;
        }
    }
    return i;
}

/* The target routed for `key` (borrowed), or NULL. */
PyObject *
exn_route_get(route_map *m, int32_t key)
{
    if (m->count == 0) {
        return NULL;
    }
    return m->slots[route_probe(m, key)].target;
}

/* Resize to `newcap` slots.  0, or -1 with MemoryError. */
static int
route_resize(route_map *m, size_t newcap)
{
    route_slot *old = m->slots;
    size_t oldcap = m->cap;
    route_slot *slots = PyMem_Calloc(newcap, sizeof(route_slot));

    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    m->slots = slots;
    m->cap = newcap;
    for (size_t j = 0; j < oldcap; j++) {
        if (old[j].target != NULL) {
            size_t i = route_hash(old[j].key, newcap - 1);
            while (slots[i].target != NULL) {
                i = (i + 1) & (newcap - 1);
            }
            slots[i] = old[j];
        }
    }
    PyMem_Free(old);
    return 0;
}

/* Route `key` to `target` (a new reference is taken).  Returns the target
   it replaces (a reference the caller must drop, once the map is
   consistent) or NULL; on MemoryError sets *err. */
static PyObject *
route_set(route_map *m, int32_t key, PyObject *target, int *err)
{
    size_t i;

    *err = 0;
    if ((m->count + 1) * 2 > m->cap
        && route_resize(m, m->cap ? m->cap * 2 : 16) < 0) {
        *err = 1;
        return NULL;
    }
    i = route_probe(m, key);
    if (m->slots[i].target != NULL) {
        PyObject *old = m->slots[i].target;
        m->slots[i].target = Py_NewRef(target);
        return old;
    }
    m->slots[i].key = key;
    m->slots[i].target = Py_NewRef(target);
    m->count++;
    return NULL;
}

/* Remove `key`; return its target (a reference the caller must drop) or
   NULL if it was not routed. */
static PyObject *
route_del(route_map *m, int32_t key)
{
    size_t mask, i, j;
    PyObject *old;

    if (m->count == 0) {
        return NULL;
    }
    mask = m->cap - 1;
    i = route_probe(m, key);
    if (m->slots[i].target == NULL) {
        return NULL;
    }
    old = m->slots[i].target;
    m->slots[i].target = NULL;
    m->count--;
    /* Backward shift: move later members of the probe run into the hole
       when their home slot does not lie between the hole and them. */
    for (j = (i + 1) & mask; m->slots[j].target != NULL;
         j = (j + 1) & mask) {
        size_t home = route_hash(m->slots[j].key, mask);
        if (((j - home) & mask) >= ((j - i) & mask)) {
            m->slots[i] = m->slots[j];
            m->slots[j].target = NULL;
            i = j;
        }
    }
    return old;
}

/* Empty the map; the targets' references are dropped after the map is
   detached (a decref may run code that routes again). */
static void
route_clear(route_map *m)
{
    route_slot *slots = m->slots;
    size_t cap = m->cap;

    m->slots = NULL;
    m->cap = 0;
    m->count = 0;
    for (size_t i = 0; i < cap; i++) {
        Py_XDECREF(slots[i].target);
    }
    PyMem_Free(slots);
}

/* ------------------------------------------------------------------ */
/* The object                                                          */
/* ------------------------------------------------------------------ */

/* mu_owner is written by mu's holder only; other threads read it without
   mu just to compare it with their own id, so relaxed atomics do. */
static inline unsigned long
load_owner(unsigned long *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void
store_owner(unsigned long *p, unsigned long v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

/* ------------------------------------------------------------------ */
/* Small helpers                                                       */
/* ------------------------------------------------------------------ */

/* Make room for `n` more bytes in `rb`.  0, or -1 with MemoryError. */
static int
rawbuf_reserve(exn_rawbuf *rb, size_t n)
{
    size_t need, newcap;
    char *p;

    if (rb->cap - rb->len >= n) {
        return 0;
    }
    if (n > (size_t)PY_SSIZE_T_MAX - rb->len) {
        PyErr_NoMemory();
        return -1;
    }
    need = rb->len + n;
    newcap = rb->cap ? rb->cap * 2 : 4096;
    if (newcap < need) {
        newcap = need;
    }
    p = realloc(rb->data, newcap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    rb->data = p;
    rb->cap = newcap;
    return 0;
}

/* Take mu with the GIL held.  Try first; if it is busy, wait with the
   GIL released: the holder may be the writer or a sender that needs the
   GIL to finish (never block on mu while holding the GIL). */
static void
mu_lock(EngineObject *self)
{
    if (pthread_mutex_trylock(&self->mu) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&self->mu);
        Py_END_ALLOW_THREADS
    }
}

static inline void
mu_unlock(EngineObject *self)
{
    pthread_mutex_unlock(&self->mu);
}

/* With mu held: 0 if sends are allowed, else -1 with OSError set. */
static int
check_open(EngineObject *self)
{
    if (self->broken && self->fl_errno != 0) {
        errno = self->fl_errno;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (self->broken) {
        PyErr_SetString(PyExc_OSError,
                        "cannot send: an interrupted write lost data on "
                        "this connection");
        return -1;
    }
    if (self->wclosed) {
        PyErr_SetString(PyExc_OSError, "cannot send (already closed?)");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* The writer                                                          */
/* ------------------------------------------------------------------ */

static int run_writer(EngineObject *self, const struct iovec *extra,
                      int nextra);
static int run_writer_ex(EngineObject *self, const struct iovec *extra,
                         int nextra, int splice_at, uint64_t *splice_end);
static void release_spliced(EngineObject *self);

/* With mu held: take the writer role if it is free (1), else 0. */
static inline int
try_role(EngineObject *self)
{
    if (self->writer_active) {
        return 0;
    }
    self->writer_active = 1;
    self->role_owner = PyThread_get_thread_ident();
    return 1;
}

static uint64_t monotonic_ns(void);

/* Wait for the writer role (GIL held, mu not held) for at most
   `timeout_ns` (< 0: no limit): 0 once it is ours, 1 on timeout, or -1
   with a signal handler's exception set. */
static int
take_role_timed(EngineObject *self, int64_t timeout_ns)
{
    unsigned long me = PyThread_get_thread_ident();
    uint64_t deadline = timeout_ns >= 0 ? monotonic_ns() + (uint64_t)timeout_ns
                                        : 0;

    mu_lock(self);
    if (try_role(self)) {
        mu_unlock(self);
        return 0;
    }
    self->role_waiters++;
    mu_unlock(self);
    for (;;) {
        PyLockStatus r;
        PY_TIMEOUT_T wait_us = -1;
        if (timeout_ns >= 0) {
            uint64_t now = monotonic_ns();
            uint64_t left_us = now >= deadline ? 0 : (deadline - now) / 1000;
            wait_us = left_us > (uint64_t)PY_TIMEOUT_MAX
                          ? (PY_TIMEOUT_T)PY_TIMEOUT_MAX
                          : (PY_TIMEOUT_T)left_us;
        }
        /* The writer may be blocked in write() for long (a full pipe):
           wait without the GIL. */
        Py_BEGIN_ALLOW_THREADS
        r = PyThread_acquire_lock_timed(self->role_sem, wait_us, 1);
        Py_END_ALLOW_THREADS
        if (r == PY_LOCK_ACQUIRED) {
            mu_lock(self);
            self->role_waiters--;
            self->role_owner = me;
            mu_unlock(self);
            return 0;
        }
        if (r == PY_LOCK_FAILURE) {
            /* Timed out -- unless the role was handed over meanwhile. */
            int handed;
            mu_lock(self);
            handed = PyThread_acquire_lock(self->role_sem, NOWAIT_LOCK);
            self->role_waiters--;
            if (handed) {
                self->role_owner = me;
            }
            mu_unlock(self);
            return handed ? 0 : 1;
        }
        if (PyErr_CheckSignals() < 0) {
            PyObject *exc;
            int handed;
            /* Stop waiting -- unless the role was handed to us meanwhile:
               then its duty (writing what is pending) comes first. */
            mu_lock(self);
            self->role_waiters--;
            handed = PyThread_acquire_lock(self->role_sem, NOWAIT_LOCK);
            if (handed) {
                self->role_owner = me;
            }
            mu_unlock(self);
            if (handed) {
                exc = exn_fetch_exception();
                if (run_writer(self, NULL, 0) < 0) {
                    PyErr_Clear();
                }
                exn_restore_exception(exc);
            }
            return -1;
        }
    }
}

/* Wait for the writer role without a time limit: 0, or -1 with a signal
   handler's exception set. */
static int
take_role(EngineObject *self)
{
    return take_role_timed(self, -1);
}

/* Be the writer: called with the GIL and the role held, mu not held.
   Writes `fill` (and first the `nextra` buffers of `extra`, after what
   was pending) until `fill` is empty, then gives the role up, closing the
   fd if close_write() asked for it.  0, or -1 with OSError (write error)
   or a signal handler's exception set.  On a write error pending frames
   are dropped; the next send tries (and fails) again, as the pure engine
   does. */
static int
run_writer(EngineObject *self, const struct iovec *extra, int nextra)
{
    return run_writer_ex(self, extra, nextra, -1, NULL);
}

static inline size_t
iov_bytes(const struct iovec *v, int cnt)
{
    size_t n = 0;
    for (int i = 0; i < cnt; i++) {
        n += v[i].iov_len;
    }
    return n;
}

/* Write the `cnt` buffers at `v` (the role held, the GIL released with
   *ts saved): with vmsplice if `splice` and the engine still may, else
   writev.  Counts what went out in wtotal.  Returns 0, or the errno of a
   write error; a second signal handler exception sets *abort (see
   run_writer_ex). */
static int
write_some(EngineObject *self, struct iovec *v, int cnt, int splice,
           PyThreadState **ts, PyObject **pending_exc, int *abort)
{
    /* Only the role holder stores it. */
    uint64_t total = __atomic_load_n(&self->wtotal, __ATOMIC_RELAXED);

    while (cnt > 0) {
        size_t before = iov_bytes(v, cnt);
        int use_splice = splice && !self->no_splice;
        int rc = use_splice ? exn_fdio_vmsplice_all(self->wfd, &v, &cnt)
                            : exn_fdio_writev_all(self->wfd, &v, &cnt);
        int e = errno;
        size_t after = rc == 0 ? 0 : iov_bytes(v, cnt);

        if (after != before) {
            total += before - after;
            __atomic_store_n(&self->wtotal, total, __ATOMIC_RELEASE);
        }
        if (rc == 0) {
            return 0;
        }
        if (use_splice && (e == EINVAL || e == ENOSYS || e == EBADF)) {
            /* Not a pipe (or no vmsplice): writev from now on. */
            self->no_splice = 1;
            continue;
        }
        if (e == EAGAIN || e == EWOULDBLOCK) {
            /* Not expected (blocking fds), but be correct. */
            if (exn_fdio_poll(self->wfd, POLLOUT, -1) >= 0
                || errno != EINTR) {
                continue;
            }
        }
        else if (e != EINTR) {
            return e;
        }
        /* EINTR: run signal handlers (PEP 475).  A handler that raises
           does not cut the frames short: its exception is kept and raised
           once the batch is out.  A second one aborts: the connection is
           then unusable. */
        PyEval_RestoreThread(*ts);
        if (PyErr_CheckSignals() < 0) {
            if (*pending_exc != NULL) {
                Py_DECREF(*pending_exc);
                *abort = 1;
            }
            *pending_exc = exn_fetch_exception();
        }
        *ts = PyEval_SaveThread();
        if (*abort) {
            return 0;
        }
    }
    return 0;
}

/* A batch in `out` was written: empty it for reuse, or free it if it
   grew too big to keep. */
static void
written_out(exn_rawbuf *out)
{
    out->len = 0;
    if (out->cap > KEEP_WBUF) {
        free(out->data);
        out->data = NULL;
        out->cap = 0;
    }
}

/* The role holder found `fill` empty (mu held, so no sender can append
   unseen in between): close the fd if close_write() asked for it, keep
   the holder's buffer `out` as the spare, and give the role up -- to a
   waiting thread if there is one.  No GIL needed. */
static void
give_up_role(EngineObject *self, exn_rawbuf *out)
{
    if (self->wclosed && !self->fd_closed) {
        /* Unread bytes may be pages of held objects: see engine_dealloc. */
        self->unread_at_close = exn_fdio_unread(self->wfd) != 0;
        (void)exn_fdio_close(self->wfd);
        self->fd_closed = 1;
    }
    if (self->spare.data == NULL) {
        self->spare = *out;
    }
    else {
        free(out->data);
    }
    out->data = NULL;
    out->len = out->cap = 0;
    self->role_owner = 0;
    if (self->role_waiters > 0) {
        /* Hand the role over: writer_active stays set. */
        PyThread_release_lock(self->role_sem);
    }
    else {
        self->writer_active = 0;
    }
}

/* run_writer, and if `splice_at` >= 0, extra[splice_at] (a bytes object's
   buffer) goes out with vmsplice if the engine can.  *splice_end is then
   set, before anything is written, to the stream offset just past the
   payload: the caller must hold the object (see hold_spliced).  It is
   left alone when the engine no longer uses vmsplice. */
static int
run_writer_ex(EngineObject *self, const struct iovec *extra, int nextra,
              int splice_at, uint64_t *splice_end)
{
    exn_rawbuf out = {NULL, 0, 0};
    PyObject *pending_exc = NULL;
    int err = 0, abort = 0, nextra_was = 0;
    PyThreadState *ts;

    /* Writes block while the peer is slow: release the GIL for the whole
       loop; only signal handling takes it back. */
    ts = PyEval_SaveThread();
    pthread_mutex_lock(&self->mu);
    out = self->spare;
    self->spare.data = NULL;
    self->spare.len = self->spare.cap = 0;
    while (self->fill.len > 0 || nextra > 0) {
        struct iovec iov[4];
        struct iovec *cur = iov;
        int cnt = 0;
        exn_rawbuf tmp = self->fill;

        /* Take the pending frames; senders go on appending to the
           (empty) buffer we hand back. */
        self->fill = out;
        out = tmp;
        pthread_mutex_unlock(&self->mu);

        if (out.len > 0) {
            iov[cnt].iov_base = out.data;
            iov[cnt].iov_len = out.len;
            cnt++;
        }
        nextra_was = nextra;
        for (int i = 0; i < nextra && cnt < 4; i++) {
            iov[cnt++] = extra[i];
        }
        nextra = 0;
        if (splice_at >= 0 && !self->no_splice) {
            /* Everything before the payload with writev, the payload
               with vmsplice, the rest ('Q') with writev again: the
               stream order stays exactly the same. */
            int at = cnt - nextra_was + splice_at;
            uint64_t end = __atomic_load_n(&self->wtotal, __ATOMIC_RELAXED);
            for (int i = 0; i <= at; i++) {
                end += iov[i].iov_len;
            }
            *splice_end = end;
            err = write_some(self, iov, at, 0, &ts, &pending_exc, &abort);
            if (!err && !abort) {
                err = write_some(self, iov + at, 1, 1, &ts, &pending_exc,
                                 &abort);
            }
            if (!err && !abort) {
                err = write_some(self, iov + at + 1, cnt - at - 1, 0, &ts,
                                 &pending_exc, &abort);
            }
        }
        else {
            err = write_some(self, cur, cnt, 0, &ts, &pending_exc, &abort);
        }
        splice_at = -1;
        written_out(&out);
        pthread_mutex_lock(&self->mu);
        if (err || abort) {
            self->fill.len = 0;
            if (abort) {
                self->broken = 1;
            }
            break;
        }
    }
    give_up_role(self, &out);
    pthread_mutex_unlock(&self->mu);
    PyEval_RestoreThread(ts);
    if (self->held_head < self->held_len) {
        /* Whatever this writer wrote may free vmspliced objects. */
        release_spliced(self);
    }

    if (pending_exc != NULL) {
        exn_restore_exception(pending_exc);
        return -1;
    }
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* The flusher (see "Deferred writes" at the top)                      */
/* ------------------------------------------------------------------ */

/* Bumped in a child process after fork(): flushers started before it do
   not exist there. */
static unsigned long fork_gen;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void
on_fork_child(void)
{
    fork_gen++;
}

static void
register_atfork(void)
{
    (void)pthread_atfork(NULL, NULL, on_fork_child);
}

static uint64_t
monotonic_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Write all of buf, without the GIL.  0, or an errno. */
static int
write_all_nogil(int fd, char *buf, size_t len)
{
    struct iovec iov = {buf, len}, *v = &iov;
    int cnt = 1;

    while (exn_fdio_writev_all(fd, &v, &cnt) < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            (void)exn_fdio_poll(fd, POLLOUT, -1);
        }
        else if (errno != EINTR) {
            return errno;
        }
    }
    return 0;
}

/* The flusher thread: whenever handed the role (fl_job), write `fill`
   until it is empty, then give the role up.  Touches no Python object
   and never takes the GIL. */
static void *
flusher_main(void *arg)
{
    EngineObject *self = arg;
    exn_rawbuf out = {NULL, 0, 0};

#if defined(__linux__) && defined(__GLIBC__)
    /* Visible as such in top -H, gdb and /proc/<pid>/task/<tid>/comm. */
    (void)pthread_setname_np(pthread_self(), "execnet-flusher");
#endif
    pthread_mutex_lock(&self->mu);
    for (;;) {
        if (!self->fl_job) {
            struct timespec deadline;
            if (self->fl_stop) {
                break;
            }
            clock_gettime(CLOCK_MONOTONIC, &deadline);
            deadline.tv_sec += FLUSHER_IDLE_S;
            if (pthread_cond_timedwait(&self->fl_cv, &self->mu, &deadline)
                    == ETIMEDOUT && !self->fl_job) {
                break;      /* idle: the next burst starts another */
            }
            continue;
        }
        self->fl_job = 0;
        out = self->spare;
        self->spare.data = NULL;
        self->spare.len = self->spare.cap = 0;
        while (self->fill.len > 0) {
            exn_rawbuf tmp = self->fill;
            int err;

            self->fill = out;
            out = tmp;
            pthread_mutex_unlock(&self->mu);
            err = write_all_nogil(self->wfd, out.data, out.len);
            if (err == 0) {
                __atomic_add_fetch(&self->wtotal, (uint64_t)out.len,
                                   __ATOMIC_RELEASE);
                __atomic_add_fetch(&self->flushed, 1, __ATOMIC_RELAXED);
            }
            written_out(&out);
            pthread_mutex_lock(&self->mu);
            if (err != 0) {
                /* Frames are lost: the next send raises this error. */
                self->fill.len = 0;
                self->fl_errno = err;
                self->broken = 1;
                break;
            }
        }
        give_up_role(self, &out);
    }
    self->fl_running = 0;
    pthread_cond_broadcast(&self->fl_cv);       /* dealloc may wait */
    pthread_mutex_unlock(&self->mu);
    return NULL;
}

/* Start the flusher (mu held).  0, or -1 (no exception set: the caller
   then writes itself). */
static int
start_flusher(EngineObject *self)
{
    pthread_attr_t attr;
    pthread_t thread;
    sigset_t all, old;
    int rc;

    if (!self->fl_cv_ready) {
        pthread_condattr_t ca;
        if (pthread_condattr_init(&ca) != 0) {
            return -1;
        }
        (void)pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        rc = pthread_cond_init(&self->fl_cv, &ca);
        pthread_condattr_destroy(&ca);
        if (rc != 0) {
            return -1;
        }
        self->fl_cv_ready = 1;
    }
    if (pthread_attr_init(&attr) != 0) {
        return -1;
    }
    (void)pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    (void)pthread_attr_setstacksize(&attr, 64 * 1024);
    /* Signals go to the other threads: Python handles them there. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&thread, &attr, flusher_main, self);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        return -1;
    }
    self->fl_running = 1;
    self->fl_stop = 0;
    self->fl_gen = fork_gen;
    return 0;
}

/* With mu held and the role taken by this thread: hand the role, and so
   the writing of `fill`, to the flusher thread (1), or keep it if no
   flusher could be started (0: the caller writes). */
static int
give_to_flusher(EngineObject *self)
{
    if (self->fl_running && self->fl_gen != fork_gen) {
        /* Started before a fork(): no such thread in this process, and
           fl_cv may still count it as a waiter.  Start afresh (the old
           condition variable is abandoned, not destroyed: destroying
           one with a waiter that never wakes may block). */
        self->fl_running = 0;
        self->fl_job = 0;
        self->fl_cv_ready = 0;
    }
    if (!self->fl_running && start_flusher(self) < 0) {
        return 0;
    }
    self->role_owner = 0;
    self->fl_job = 1;
    pthread_cond_signal(&self->fl_cv);
    return 1;
}

/* With mu held, batch_bursts set and the role just taken by this sender:
   leave the writing to the flusher if this frame follows the previous one
   closely (1), or not (0: the caller writes). */
static int
defer_to_flusher(EngineObject *self, uint64_t now, uint64_t prev)
{
    if (self->wclosed || now - prev > DEFER_NS) {
        return 0;
    }
    return give_to_flusher(self);
}

/* Called with the GIL and mu held, after appending to `fill` (or after a
   failed attempt to).  Releases mu.  Sees to it that `fill` gets written:
   becomes the writer if the role is free; else leaves the frames to the
   writer, waiting for the role first if too much is pending.  0, or -1
   with an exception set. */
static int
hand_off(EngineObject *self)
{
    unsigned long me = PyThread_get_thread_ident();
    uint64_t now, prev;

    if (self->fill.len == 0 && !(self->wclosed && !self->fd_closed)) {
        mu_unlock(self);
        return 0;
    }
    if (self->batch_bursts) {
        now = monotonic_ns();
        prev = self->last_append_ns;
        self->last_append_ns = now;
    }
    else {
        now = prev = 0;
    }
    if (try_role(self)) {
        if (self->batch_bursts && defer_to_flusher(self, now, prev)) {
            mu_unlock(self);
            release_spliced(self);
            return 0;
        }
        mu_unlock(self);
        return run_writer(self, NULL, 0);
    }
    if (self->role_owner == me || self->fill.len < HIGH_WATER) {
        /* The writer (perhaps this very thread, in a signal handler run
           by its write loop) checks `fill` under mu before it gives the
           role up, so our frame will go out. */
        mu_unlock(self);
        /* The flusher cannot drop vmspliced objects (no GIL): its
           senders do, as its writes free them. */
        release_spliced(self);
        return 0;
    }
    mu_unlock(self);
    /* Backpressure: the peer reads slower than we produce. */
    if (take_role(self) < 0) {
        return -1;
    }
    return run_writer(self, NULL, 0);
}

/* Append the frames in self->deferred to `fill` (mu and GIL held). */
static int
append_deferred(EngineObject *self)
{
    while (self->deferred != NULL) {
        PyObject *list = self->deferred;
        self->deferred = NULL;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
            PyObject *frame = PyList_GET_ITEM(list, i);
            size_t n = (size_t)PyBytes_GET_SIZE(frame);
            if (rawbuf_reserve(&self->fill, n) < 0) {
                Py_DECREF(list);
                return -1;
            }
            memcpy(self->fill.data + self->fill.len,
                   PyBytes_AS_STRING(frame), n);
            self->fill.len += n;
        }
        Py_DECREF(list);
    }
    return 0;
}

/* A send from code that ran (a __del__, say) while this thread held mu
   serializing: mu cannot be taken again, so the frame waits in
   self->deferred and follows the frame being serialized. */
static PyObject *
send_nested(EngineObject *self, exn_module_state *st, int msgcode,
            int32_t channelid, PyObject *obj)
{
    PyObject *frame;

    if (check_open(self) < 0) {
        return NULL;
    }
    if (obj == NULL) {
        frame = exn_serialize_rawframe(msgcode, channelid, NULL, 0);
    }
    else {
        frame = exn_serialize_frame(st, msgcode, channelid, obj);
    }
    if (frame == NULL) {
        return NULL;
    }
    if (self->deferred == NULL) {
        self->deferred = PyList_New(0);
        if (self->deferred == NULL) {
            Py_DECREF(frame);
            return NULL;
        }
    }
    if (PyList_Append(self->deferred, frame) < 0) {
        Py_DECREF(frame);
        return NULL;
    }
    Py_DECREF(frame);
    Py_RETURN_NONE;
}

/* Serialize one frame into `fill` and hand it off.  None, or NULL with
   an exception set. */
static PyObject *
send_small(EngineObject *self, exn_module_state *st, int msgcode,
           int32_t channelid, PyObject *obj)
{
    int rc;

    mu_lock(self);
    if (check_open(self) < 0) {
        mu_unlock(self);
        return NULL;
    }
    /* Serialize with mu held, straight into the outgoing buffer: the
       writer cannot take `fill` from under us. */
    store_owner(&self->mu_owner, PyThread_get_thread_ident());
    rc = exn_serialize_frame_into(st, &self->fill, msgcode, channelid, obj);
    if (self->deferred != NULL) {
        /* Frames sent by code that ran meanwhile follow ours -- also when
           ours failed. */
        if (rc == 0) {
            rc = append_deferred(self);
        }
        else {
            PyObject *exc = exn_fetch_exception();
            if (append_deferred(self) < 0) {
                PyErr_Clear();
            }
            exn_restore_exception(exc);
        }
    }
    store_owner(&self->mu_owner, 0);
    /* Even after an error: a nested close_write() may wait for us. */
    if (hand_off(self) < 0 || rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* Zero-copy big bytes (vmsplice)                                      */
/* ------------------------------------------------------------------ */

/* vmsplice without SPLICE_F_GIFT makes the pipe reference the sender's
   pages: the reader later copies whatever they hold then.  A bytes
   object is immutable while alive, but its memory is reused once it is
   freed, so every vmspliced object is held (`held`, a FIFO of (object,
   stream offset past its end)) until its pages are surely consumed.
   The rule: a pipe of pipe_size bytes has pipe_size / PAGE_SIZE buffer
   slots of at most PAGE_SIZE bytes each, and the reader empties them in
   order; so once pipe_size more bytes were written after an object's
   end, none of its slots can still be in the pipe.  All of `held` is
   touched with the GIL only; wtotal is stored by the writer without it
   (atomically) -- a stale value only delays a release.  What is still
   held at close_write() stays held until the engine is deallocated. */

/* Make room for one more held object (GIL).  0, or -1 (out of memory;
   no exception set). */
static int
held_reserve(EngineObject *self)
{
    held_t *p;
    size_t cap;

    if (self->held_len < self->held_cap) {
        return 0;
    }
    if (self->held_head > 0) {
        memmove(self->held, self->held + self->held_head,
                (self->held_len - self->held_head) * sizeof(held_t));
        self->held_len -= self->held_head;
        self->held_head = 0;
        return 0;
    }
    cap = self->held_cap ? self->held_cap * 2 : 16;
    p = realloc(self->held, cap * sizeof(held_t));
    if (p == NULL) {
        return -1;
    }
    self->held = p;
    self->held_cap = cap;
    return 0;
}

/* Hold `obj` (a reference is stolen) until pipe_size bytes were written
   past `end` (GIL).  Two big senders may push out of stream order (the
   second writer can get the GIL back first); release_spliced() stops at
   the first entry still needed, which only delays the later ones. */
static void
hold_spliced(EngineObject *self, PyObject *obj, uint64_t end)
{
    if (held_reserve(self) < 0) {
        /* Out of memory (held_reserve ran before the write, so another
           sender took the room): never free the object instead. */
        return;
    }
    self->held[self->held_len].obj = obj;
    self->held[self->held_len].end = end;
    self->held_len++;
}

/* Drop the held objects whose pages the reader has surely consumed
   (GIL).  Bytes objects run no code when freed. */
static void
release_spliced(EngineObject *self)
{
    uint64_t written;

    if (self->held_head == self->held_len) {
        return;
    }
    written = __atomic_load_n(&self->wtotal, __ATOMIC_ACQUIRE);

    while (self->held_head < self->held_len) {
        held_t *h = &self->held[self->held_head];
        if (written < h->end || written - h->end < self->pipe_size) {
            break;
        }
        self->held_head++;
        Py_DECREF(h->obj);
    }
    if (self->held_head == self->held_len) {
        self->held_head = self->held_len = 0;
    }
}

/* Send a big bytes object without copying it: as the writer, writev the
   pending frames, the header + 'A' + length, the object's buffer and
   'Q'.  None, or NULL with an exception set. */
static PyObject *
send_big(EngineObject *self, exn_module_state *st, int msgcode,
         int32_t channelid, PyObject *obj)
{
    unsigned char head[EXN_FRAME_HEADER_SIZE + A_PREFIX];
    static const char stop = 'Q';
    struct iovec extra[3];
    Py_ssize_t n = PyBytes_GET_SIZE(obj);
    PyObject *rv = NULL;
    uint64_t end = UINT64_MAX;
    int splice_at = 1;

    if (n > INT32_MAX - A_OVERHEAD) {
        /* Too big for a frame: let the serializer raise DumpError. */
        return send_small(self, st, msgcode, channelid, obj);
    }
    mu_lock(self);
    if (check_open(self) < 0) {
        mu_unlock(self);
        return NULL;
    }
    if (!try_role(self)) {
        if (self->role_owner == PyThread_get_thread_ident()) {
            /* Inside our own write loop (a signal handler): copy. */
            mu_unlock(self);
            return send_small(self, st, msgcode, channelid, obj);
        }
        mu_unlock(self);
        if (take_role(self) < 0) {
            return NULL;
        }
        mu_lock(self);
        if (check_open(self) < 0) {
            mu_unlock(self);
            PyObject *exc = exn_fetch_exception();
            if (run_writer(self, NULL, 0) < 0) {
                PyErr_Clear();
            }
            exn_restore_exception(exc);
            return NULL;
        }
    }
    mu_unlock(self);

    exn_frame_pack_header(head, msgcode, channelid,
                          (int32_t)(n + A_OVERHEAD));
    head[EXN_FRAME_HEADER_SIZE] = 'A';
    exn_put_be32(head + EXN_FRAME_HEADER_SIZE + 1, (uint32_t)n);
    extra[0].iov_base = head;
    extra[0].iov_len = sizeof(head);
    extra[1].iov_base = PyBytes_AS_STRING(obj);
    extra[1].iov_len = (size_t)n;
    extra[2].iov_base = (void *)&stop;
    extra[2].iov_len = 1;
    /* `obj` stays alive: the caller's argument reference pins it, and
       bytes are immutable, so the writer reads it without the GIL.  If
       it goes out with vmsplice, the pipe references its pages until
       the peer reads them: hold_spliced() keeps it alive until then. */
    Py_INCREF(obj);
    if (held_reserve(self) < 0) {
        /* No room to hold it: the pages must not be spliced. */
        splice_at = -1;
    }
    if (run_writer_ex(self, extra, 3, splice_at, &end) == 0) {
        rv = Py_NewRef(Py_None);
    }
    if (end != UINT64_MAX) {
        /* Also after a failed write: some of it may be in the pipe. */
        hold_spliced(self, obj, end);   /* takes our reference */
    }
    else {
        Py_DECREF(obj);
    }
    release_spliced(self);
    return rv;
}

/* Send one frame by the path that fits: nested (this thread serializes
   under mu), big bytes (no copy) or small.  `obj` NULL: empty payload.
   None, or NULL with an exception set. */
static PyObject *
send_frame(EngineObject *self, exn_module_state *st, int msgcode,
           int32_t channelid, PyObject *obj)
{
    if (load_owner(&self->mu_owner) == PyThread_get_thread_ident()) {
        return send_nested(self, st, msgcode, channelid, obj);
    }
    if (obj != NULL && PyBytes_CheckExact(obj)
        && PyBytes_GET_SIZE(obj) >= BIG_BYTES) {
        return send_big(self, st, msgcode, channelid, obj);
    }
    return send_small(self, st, msgcode, channelid, obj);
}

PyDoc_STRVAR(send_doc,
"send($self, msgcode, channelid, obj=None, /)\n"
"--\n"
"\n"
"Write one frame: an empty payload if obj is None and msgcode is not\n"
"CHANNEL_DATA (4), else the serialized obj.  Thread-safe; frames sent\n"
"close together from several threads are coalesced into one write.\n"
"Raises OSError after close_write() or when the write fails.");

static PyObject *
engine_send(EngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    exn_module_state *st = exn_state(self->module);
    PyObject *obj = NULL;
    int msgcode;
    int32_t channelid;

    if (nargs < 2 || nargs > 3) {
        PyErr_Format(PyExc_TypeError,
                     "send() takes 2 or 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (exn_parse_msgcode(args[0], &msgcode) < 0
        || exn_parse_channelid(args[1], &channelid) < 0) {
        return NULL;
    }
    if (nargs == 3 && (args[2] != Py_None || msgcode == MSG_CHANNEL_DATA)) {
        obj = args[2];
        if (exn_state_check_configured(st) < 0) {
            return NULL;
        }
    }
    else if (nargs == 2 && msgcode == MSG_CHANNEL_DATA) {
        obj = Py_None;
        if (exn_state_check_configured(st) < 0) {
            return NULL;
        }
    }
    return send_frame(self, st, msgcode, channelid, obj);
}

PyObject *
exn_engine_send_data(PyObject *engine, int32_t channelid, PyObject *obj)
{
    EngineObject *self = (EngineObject *)engine;
    exn_module_state *st = exn_state(self->module);

    if (exn_state_check_configured(st) < 0) {
        return NULL;
    }
    return send_frame(self, st, MSG_CHANNEL_DATA, channelid, obj);
}

PyDoc_STRVAR(close_write_doc,
"close_write($self, /)\n"
"--\n"
"\n"
"Write what is pending, then close the write fd; later sends raise\n"
"OSError.  Idempotent.  Write errors while flushing are ignored.");

PyDoc_STRVAR(flush_doc,
"flush($self, timeout=None, /)\n"
"--\n"
"\n"
"Wait until every frame sent so far is written to the fd (by this\n"
"thread, or by the writer or flusher that holds the writer role), for at\n"
"most `timeout` seconds (None: no limit).  True when done, False on\n"
"timeout.  A write error raises OSError, as in send().");

static PyObject *
engine_flush(EngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long me = PyThread_get_thread_ident();
    int64_t timeout_ns = -1;
    uint64_t deadline;
    int rc;

    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError,
                     "flush() takes at most 1 argument (%zd given)", nargs);
        return NULL;
    }
    if (nargs == 1 && args[0] != Py_None) {
        double t = PyFloat_AsDouble(args[0]);
        if (t == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        if (!(t >= 0.0)) {
            PyErr_SetString(PyExc_ValueError,
                            "timeout must be a non-negative number");
            return NULL;
        }
        timeout_ns = t > 9e9 ? (int64_t)9e18 : (int64_t)(t * 1e9);
    }
    if (load_owner(&self->mu_owner) == me) {
        /* Inside this thread's own send: the send writes it. */
        Py_RETURN_TRUE;
    }
    mu_lock(self);
    if (self->fd_closed
        || (self->fill.len == 0 && !self->writer_active)) {
        mu_unlock(self);
        Py_RETURN_TRUE;
    }
    if (self->role_owner == me) {
        /* A signal handler inside our own write loop: it goes on. */
        mu_unlock(self);
        Py_RETURN_TRUE;
    }
    mu_unlock(self);
    if (timeout_ns < 0) {
        /* No limit: wait for the role and write what is pending. */
        if (take_role(self) < 0 || run_writer(self, NULL, 0) < 0) {
            return NULL;
        }
        Py_RETURN_TRUE;
    }
    /* With a limit, never write here: a write() into a full pipe could
       block past it.  The flusher writes; we wait for the role to come
       back with `fill` empty, for at most the time left. */
    deadline = monotonic_ns() + (uint64_t)timeout_ns;
    for (;;) {
        uint64_t now = monotonic_ns();
        int handed;
        rc = take_role_timed(self, now >= deadline ? 0
                                   : (int64_t)(deadline - now));
        if (rc < 0) {
            return NULL;
        }
        if (rc == 1) {
            Py_RETURN_FALSE;
        }
        mu_lock(self);
        handed = self->fill.len > 0 && !self->fd_closed && !self->broken
                 && give_to_flusher(self);
        mu_unlock(self);
        if (!handed) {
            int lost;
            /* All written (run_writer just gives the role back), or no
               flusher thread could be started: then write here after
               all.  A write error of the flusher's is raised here. */
            if (run_writer(self, NULL, 0) < 0) {
                return NULL;
            }
            mu_lock(self);
            lost = self->broken && check_open(self) < 0;
            mu_unlock(self);
            if (lost) {
                return NULL;
            }
            Py_RETURN_TRUE;
        }
        if (monotonic_ns() >= deadline) {
            /* Handed over with no time left: senders that keep appending
               could otherwise keep us here past the limit. */
            Py_RETURN_FALSE;
        }
    }
}

static PyObject *
engine_close_write(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    unsigned long me = PyThread_get_thread_ident();
    int rc;

    if (load_owner(&self->mu_owner) == me) {
        /* Called from code run while this thread serializes (mu is ours):
           the send in progress hands off and the writer closes. */
        self->wclosed = 1;
        Py_RETURN_NONE;
    }
    mu_lock(self);
    if (self->fd_closed) {
        mu_unlock(self);
        Py_RETURN_NONE;
    }
    self->wclosed = 1;
    if (try_role(self)) {
        mu_unlock(self);
        rc = run_writer(self, NULL, 0);
    }
    else if (self->role_owner == me) {
        /* A signal handler inside our own write loop: it closes. */
        mu_unlock(self);
        Py_RETURN_NONE;
    }
    else {
        mu_unlock(self);
        /* The writer closes when done; wait for that, as the pure engine
           waits for its send lock. */
        if (take_role(self) < 0) {
            return NULL;
        }
        rc = run_writer(self, NULL, 0);
    }
    if (rc < 0) {
        if (!PyErr_ExceptionMatches(PyExc_OSError)) {
            return NULL;
        }
        PyErr_Clear();      /* the peer is gone; the fd is closed anyway */
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* Routes                                                              */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(set_route_doc,
"set_route($self, channelid, target, /)\n"
"--\n"
"\n"
"Deliver CHANNEL_DATA for channelid to target: a ChannelQueue (put()\n"
"in C) or a callable (called with the item).");

static PyObject *
engine_set_route(EngineObject *self, PyObject *const *args,
                 Py_ssize_t nargs)
{
    int32_t channelid;
    PyObject *old;
    int err;

    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "set_route() takes exactly 2 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    if (exn_parse_channelid(args[0], &channelid) < 0) {
        return NULL;
    }
    old = route_set(&self->routes, channelid, args[1], &err);
    if (err) {
        return NULL;
    }
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(clear_route_doc,
"clear_route($self, channelid, /)\n"
"--\n"
"\n"
"Stop routing channelid; its frames go to dispatch again.");

static PyObject *
engine_clear_route(EngineObject *self, PyObject *arg)
{
    int32_t channelid;

    if (exn_parse_channelid(arg, &channelid) < 0) {
        return NULL;
    }
    Py_XDECREF(route_del(&self->routes, channelid));
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* Attributes                                                          */
/* ------------------------------------------------------------------ */

/* An int flag of the engine, at byte offset `closure`, as a bool
   attribute (read and set with the GIL). */
static PyObject *
engine_get_flag(EngineObject *self, void *closure)
{
    return PyBool_FromLong(*(int *)((char *)self + (size_t)closure));
}

static int
engine_set_flag(EngineObject *self, PyObject *value, void *closure)
{
    int v;

    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete this attribute");
        return -1;
    }
    v = PyObject_IsTrue(value);
    if (v < 0) {
        return -1;
    }
    *(int *)((char *)self + (size_t)closure) = v;
    return 0;
}

/* `flushed` is counted by the flusher thread: read it atomically. */
static PyObject *
engine_get_flushed(EngineObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(__atomic_load_n(&self->flushed,
                                              __ATOMIC_RELAXED));
}

static PyGetSetDef engine_getset[] = {
    {"flushed", (getter)engine_get_flushed, NULL,
     "How many batches of frames the background flusher wrote (a\n"
     "statistic; see doc/internals.rst).", NULL},
    {"batch_bursts", (getter)engine_get_flag, (setter)engine_set_flag,
     "Leave bursts of small sends to a background flusher thread (off by\n"
     "default; see doc/internals.rst).  Then send() may return before its\n"
     "bytes reach the kernel; flush() and close_write() wait for them.",
     (void *)offsetof(EngineObject, batch_bursts)},
    {"py2str_as_py3str", (getter)engine_get_flag, (setter)engine_set_flag,
     "Decode old py2 str opcodes of routed data as str (latin-1).",
     (void *)offsetof(EngineObject, py2str)},
    {"py3str_as_py2str", (getter)engine_get_flag, (setter)engine_set_flag,
     "Decode str opcodes of routed data as bytes (their raw UTF-8).",
     (void *)offsetof(EngineObject, py3str)},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef engine_members[] = {
    {"rfd", T_INT, offsetof(EngineObject, rfd), READONLY,
     "The fd frames are read from."},
    {"wfd", T_INT, offsetof(EngineObject, wfd), READONLY,
     "The fd frames are written to."},
    {"recycled", T_PYSSIZET, offsetof(EngineObject, recycled), READONLY,
     "How many big bytes payloads were read into an object a consumer\n"
     "had dropped, instead of a fresh one (a statistic)."},
    {NULL, 0, 0, 0, NULL},
};

/* ------------------------------------------------------------------ */
/* Lifetime and GC                                                     */
/* ------------------------------------------------------------------ */

/* Engine(rfd, wfd).  New reference, or NULL. */
static PyObject *
engine_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"rfd", "wfd", NULL};
    EngineObject *self;
    PyObject *module;
    int rfd, wfd, pipe_size;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ii:Engine", kwlist,
                                     &rfd, &wfd)) {
        return NULL;
    }
    module = exn_module_by_type(type);
    if (module == NULL) {
        return NULL;
    }
    self = (EngineObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->module = Py_NewRef(module);
    self->rfd = rfd;
    self->wfd = wfd;
    if (pthread_mutex_init(&self->mu, NULL) != 0) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_MemoryError, "cannot allocate mutex");
        return NULL;
    }
    self->mu_ready = 1;
    self->role_sem = PyThread_allocate_lock();
    if (self->role_sem == NULL) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_MemoryError, "cannot allocate lock");
        return NULL;
    }
    /* Taken: only a handover releases it. */
    (void)PyThread_acquire_lock(self->role_sem, NOWAIT_LOCK);
    /* Bulk transfers: a 1 MiB pipe moves data in fewer, larger steps.
       Failure (not a pipe, over the user's pipe budget) is harmless. */
    (void)exn_fdio_set_pipe_size(rfd, EXN_FDIO_PIPE_SIZE);
    (void)exn_fdio_set_pipe_size(wfd, EXN_FDIO_PIPE_SIZE);
    /* Big bytes go out with vmsplice if wfd is a pipe.  The release rule
       needs the pipe's capacity; the peer may raise it to
       EXN_FDIO_PIPE_SIZE too, so count at least that. */
    pipe_size = exn_fdio_pipe_size(wfd);
    if (pipe_size > 0) {
        self->pipe_size = (uint64_t)(pipe_size > EXN_FDIO_PIPE_SIZE
                                     ? pipe_size : EXN_FDIO_PIPE_SIZE);
    }
    else {
        self->no_splice = 1;
    }
    return (PyObject *)self;
}

static int
engine_traverse(EngineObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->module);
    Py_VISIT(self->deferred);
    for (size_t i = self->held_head; i < self->held_len; i++) {
        Py_VISIT(self->held[i].obj);
    }
    for (size_t i = 0; i < self->routes.cap; i++) {
        Py_VISIT(self->routes.slots[i].target);
    }
    return 0;
}

static int
engine_clear(EngineObject *self)
{
    route_clear(&self->routes);
    Py_CLEAR(self->deferred);
    return 0;
}

static void
engine_dealloc(EngineObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);

    PyObject_GC_UnTrack(self);
    (void)engine_clear(self);
    if (self->mu_ready && self->fl_cv_ready) {
        /* Stop the flusher; it finishes a job in progress first. */
        pthread_mutex_lock(&self->mu);
        if (self->fl_running && self->fl_gen == fork_gen) {
            self->fl_stop = 1;
            pthread_cond_broadcast(&self->fl_cv);
            Py_BEGIN_ALLOW_THREADS
            while (self->fl_running) {
                pthread_cond_wait(&self->fl_cv, &self->mu);
            }
            Py_END_ALLOW_THREADS
        }
        pthread_mutex_unlock(&self->mu);
        if (!self->fl_running) {
            /* (Still "running" only in a child of a fork(): see
               defer_to_flusher.) */
            pthread_cond_destroy(&self->fl_cv);
        }
    }
    if (self->mu_ready) {
        pthread_mutex_destroy(&self->mu);
    }
    if (self->role_sem != NULL) {
        /* Unlock before freeing, as _thread.lock does (no handover can be
           in flight: a waiter holds a reference to us). */
        PyThread_release_lock(self->role_sem);
        PyThread_free_lock(self->role_sem);
    }
    free(self->fill.data);
    free(self->spare.data);
    /* Not in engine_clear: the pipe may still reference their pages
       while the engine lives (bytes hold no references: no cycles).  If
       the pipe was not known to be drained when wfd closed (or wfd was
       never closed here), the reader may still copy those pages: retire
       the objects to the module for good rather than let their memory be
       reused under it. */
    if (self->held_head < self->held_len) {
        PyObject *retired = NULL;
        PyObject *exc_type, *exc_value, *exc_tb;

        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        if (self->module != NULL && (!self->fd_closed || self->unread_at_close)) {
            retired = exn_state(self->module)->retired;
        }
        for (size_t i = self->held_head; i < self->held_len; i++) {
            if (retired != NULL && PyList_Append(retired, self->held[i].obj) < 0) {
                PyErr_Clear();
                continue;   /* out of memory: keep (leak) the reference */
            }
            Py_DECREF(self->held[i].obj);
        }
        PyErr_Restore(exc_type, exc_value, exc_tb);
    }
    free(self->held);
    Py_CLEAR(self->module);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef engine_methods[] = {
    {"send", (PyCFunction)(void (*)(void))engine_send, METH_FASTCALL,
     send_doc},
    {"flush", (PyCFunction)(void (*)(void))engine_flush, METH_FASTCALL,
     flush_doc},
    {"close_write", (PyCFunction)engine_close_write, METH_NOARGS,
     close_write_doc},
    {"set_route", (PyCFunction)(void (*)(void))engine_set_route,
     METH_FASTCALL, set_route_doc},
    {"clear_route", (PyCFunction)engine_clear_route, METH_O,
     clear_route_doc},
    {"run_receiver", (PyCFunction)(void (*)(void))exn_engine_run_receiver,
     METH_FASTCALL, exn_run_receiver_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(engine_doc,
"Engine(rfd, wfd)\n"
"--\n"
"\n"
"Frames over a (read fd, write fd) pair: send() serializes and writes\n"
"frames (coalescing concurrent small sends), run_receiver() reads and\n"
"delivers them; CHANNEL_DATA for a routed channel id goes straight to\n"
"its ChannelQueue or callable.");

static PyType_Slot engine_slots[] = {
    {Py_tp_doc, (void *)engine_doc},
    {Py_tp_new, engine_new},
    {Py_tp_dealloc, engine_dealloc},
    {Py_tp_traverse, engine_traverse},
    {Py_tp_clear, engine_clear},
    {Py_tp_methods, engine_methods},
    {Py_tp_members, engine_members},
    {Py_tp_getset, engine_getset},
    {0, NULL},
};

static PyType_Spec engine_spec = {
    .name = "execnet._execnet.Engine",
    .basicsize = sizeof(EngineObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC
             | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = engine_slots,
};

int
exn_engine_init(PyObject *m, exn_module_state *st)
{
    (void)pthread_once(&atfork_once, register_atfork);
    st->EngineType = (PyTypeObject *)PyType_FromModuleAndSpec(
        m, &engine_spec, NULL);
    if (st->EngineType == NULL) {
        return -1;
    }
    return PyModule_AddType(m, st->EngineType);
}
