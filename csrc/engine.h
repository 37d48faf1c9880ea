/*
 * engine.h - what engine.c (the Engine object, its send side and route
 * table) and receiver.c (its run_receiver() loop) share.  Private to
 * those two files; see _execnet.h for the module-wide declarations.
 */
#ifndef EXN_ENGINE_H
#define EXN_ENGINE_H

#include "_execnet.h"

#include <pthread.h>

#define MSG_CHANNEL_DATA 4

/* A DATA payload that is one bytes object: 'A' + 4-byte length before the
   bytes, 'Q' after them. */
#define A_PREFIX 5
#define A_OVERHEAD 6

/* ------------------------------------------------------------------ */
/* Route table: channel id -> ChannelQueue or callable                */
/* ------------------------------------------------------------------ */

/* Open addressing with linear probing and backward-shift deletion.
   Guarded by the GIL. */
typedef struct {
    PyObject *target;       /* owned; NULL: free slot */
    int32_t key;
} route_slot;

typedef struct {
    route_slot *slots;
    size_t cap;             /* 0 or a power of two */
    size_t count;
} route_map;

/* The target routed for `key` (borrowed), or NULL (engine.c). */
PyObject *exn_route_get(route_map *m, int32_t key);

/* ------------------------------------------------------------------ */
/* The Engine object                                                   */
/* ------------------------------------------------------------------ */

/* A bytes object whose pages a pipe may still reference, and the
   stream offset (wtotal) just past its last byte. */
typedef struct {
    PyObject *obj;
    uint64_t end;
} held_t;

typedef struct {
    PyObject_HEAD
    PyObject *module;           /* strong: the state lives there */
    int rfd;
    int wfd;
    int py2str;                 /* py2str_as_py3str; GIL */
    int py3str;                 /* py3str_as_py2str; GIL */
    route_map routes;           /* GIL */

    /* Send side; see the top of engine.c. */
    pthread_mutex_t mu;
    int mu_ready;               /* mu was initialized */
    PyThread_type_lock role_sem;
    int writer_active;          /* mu; the writer role is taken */
    int role_waiters;           /* mu; threads waiting on role_sem */
    exn_rawbuf fill;            /* mu */
    exn_rawbuf spare;           /* mu; an empty buffer kept for reuse */
    int wclosed;                /* mu; close_write() ran: sends raise */
    int fd_closed;              /* mu; wfd is closed */
    int broken;                 /* mu; frames were lost: sends raise */
    unsigned long mu_owner;     /* thread serializing under mu, or 0 */
    unsigned long role_owner;   /* mu; thread holding the role, or 0
                                   (0 too while it is handed over) */
    PyObject *deferred;         /* GIL; frames (bytes) sent from code that
                                   ran while this thread serialized */

    /* vmsplice of big bytes; see "Zero-copy big bytes" in engine.c. */
    int no_splice;              /* role; write with writev only */
    uint64_t pipe_size;         /* capacity of the wfd pipe (bytes) */
    uint64_t wtotal;            /* bytes written to wfd so far; stored by
                                   the role holder (atomic), read by all */
    held_t *held;               /* GIL; vmspliced objects, oldest first, */
    size_t held_head;           /* in held[held_head:held_len] */
    size_t held_len;
    size_t held_cap;
    int unread_at_close;        /* mu; the pipe held unread bytes (or we
                                   could not tell) when wfd was closed */

    /* The flusher; see "Deferred writes" at the top of engine.c. */
    pthread_cond_t fl_cv;       /* with mu: wakes the flusher (fl_job,
                                   fl_stop) and dealloc (its exit) */
    int fl_cv_ready;
    int fl_running;             /* mu; a flusher thread exists */
    int fl_job;                 /* mu; the role was handed to it */
    int fl_stop;                /* mu; dealloc: exit once idle */
    int fl_errno;               /* mu; its write failed: sends raise */
    unsigned long fl_gen;       /* fork_gen when it was started */
    int batch_bursts;           /* GIL; bursts may go to the flusher */
    uint64_t last_append_ns;    /* mu; when the last frame was handed off */
    Py_ssize_t flushed;         /* batches the flusher wrote (atomic) */

    int receiving;              /* GIL; run_receiver() is running */
    Py_ssize_t recycled;        /* GIL; big payloads read into a kept
                                   object (see RECYCLE_MAX) */
} EngineObject;

/* run_receiver() (receiver.c). */
extern const char exn_run_receiver_doc[];
PyObject *exn_engine_run_receiver(EngineObject *self, PyObject *const *args,
                                  Py_ssize_t nargs);

#endif /* EXN_ENGINE_H */
