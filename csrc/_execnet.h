/*
 * _execnet.h - the one header shared by the C files of execnet._execnet.
 *
 * Holds the module state struct, the accessors exn_state() and
 * exn_state_by_type(), the cross-file prototypes (exn_<area>_<verb>) and
 * the EXN_ macros.  Everything not declared here is static to its file.
 *
 * Adding a file: put its state fields into exn_module_state (and visit and
 * clear them in module.c), its prototypes below under its own heading, and
 * if it needs set-up at import time an `int exn_<area>_init(PyObject *m,
 * exn_module_state *st)` called from module_exec() in module.c.
 */
#ifndef EXN_EXECNET_H
#define EXN_EXECNET_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "fdio.h"

#if PY_VERSION_HEX < 0x030A0000
#error "execnet._execnet needs Python 3.10 or newer"
#endif

/* The wire format moves doubles as their IEEE 754 bit pattern. */
_Static_assert(sizeof(double) == 8, "double must be 64 bits");
_Static_assert(sizeof(int) == 4, "int must be 32 bits");

/* ------------------------------------------------------------------ */
/* Module state                                                        */
/* ------------------------------------------------------------------ */

typedef struct {
    /* Set by configure(): strong references to classes defined in Python
       (execnet.gateway_base).  NULL until configure() ran. */
    PyObject *DataFormatError;
    PyObject *DumpError;
    PyObject *LoadError;
    PyObject *Channel;

    /* Optional 5th configure() argument: the class get() timeouts raise
       (gateway_base.TimeoutError); NULL means the builtin TimeoutError. */
    PyObject *TimeoutError;

    /* Interned strings, made in module_exec(). */
    PyObject *str_id;
    PyObject *str_acquire;
    PyObject *str_release;
    PyObject *str_send;
    PyObject *str_get;
    PyObject *str_engine;               /* "_engine" */
    PyObject *str_pending_last;         /* "_pending_last_messages" */
    PyObject *str_send_pending_last;    /* "_send_pending_last_messages" */
    PyObject *str_getremoteerror;       /* "_getremoteerror" */

    /* Types, made in module_exec() (chanqueue.c, engine.c, channel.c). */
    PyTypeObject *ChannelQueueType;
    PyTypeObject *EngineType;
    PyTypeObject *ChannelBaseType;

    /* vmspliced bytes objects of engines that were freed while the pipe
       may still have referenced their pages: kept for the life of the
       module, so their memory is never reused under a reader (engine.c). */
    PyObject *retired;

    /* Short ASCII strings the decoder made lately (dict keys, outcomes,
       ...), direct-mapped by a hash of their bytes: a string that comes
       again is shared instead of decoded, allocated and hashed anew
       (unserialize.c).  Cleared with the module. */
#define EXN_STRCACHE_SIZE 512
#define EXN_STRCACHE_MAXLEN 48
    PyObject *strcache[EXN_STRCACHE_SIZE];

    /* Other areas (frames, channel queue, receiver) add their types and
       objects below; module.c traverses and clears every PyObject * here. */
} exn_module_state;

extern PyModuleDef exn_module_def;

/* The raised exception, normalized (new reference), cleared; NULL if none
   is set (module.c). */
PyObject *exn_fetch_exception(void);

/* Raise `exc` (an exception instance) again; the reference is stolen
   (module.c). */
void exn_restore_exception(PyObject *exc);

/* Return the state of the module object `module` (never NULL). */
static inline exn_module_state *
exn_state(PyObject *module)
{
    void *st = PyModule_GetState(module);
    assert(st != NULL);
    return (exn_module_state *)st;
}

/* Return the module that defined heap type `tp` (or one of its bases) as
   a borrowed reference; NULL with TypeError set if there is none.
   PyType_GetModuleByDef() is new in 3.11; 3.10 walks the MRO by hand. */
