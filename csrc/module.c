/*
 * module.c - execnet._execnet: module definition, exec slot, module state
 * traverse/clear/free, configure() and the Python-visible functions of the
 * serializer.
 */
#include "_execnet.h"

#include <stdarg.h>

/* ------------------------------------------------------------------ */
/* Helpers shared with the other files                                 */
/* ------------------------------------------------------------------ */

int
exn_state_check_configured(exn_module_state *st)
{
    if (st->DumpError == NULL || st->LoadError == NULL
        || st->Channel == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "execnet._execnet.configure() has not been called");
        return -1;
    }
    return 0;
}

PyObject *
exn_err_chain(PyObject *exc_type, int append_cause, const char *format, ...)
{
    PyObject *msg = NULL;
    PyObject *newexc = NULL;
    va_list vargs;

#if PY_VERSION_HEX >= 0x030C0000
    PyObject *cause = PyErr_GetRaisedException();
#else
    PyObject *cause_type = NULL, *cause = NULL, *cause_tb = NULL;
    PyErr_Fetch(&cause_type, &cause, &cause_tb);
    if (cause_type != NULL) {
        PyErr_NormalizeException(&cause_type, &cause, &cause_tb);
        if (cause != NULL && cause_tb != NULL) {
            PyException_SetTraceback(cause, cause_tb);
        }
    }
    Py_XDECREF(cause_type);
    Py_XDECREF(cause_tb);
#endif

    va_start(vargs, format);
    msg = PyUnicode_FromFormatV(format, vargs);
    va_end(vargs);
    if (msg == NULL) {
        goto error;
    }
    if (append_cause && cause != NULL) {
        PyObject *full = PyUnicode_FromFormat("%U (%S)", msg, cause);
        if (full == NULL) {
            goto error;
        }
        Py_SETREF(msg, full);
    }
    newexc = PyObject_CallOneArg(exc_type, msg);
    if (newexc == NULL) {
        goto error;
    }
    if (!PyExceptionInstance_Check(newexc)) {
        PyErr_SetObject(exc_type, newexc);
        goto error;
    }
    if (cause != NULL) {
        /* Both setters steal a reference. */
        Py_INCREF(cause);
        PyException_SetContext(newexc, cause);
        PyException_SetCause(newexc, cause);
        cause = NULL;
    }
    /* Raise without implicit chaining to the exception being handled. */
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(newexc);
#else
    Py_INCREF(Py_TYPE(newexc));
    PyErr_Restore((PyObject *)Py_TYPE(newexc), newexc, NULL);
#endif
    newexc = NULL;

error:
    Py_XDECREF(cause);
    Py_XDECREF(msg);
    Py_XDECREF(newexc);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Python-visible functions                                            */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(configure_doc,
"configure(DumpError, LoadError, DataFormatError, Channel,\n"
"          TimeoutError=None, /)\n"
"--\n"
"\n"
"Give the core the exception classes and the channel class defined in\n"
"execnet.gateway_base.  Must be called before dumps() and loads(); may\n"
"be called again to replace them.  TimeoutError is what\n"
"ChannelQueue.get() raises when its timeout passes (default: the\n"
"builtin TimeoutError).");

/* Store strong references to the classes; None on success. */
static PyObject *
exn_configure(PyObject *module, PyObject *args)
{
    PyObject *dump_error, *load_error, *format_error, *channel;
    PyObject *timeout_error = Py_None;
    exn_module_state *st = exn_state(module);

    if (!PyArg_ParseTuple(args, "OOOO|O:configure", &dump_error, &load_error,
                          &format_error, &channel, &timeout_error)) {
        return NULL;
    }
    if (timeout_error != Py_None && !PyExceptionClass_Check(timeout_error)) {
        PyErr_SetString(PyExc_TypeError,
                        "configure(): TimeoutError must be an exception "
                        "class or None");
        return NULL;
    }
    if (!PyExceptionClass_Check(dump_error)
        || !PyExceptionClass_Check(load_error)
        || !PyExceptionClass_Check(format_error)) {
        PyErr_SetString(PyExc_TypeError,
                        "configure(): DumpError, LoadError and "
                        "DataFormatError must be exception classes");
        return NULL;
    }
    if (!PyType_Check(channel)) {
        PyErr_SetString(PyExc_TypeError,
                        "configure(): Channel must be a class");
        return NULL;
    }
    Py_INCREF(dump_error);
    Py_XSETREF(st->DumpError, dump_error);
    Py_INCREF(load_error);
    Py_XSETREF(st->LoadError, load_error);
    Py_INCREF(format_error);
    Py_XSETREF(st->DataFormatError, format_error);
    Py_INCREF(channel);
    Py_XSETREF(st->Channel, channel);
    if (timeout_error == Py_None) {
        Py_CLEAR(st->TimeoutError);
    }
    else {
        Py_INCREF(timeout_error);
        Py_XSETREF(st->TimeoutError, timeout_error);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(dumps_doc,
"dumps(obj, /)\n"
"--\n"
"\n"
"Return the execnet 2.x encoding of obj as bytes: the payload without\n"
"the version byte, ending with the STOP opcode 'Q'.  Raises DumpError\n"
"for unsupported types (dispatch is on the exact type, so subclasses of\n"
"builtins are refused), unencodable str and too deep nesting.");

/* METH_O: dumps(obj) -> bytes. */
static PyObject *
exn_dumps(PyObject *module, PyObject *obj)
{
    exn_module_state *st = exn_state(module);
    if (exn_state_check_configured(st) < 0) {
        return NULL;
    }
    return exn_serialize_dumps(st, obj);
}

int
exn_parse_msgcode(PyObject *obj, int *out)
{
    int overflow = 0;
    long v = PyLong_AsLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow || v < -128 || v > 127) {
        PyErr_SetString(PyExc_ValueError,
                        "message type must be in the range -128..127");
        return -1;
    }
    *out = (int)v;
    return 0;
}

int
exn_parse_channelid(PyObject *obj, int32_t *out)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow || v < INT32_MIN || v > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError,
                        "channel id must fit in a signed 32-bit int");
        return -1;
    }
    *out = (int32_t)v;
    return 0;
}

