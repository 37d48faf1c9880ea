/*
 * channel.c - execnet._execnet.ChannelBase: the base class of
 * gateway_base.Channel, holding its hot methods send() and receive() so
 * that they are C calls.  Mirrors the pure gateway_base._PyChannelBase
 * (same results and exceptions).
 *
 * The fields the hot methods use -- id, gateway, _queue, _closed,
 * _callback, and _remoteerrors (through Channel._getremoteerror()) -- are
 * member slots, read and written by the Python code of Channel and
 * ChannelFactory as plain attributes; the subclass keeps its other
 * attributes in its __dict__.  The methods read the slots directly: a
 * subclass must not shadow them with properties.
 *
 * send() goes straight into the Engine's C send path, and receive() into
 * the ChannelQueue's get(), when the gateway runs the native engine and
 * the channel has a native queue.  Otherwise (gevent/eventlet gateways
 * keep the pure engine and queue) they call the objects' methods.  The
 * gateway's engine and pending-last-messages list are looked up on the
 * first send and kept, along with the gateway they came from: assigning
 * another gateway makes the next send look them up again.
 *
 * Everything here runs with the GIL held and takes no lock of its own;
 * the engine and the queue take theirs.
 */
#include "_execnet.h"

#include <structmember.h>

#define MSG_CHANNEL_DATA 4

typedef struct {
    PyObject_HEAD
    PyObject *module;           /* strong: the state lives there */
    /* Member slots (NULL: attribute not set). */
    PyObject *id;
    PyObject *gateway;
    PyObject *queue;            /* _queue */
    PyObject *closed;           /* _closed */
    PyObject *callback;         /* _callback */
    PyObject *remoteerrors;     /* _remoteerrors */
    /* Send cache: the gateway they were taken from, its _engine and its
       _pending_last_messages (a list).  All NULL or all set. */
    PyObject *c_gateway;
    PyObject *c_engine;
    PyObject *c_pending;
} ChannelBaseObject;

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

/* Return the member `value` (borrowed), or NULL with AttributeError set
   if it is not set, as reading the attribute would. */
static PyObject *
member(ChannelBaseObject *self, PyObject *value, const char *name)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError,
                     "'%.100s' object has no attribute '%s'",
                     Py_TYPE(self)->tp_name, name);
    }
    return value;
}

/* Raise the exception instance `exc` (the reference is stolen) as it is,
   without chaining it to the exception being handled. */
/* (Re)fill the send cache from self->gateway.  0, or -1 with an exception
   set (AttributeError if the gateway lacks _engine or
   _pending_last_messages, TypeError if the latter is not a list). */
static int
refresh_cache(ChannelBaseObject *self, exn_module_state *st)
{
    PyObject *gw = NULL, *engine = NULL, *pending = NULL;

    if (member(self, self->gateway, "gateway") == NULL) {
        return -1;
    }
    gw = Py_NewRef(self->gateway);
    engine = PyObject_GetAttr(gw, st->str_engine);
    if (engine == NULL) {
        goto error;
    }
    pending = PyObject_GetAttr(gw, st->str_pending_last);
    if (pending == NULL) {
        goto error;
    }
    if (!PyList_Check(pending)) {
        PyErr_SetString(PyExc_TypeError,
                        "gateway._pending_last_messages must be a list");
        goto error;
    }
    /* Swap all three before dropping the old ones: a decref may run
       Python code (another thread's send) that must see a whole set. */
    {
        PyObject *old_gw = self->c_gateway;
        PyObject *old_engine = self->c_engine;
        PyObject *old_pending = self->c_pending;
        self->c_gateway = gw;
        self->c_engine = engine;
        self->c_pending = pending;
        Py_XDECREF(old_gw);
        Py_XDECREF(old_engine);
        Py_XDECREF(old_pending);
    }
    return 0;

error:
    Py_XDECREF(gw);
    Py_XDECREF(engine);
    Py_XDECREF(pending);
    return -1;
}

/* receive() saw EOFError (pending): raise `self._getremoteerror()`
   instead (the first of _remoteerrors, popped), as `raise error from
   None` would; if it returns None, leave the EOFError.  Always returns
   NULL.  The end of a channel is rare: the Python method, which a
   subclass may override, is called as in the pure receive(). */