static inline PyObject *
exn_module_by_type(PyTypeObject *tp)
{
#if PY_VERSION_HEX >= 0x030B0000
    return PyType_GetModuleByDef(tp, &exn_module_def);
#else
    PyObject *mro = tp->tp_mro;
    if (mro != NULL && PyTuple_Check(mro)) {
        Py_ssize_t n = PyTuple_GET_SIZE(mro);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyTypeObject *base = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
            if (!PyType_HasFeature(base, Py_TPFLAGS_HEAPTYPE)) {
                continue;
            }
            PyObject *mod = ((PyHeapTypeObject *)base)->ht_module;
            if (mod != NULL && PyModule_GetDef(mod) == &exn_module_def) {
                return mod;
            }
        }
    }
    PyErr_Format(PyExc_TypeError,
                 "type '%s' does not belong to execnet._execnet",
                 tp->tp_name);
    return NULL;
#endif
}

/* Return the module state for a type defined by this module; NULL with
   TypeError set if `tp` is not one of ours. */
static inline exn_module_state *
exn_state_by_type(PyTypeObject *tp)
{
    PyObject *mod = exn_module_by_type(tp);
    if (mod == NULL) {
        return NULL;
    }
    return exn_state(mod);
}

/* ------------------------------------------------------------------ */
/* Limits and wire constants                                           */
/* ------------------------------------------------------------------ */

/* Deepest container nesting dumps() writes and loads() accepts. */
#define EXN_MAX_DEPTH 1000

/* Frame header: signed byte type, int32 channel id, int32 payload length,
   all big-endian ("!bii"). */
#define EXN_FRAME_HEADER_SIZE 9

/* Store `v` big-endian into the 4 bytes at `p`. */
static inline void
exn_put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* Read the 4 big-endian bytes at `p` as a signed 32-bit integer. */
static inline int32_t
exn_get_be32s(const unsigned char *p)
{
    uint32_t v = ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16)
                 | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
    /* Two's complement conversion without implementation-defined casts. */
    if (v <= (uint32_t)INT32_MAX) {
        return (int32_t)v;
    }
    return (int32_t)(v - (uint32_t)INT32_MAX - 1u) + INT32_MIN;
}

/* Write the 9-byte frame header for (msgcode, channelid, length) to `p`. */
static inline void
exn_frame_pack_header(unsigned char *p, int msgcode, int32_t channelid,
                      int32_t length)
{
    p[0] = (unsigned char)(msgcode & 0xff);
    exn_put_be32(p + 1, (uint32_t)channelid);
    exn_put_be32(p + 5, (uint32_t)length);
}

/* A growable byte buffer in plain malloc() memory, so the writer can use
   and free it without the GIL.  All fields zero means empty. */
typedef struct {
    char *data;
    size_t len;
    size_t cap;
} exn_rawbuf;

/* ------------------------------------------------------------------ */
/* module.c                                                            */
/* ------------------------------------------------------------------ */

/* Parse a frame's message type (an int in -128..127) into *out.
   0, or -1 with ValueError/TypeError set. */
int exn_parse_msgcode(PyObject *obj, int *out);

/* Parse a channel id (an int in the signed 32-bit range) into *out.
   0, or -1 with OverflowError/TypeError set. */
int exn_parse_channelid(PyObject *obj, int32_t *out);

/* Return 0 if configure() ran; else -1 with RuntimeError set. */
int exn_state_check_configured(exn_module_state *st);

/* Replace the pending exception with `exc_type(message)`, chaining the old
   one as __cause__ (and __context__).  The message is printf-formatted
   like PyErr_Format() with " (<old exception text>)" appended when
   `append_cause` is nonzero.  Always returns NULL.  If no exception is
   pending, just raises the new one. */
PyObject *exn_err_chain(PyObject *exc_type, int append_cause,
                        const char *format, ...);

/* ------------------------------------------------------------------ */
/* serialize.c                                                         */
/* ------------------------------------------------------------------ */

/* Return a new bytes object: the payload encoding of `obj`, ending in 'Q'
   (no version byte).  NULL with DumpError (or MemoryError) set. */