PyDoc_STRVAR(dumps_frame_doc,
"dumps_frame(msgcode, channelid, obj, /)\n"
"--\n"
"\n"
"Return one frame as bytes: the 9-byte header (type, channel id, payload\n"
"length; '!bii') followed by dumps(obj).");

/* METH_FASTCALL: dumps_frame(msgcode, channelid, obj) -> bytes. */
static PyObject *
exn_dumps_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    exn_module_state *st = exn_state(module);
    int msgcode;
    int32_t channelid;

    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError,
                     "dumps_frame() takes exactly 3 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    if (exn_parse_msgcode(args[0], &msgcode) < 0
        || exn_parse_channelid(args[1], &channelid) < 0) {
        return NULL;
    }
    if (exn_state_check_configured(st) < 0) {
        return NULL;
    }
    return exn_serialize_frame(st, msgcode, channelid, args[2]);
}

PyDoc_STRVAR(frame_doc,
"frame(msgcode, channelid, payload, /)\n"
"--\n"
"\n"
"Return one frame as bytes: the 9-byte header followed by payload (a\n"
"bytes-like object, or None for an empty payload).");

/* METH_FASTCALL: frame(msgcode, channelid, payload) -> bytes. */
static PyObject *
exn_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int msgcode;
    int32_t channelid;
    Py_buffer view;
    PyObject *result;

    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError,
                     "frame() takes exactly 3 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    if (exn_parse_msgcode(args[0], &msgcode) < 0
        || exn_parse_channelid(args[1], &channelid) < 0) {
        return NULL;
    }
    if (args[2] == Py_None) {
        return exn_serialize_rawframe(msgcode, channelid, NULL, 0);
    }
    if (PyBytes_CheckExact(args[2])) {
        return exn_serialize_rawframe(msgcode, channelid,
                                      PyBytes_AS_STRING(args[2]),
                                      PyBytes_GET_SIZE(args[2]));
    }
    if (PyObject_GetBuffer(args[2], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    result = exn_serialize_rawframe(msgcode, channelid,
                                    (const char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(loads_doc,
"loads(data, channel_factory=None, py2str_as_py3str=False,\n"
"      py3str_as_py2str=False)\n"
"--\n"
"\n"
"Decode one payload (no version byte, ending with 'Q') from a bytes-like\n"
"object.  Channel opcodes call channel_factory(id).  Old-writer py2 str\n"
"opcodes load as bytes, or as str (latin-1) if py2str_as_py3str is true;\n"
"str opcodes load as str, or as their raw UTF-8 bytes if py3str_as_py2str\n"
"is true.  Raises LoadError for any malformed input.");

/* METH_FASTCALL | METH_KEYWORDS:
   loads(data, channel_factory=None, py2str_as_py3str=False,
         py3str_as_py2str=False) -> object. */
static PyObject *
exn_loads(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
          PyObject *kwnames)
{
    static const char *const names[] = {
        "data", "channel_factory", "py2str_as_py3str", "py3str_as_py2str"};
    PyObject *argv[4] = {NULL, NULL, NULL, NULL};
    exn_module_state *st = exn_state(module);
    PyObject *factory;
    PyObject *result;
    Py_buffer view;
    int strflags = 0;

    if (nargs > 4) {
        PyErr_Format(PyExc_TypeError,
                     "loads() takes at most 4 arguments (%zd given)", nargs);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        argv[i] = args[i];
    }
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nkw; k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k);
            int slot = -1;
            for (int j = 0; j < 4; j++) {
                if (PyUnicode_CompareWithASCIIString(key, names[j]) == 0) {
                    slot = j;
                    break;
                }
            }
            if (slot < 0) {
                PyErr_Format(PyExc_TypeError,
                             "loads() got an unexpected keyword argument "
                             "'%U'", key);
                return NULL;
            }
            if (argv[slot] != NULL) {
                PyErr_Format(PyExc_TypeError,
                             "loads() got multiple values for argument "
                             "'%s'", names[slot]);
                return NULL;
            }
            argv[slot] = args[nargs + k];
        }
    }
    if (argv[0] == NULL) {
        PyErr_SetString(PyExc_TypeError,
                        "loads() missing required argument 'data'");
        return NULL;
    }
    factory = argv[1];
    if (factory == Py_None) {
        factory = NULL;
    }
    for (int j = 2; j < 4; j++) {
        int flag;
        if (argv[j] == NULL) {
            continue;
        }
        flag = PyObject_IsTrue(argv[j]);
        if (flag < 0) {
            return NULL;
        }
        if (flag) {
            strflags |= j == 2 ? EXN_STR_PY2_AS_PY3 : EXN_STR_PY3_AS_PY2;
        }
    }
    if (exn_state_check_configured(st) < 0) {
        return NULL;
    }
    if (PyBytes_CheckExact(argv[0])) {
        return exn_unserialize_loads(
            st, (const unsigned char *)PyBytes_AS_STRING(argv[0]),
            PyBytes_GET_SIZE(argv[0]), factory, strflags);
    }
    /* The buffer stays exported while channel_factory may run Python code,
       so a bytearray cannot be resized under the decoder. */
    if (PyObject_GetBuffer(argv[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    result = exn_unserialize_loads(st, (const unsigned char *)view.buf,
                                   view.len, factory, strflags);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef exn_methods[] = {
    {"configure", (PyCFunction)exn_configure, METH_VARARGS, configure_doc},
    {"dumps", (PyCFunction)exn_dumps, METH_O, dumps_doc},
    {"dumps_frame", (PyCFunction)(void (*)(void))exn_dumps_frame,
     METH_FASTCALL, dumps_frame_doc},
    {"frame", (PyCFunction)(void (*)(void))exn_frame, METH_FASTCALL,
     frame_doc},
    {"loads", (PyCFunction)(void (*)(void))exn_loads,
     METH_FASTCALL | METH_KEYWORDS, loads_doc},
    {NULL, NULL, 0, NULL},
};

/* ------------------------------------------------------------------ */
/* Module state lifecycle                                              */
/* ------------------------------------------------------------------ */

/* Take and return the raised exception (normalized; new reference),
   clearing it; NULL if none is set.  Shared by engine.c and channel.c. */
PyObject *
exn_fetch_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL) {
        return NULL;
    }
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_DECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Raise `exc` again (the reference is stolen). */
void
exn_restore_exception(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc,
                  PyException_GetTraceback(exc));
#endif
}

/* GC: visit every object reference held in the state. */
static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    exn_module_state *st = exn_state(module);
    Py_VISIT(st->DataFormatError);
    Py_VISIT(st->DumpError);
    Py_VISIT(st->LoadError);
    Py_VISIT(st->Channel);
    Py_VISIT(st->TimeoutError);
    Py_VISIT(st->str_id);
    Py_VISIT(st->str_acquire);
    Py_VISIT(st->str_release);
    Py_VISIT(st->str_send);
    Py_VISIT(st->str_get);
    Py_VISIT(st->str_engine);
    Py_VISIT(st->str_pending_last);
    Py_VISIT(st->str_send_pending_last);
    Py_VISIT(st->str_getremoteerror);
    Py_VISIT(st->ChannelQueueType);
    Py_VISIT(st->EngineType);
    Py_VISIT(st->ChannelBaseType);
    Py_VISIT(st->retired);
    return 0;
}

/* GC: drop every object reference held in the state. */
static int
module_clear(PyObject *module)
{
    exn_module_state *st = exn_state(module);
    Py_CLEAR(st->DataFormatError);
    Py_CLEAR(st->DumpError);
    Py_CLEAR(st->LoadError);
    Py_CLEAR(st->Channel);
    Py_CLEAR(st->TimeoutError);
    Py_CLEAR(st->str_id);
    Py_CLEAR(st->str_acquire);
    Py_CLEAR(st->str_release);
    Py_CLEAR(st->str_send);
    Py_CLEAR(st->str_get);
    Py_CLEAR(st->str_engine);
    Py_CLEAR(st->str_pending_last);
    Py_CLEAR(st->str_send_pending_last);
    Py_CLEAR(st->str_getremoteerror);
    Py_CLEAR(st->ChannelQueueType);
    Py_CLEAR(st->EngineType);
    Py_CLEAR(st->ChannelBaseType);
    Py_CLEAR(st->retired);
    /* (The cached strings are no GC containers: nothing to traverse.) */
    for (int i = 0; i < EXN_STRCACHE_SIZE; i++) {
        Py_CLEAR(st->strcache[i]);
    }
    return 0;
}

static void
module_free(void *module)
{
    (void)module_clear((PyObject *)module);
}

/* Exec slot: fill the (zeroed) state.  0 on success, -1 with an
   exception set. */
static int
module_exec(PyObject *module)
{
    exn_module_state *st = exn_state(module);
    static const struct {
        size_t offset;
        const char *text;
    } strings[] = {
        {offsetof(exn_module_state, str_id), "id"},
        {offsetof(exn_module_state, str_acquire), "acquire"},
        {offsetof(exn_module_state, str_release), "release"},
        {offsetof(exn_module_state, str_send), "send"},
        {offsetof(exn_module_state, str_get), "get"},
        {offsetof(exn_module_state, str_engine), "_engine"},
        {offsetof(exn_module_state, str_pending_last),
         "_pending_last_messages"},
        {offsetof(exn_module_state, str_send_pending_last),
         "_send_pending_last_messages"},
        {offsetof(exn_module_state, str_getremoteerror), "_getremoteerror"},
    };

    for (size_t i = 0; i < sizeof(strings) / sizeof(strings[0]); i++) {
        PyObject *s = PyUnicode_InternFromString(strings[i].text);
        if (s == NULL) {
            return -1;
        }
        *(PyObject **)((char *)st + strings[i].offset) = s;
    }
    st->retired = PyList_New(0);
    if (st->retired == NULL) {
        return -1;
    }
    if (exn_chanqueue_init(module, st) < 0
        || exn_engine_init(module, st) < 0
        || exn_channel_init(module, st) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot exn_slots[] = {
    {Py_mod_exec, (void *)module_exec},
    {0, NULL},
};

PyDoc_STRVAR(module_doc,
"Native core of execnet: the execnet 2.x serializer, frame builder,\n"
"channel queue (ChannelQueue), engine (Engine: framing, sends and the\n"
"receiver loop) and the base class of channels (ChannelBase: send() and\n"
"receive()).\n"
"\n"
"Internal module; use execnet.gateway_base, which configures it.");

PyModuleDef exn_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "execnet._execnet",
    .m_doc = module_doc,
    .m_size = sizeof(exn_module_state),
    .m_methods = exn_methods,
    .m_slots = exn_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__execnet(void)
{
    return PyModuleDef_Init(&exn_module_def);
}