static PyObject *
raise_remote_error(ChannelBaseObject *self, exn_module_state *st)
{
    PyObject *eof = exn_fetch_exception();
    PyObject *error = NULL;

    error = PyObject_CallMethodNoArgs((PyObject *)self,
                                      st->str_getremoteerror);
    if (error == NULL) {
        /* Raised while handling the EOFError: chain it as its context. */
        PyObject *exc = exn_fetch_exception();
        PyException_SetContext(exc, eof);
        exn_restore_exception(exc);
        return NULL;
    }
    if (error == Py_None) {
        Py_DECREF(error);
        exn_restore_exception(eof);
        return NULL;
    }
    if (!PyExceptionInstance_Check(error)) {
        Py_DECREF(error);
        PyErr_SetString(PyExc_TypeError,
                        "exceptions must derive from BaseException");
        error = exn_fetch_exception();
        PyException_SetContext(error, eof);
        exn_restore_exception(error);
        return NULL;
    }
    /* `from None`: no cause and the context suppressed; both setters steal
       a reference. */
    PyException_SetContext(error, eof);
    PyException_SetCause(error, NULL);
    exn_restore_exception(error);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Methods                                                             */
/* ------------------------------------------------------------------ */

/* __new__: accepts and ignores any arguments (the subclass's __init__
   takes them).  New reference or NULL. */
static PyObject *
channelbase_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    ChannelBaseObject *self;
    PyObject *module = exn_module_by_type(type);

    if (module == NULL) {
        return NULL;
    }
    self = (ChannelBaseObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->module = Py_NewRef(module);
    return (PyObject *)self;
}

/* Parse the one argument `name` of a method (positional or keyword) into
   *value (borrowed; NULL if absent and optional).  0, or -1 with
   TypeError. */
static int
parse_one_arg(const char *fname, const char *name, int required,
              PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
              PyObject **value)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;

    *value = NULL;
    if (nargs + nkw > 1) {
        PyErr_Format(PyExc_TypeError,
                     "%s() takes at most 1 argument (%zd given)", fname,
                     nargs + nkw);
        return -1;
    }
    if (nkw == 1) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, 0);
        if (PyUnicode_CompareWithASCIIString(key, name) != 0) {
            PyErr_Format(PyExc_TypeError,
                         "%s() got an unexpected keyword argument '%U'",
                         fname, key);
            return -1;
        }
    }
    if (nargs + nkw == 1) {
        *value = args[0];
    }
    else if (required) {
        PyErr_Format(PyExc_TypeError,
                     "%s() missing required argument '%s'", fname, name);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(send_doc,
"send($self, /, item)\n"
"--\n"
"\n"
"Send item to the other side (must be serializable).  Raises OSError\n"
"if the channel is closed for sending.");

static PyObject *
channelbase_send(ChannelBaseObject *self, PyObject *const *args,
                 Py_ssize_t nargs, PyObject *kwnames)
{
    exn_module_state *st = exn_state(self->module);
    PyObject *item, *gw = NULL, *engine = NULL, *id = NULL, *rv = NULL;
    int closed;

    if (nargs == 1 && kwnames == NULL) {
        item = args[0];
    }
    else if (parse_one_arg("send", "item", 1, args, nargs, kwnames,
                           &item) < 0) {
        return NULL;
    }
    if (member(self, self->closed, "_closed") == NULL) {
        return NULL;
    }
    closed = self->closed == Py_False ? 0 : PyObject_IsTrue(self->closed);
    if (closed < 0) {
        return NULL;
    }
    if (closed) {
        PyErr_Format(PyExc_OSError, "cannot send to %R", (PyObject *)self);
        return NULL;
    }
    if (self->gateway == NULL || self->gateway != self->c_gateway) {
        if (refresh_cache(self, st) < 0) {
            return NULL;
        }
    }
    /* References of our own: the Python code below (flushing, a __del__
       run during serialization) may reassign the fields. */
    engine = Py_NewRef(self->c_engine);
    if (PyList_GET_SIZE(self->c_pending) > 0) {
        /* CHANNEL_LAST_MESSAGE frames of collected channels go first. */
        PyObject *r;
        gw = Py_NewRef(self->c_gateway);
        r = PyObject_CallMethodNoArgs(gw, st->str_send_pending_last);
        if (r == NULL) {
            goto error;
        }
        Py_DECREF(r);
    }
    if (member(self, self->id, "id") == NULL) {
        goto error;
    }
    id = Py_NewRef(self->id);
    if (Py_IS_TYPE(engine, st->EngineType)) {
        int32_t channelid;
        if (exn_parse_channelid(id, &channelid) < 0) {
            goto error;
        }
        rv = exn_engine_send_data(engine, channelid, item);
    }
    else {
        /* A pure engine: engine.send(CHANNEL_DATA, id, item). */
        PyObject *callargs[4] = {engine, NULL, id, item};
        callargs[1] = PyLong_FromLong(MSG_CHANNEL_DATA);
        if (callargs[1] == NULL) {
            goto error;
        }
        rv = PyObject_VectorcallMethod(
            st->str_send, callargs, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET,
            NULL);
        Py_DECREF(callargs[1]);
        if (rv != NULL) {
            Py_SETREF(rv, Py_NewRef(Py_None));
        }
    }

error:
    Py_XDECREF(gw);
    Py_XDECREF(engine);
    Py_XDECREF(id);
    return rv;
}

PyDoc_STRVAR(receive_doc,
"receive($self, /, timeout=None)\n"
"--\n"
"\n"
"Return the next item; raise EOFError when the channel closed,\n"
"RemoteError when the peer closed it with an error, TimeoutError when\n"
"timeout seconds pass first.");

static PyObject *
channelbase_receive(ChannelBaseObject *self, PyObject *const *args,
                    Py_ssize_t nargs, PyObject *kwnames)
{
    exn_module_state *st = exn_state(self->module);
    PyObject *timeout, *queue, *item;

    if (parse_one_arg("receive", "timeout", 0, args, nargs, kwnames,
                      &timeout) < 0) {
        return NULL;
    }
    if (member(self, self->callback, "_callback") == NULL) {
        return NULL;
    }
    if (self->callback != Py_None) {
        PyErr_SetString(PyExc_OSError,
                        "calling receive() on channel with receiver "
                        "callback");
        return NULL;
    }
    if (member(self, self->queue, "_queue") == NULL) {
        return NULL;
    }
    /* Our own reference: the field may be reassigned while we wait. */
    queue = Py_NewRef(self->queue);
    if (Py_IS_TYPE(queue, st->ChannelQueueType)) {
        item = exn_chanqueue_get(queue, timeout);
    }
    else {
        /* A pure queue: queue.get(timeout). */
        PyObject *callargs[2] = {queue, timeout ? timeout : Py_None};
        item = PyObject_VectorcallMethod(
            st->str_get, callargs, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    Py_DECREF(queue);
    if (item == NULL && PyErr_ExceptionMatches(PyExc_EOFError)) {
        return raise_remote_error(self, st);
    }
    return item;
}

/* ------------------------------------------------------------------ */
/* GC and lifetime                                                     */
/* ------------------------------------------------------------------ */

static int
channelbase_traverse(ChannelBaseObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->module);
    Py_VISIT(self->id);
    Py_VISIT(self->gateway);
    Py_VISIT(self->queue);
    Py_VISIT(self->closed);
    Py_VISIT(self->callback);
    Py_VISIT(self->remoteerrors);
    Py_VISIT(self->c_gateway);
    Py_VISIT(self->c_engine);
    Py_VISIT(self->c_pending);
    return 0;
}

/* Drop every reference but the module's (methods still find the state;
   the unset members raise AttributeError). */
static int
channelbase_clear(ChannelBaseObject *self)
{
    Py_CLEAR(self->id);
    Py_CLEAR(self->gateway);
    Py_CLEAR(self->queue);
    Py_CLEAR(self->closed);
    Py_CLEAR(self->callback);
    Py_CLEAR(self->remoteerrors);
    Py_CLEAR(self->c_gateway);
    Py_CLEAR(self->c_engine);
    Py_CLEAR(self->c_pending);
    return 0;
}

static void
channelbase_dealloc(ChannelBaseObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);

    PyObject_GC_UnTrack(self);
    (void)channelbase_clear(self);
    Py_CLEAR(self->module);
    tp->tp_free((PyObject *)self);
    /* Also for instances of a Python subclass: the subclass's dealloc
       leaves the type reference to a heap base type. */
    Py_DECREF(tp);
}

/* ------------------------------------------------------------------ */
/* Type                                                                */
/* ------------------------------------------------------------------ */

static PyMethodDef channelbase_methods[] = {
    {"send", (PyCFunction)(void (*)(void))channelbase_send,
     METH_FASTCALL | METH_KEYWORDS, send_doc},
    {"receive", (PyCFunction)(void (*)(void))channelbase_receive,
     METH_FASTCALL | METH_KEYWORDS, receive_doc},
    {NULL, NULL, 0, NULL},
};

#define MEMBER(name, field, doc)                                            \
    {name, T_OBJECT_EX, offsetof(ChannelBaseObject, field), 0, doc}

static PyMemberDef channelbase_members[] = {
    MEMBER("id", id, "the channel id (an int)"),
    MEMBER("gateway", gateway, "the gateway the channel belongs to"),
    MEMBER("_queue", queue, "the queue of received items"),
    MEMBER("_closed", closed, "true once no more sends are allowed"),
    MEMBER("_callback", callback, "the receiver callback, or None"),
    MEMBER("_remoteerrors", remoteerrors,
           "errors the peer closed the channel with (a list)"),
    {NULL, 0, 0, 0, NULL},
};

#undef MEMBER

PyDoc_STRVAR(channelbase_doc,
"ChannelBase()\n"
"--\n"
"\n"
"Base class of execnet channels: send() and receive() in C, over the\n"
"member slots id, gateway, _queue, _closed, _callback and\n"
"_remoteerrors, which the subclass sets.");

static PyType_Slot channelbase_slots[] = {
    {Py_tp_doc, (void *)channelbase_doc},
    {Py_tp_new, channelbase_new},
    {Py_tp_dealloc, channelbase_dealloc},
    {Py_tp_traverse, channelbase_traverse},
    {Py_tp_clear, channelbase_clear},
    {Py_tp_methods, channelbase_methods},
    {Py_tp_members, channelbase_members},
    {0, NULL},
};

static PyType_Spec channelbase_spec = {
    .name = "execnet._execnet.ChannelBase",
    .basicsize = sizeof(ChannelBaseObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE
             | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = channelbase_slots,
};

int
exn_channel_init(PyObject *m, exn_module_state *st)
{
    st->ChannelBaseType = (PyTypeObject *)PyType_FromModuleAndSpec(
        m, &channelbase_spec, NULL);
    if (st->ChannelBaseType == NULL) {
        return -1;
    }
    return PyModule_AddType(m, st->ChannelBaseType);
}