PyObject *exn_serialize_dumps(exn_module_state *st, PyObject *obj);

/* Return a new bytes object: the 9-byte frame header for
   (msgcode, channelid) followed by the payload encoding of `obj`.
   NULL with an exception set. */
PyObject *exn_serialize_frame(exn_module_state *st, int msgcode,
                              int32_t channelid, PyObject *obj);

/* Return a new bytes object: frame header + `len` raw bytes from `data`
   (data may be NULL when len == 0).  NULL with an exception set. */
PyObject *exn_serialize_rawframe(int msgcode, int32_t channelid,
                                 const char *data, Py_ssize_t len);

/* Append one frame to `rb`: the 9-byte header for (msgcode, channelid)
   and the payload encoding of `obj` (NULL: an empty payload), encoded in
   place and the header's length patched afterwards.  0, or -1 with an
   exception set and rb->len unchanged (rb->data may have grown). */
int exn_serialize_frame_into(exn_module_state *st, exn_rawbuf *rb,
                             int msgcode, int32_t channelid, PyObject *obj);

/* ------------------------------------------------------------------ */
/* unserialize.c                                                       */
/* ------------------------------------------------------------------ */

/* Decode exactly one payload (ending in 'Q', no version byte) from
   data[0:len].  'B' calls channel_factory(id) (NULL/None: LoadError).
   `strflags` is a mask of the EXN_STR_* bits below (execnet's strconfig).
   Returns a new reference; NULL with LoadError (or MemoryError, or
   whatever channel_factory raised) set. */
PyObject *exn_unserialize_loads(exn_module_state *st,
                                const unsigned char *data, Py_ssize_t len,
                                PyObject *channel_factory,
                                int strflags);

/* py2str_as_py3str: 'M' (py2 str) loads as str decoded from latin-1
   (else bytes). */
#define EXN_STR_PY2_AS_PY3 1
/* py3str_as_py2str: 'N' (str) loads as its raw UTF-8 bytes, unchecked
   (else str). */
#define EXN_STR_PY3_AS_PY2 2

/* ------------------------------------------------------------------ */
/* chanqueue.c                                                         */
/* ------------------------------------------------------------------ */

/* Create the ChannelQueue type into st->ChannelQueueType and add it to
   module `m`.  0, or -1 with an exception set. */
int exn_chanqueue_init(PyObject *m, exn_module_state *st);

/* ChannelQueue.put() for C callers; `q` must be a ChannelQueue.  Returns
   1 if queued, 0 if dropped because the queue is closed, -1 with
   MemoryError set. */
int exn_chanqueue_put(PyObject *q, PyObject *item);

/* ChannelQueue.get(timeout) for C callers; `q` must be a ChannelQueue,
   `timeout` NULL or None (no limit) or seconds.  Returns the next item (a
   new reference); NULL with EOFError (closed and empty), the configured
   TimeoutError, or a signal handler's exception set. */
PyObject *exn_chanqueue_get(PyObject *q, PyObject *timeout);

/* ------------------------------------------------------------------ */
/* engine.c                                                            */
/* ------------------------------------------------------------------ */

/* Create the Engine type into st->EngineType and add it to module `m`.
   0, or -1 with an exception set. */
int exn_engine_init(PyObject *m, exn_module_state *st);

/* Engine.send(CHANNEL_DATA, channelid, obj) for C callers; `engine` must
   be an Engine.  None, or NULL with an exception set (DumpError, OSError,
   RuntimeError before configure()). */
PyObject *exn_engine_send_data(PyObject *engine, int32_t channelid,
                               PyObject *obj);

/* ------------------------------------------------------------------ */
/* channel.c                                                           */
/* ------------------------------------------------------------------ */

/* Create the ChannelBase type into st->ChannelBaseType and add it to
   module `m`.  0, or -1 with an exception set. */
int exn_channel_init(PyObject *m, exn_module_state *st);

#endif /* EXN_EXECNET_H */
