"""The execnet protocol, pure Python: serializer, frames, channels, gateways.

This module is the reference implementation of the wire protocol and the
code that runs on remote interpreters.  It must stay self-contained and
stdlib-only: the bootstrap sends its source text to interpreters that
cannot import our package, and executes it there as a plain module
(Python 3.8 and newer).

The hot path -- serializer, framing, receiver loop, channel queue -- sits
behind a small seam (``_Engine``, ``ChannelQueue``, ``_dumps_payload``,
``_loads_payload``); at the bottom of this file the native core replaces
those names when it can be imported and is not disabled with
``EXECNET_NO_EXTENSIONS``.  ``backend`` tells which engine runs.
"""
import os
import struct
import sys
import threading
import weakref

PROTOCOL_TAG = "execnet-native-1"

# ---------------------------------------------------------------------------
# exceptions

DUMPFORMAT_VERSION = b"\x02"


class DataFormatError(Exception):
    """Base class for serializer errors."""


class DumpError(DataFormatError):
    """An object cannot be serialized."""


class LoadError(DataFormatError):
    """Bytes cannot be deserialized."""


class RemoteError(Exception):
    """An exception raised by code on the other side of a channel.

    ``formatted`` holds the remote traceback text.
    """

    def __init__(self, formatted):
        super().__init__(formatted)
        self.formatted = formatted

    def __str__(self):
        return self.formatted

    def __repr__(self):
        return "%s: %s" % (self.__class__.__name__, self.formatted)

    def warn(self):
        if self.formatted != INTERRUPT_TEXT:
            sys.stderr.write("[%s] Warning: unhandled %r\n"
                             % (os.getpid(), self))


class TimeoutError(IOError):
    """A blocking channel or gateway operation timed out."""


INTERRUPT_TEXT = "keyboard-interrupted"
MAIN_THREAD_BUSY_TEXT = ("concurrent remote_exec would cause deadlock for "
                         "main_thread_only execmodel")


class GatewayReceivedTerminate(Exception):
    """The receiver got a GATEWAY_TERMINATE message."""


# ---------------------------------------------------------------------------
# execution models


class ExecModel:
    """Threading primitives of one execution model.

    ``thread``: remote_exec'd code runs on the worker's main thread when
    that is idle, else in a new thread; ``main_thread_only``: it runs on the
    main thread, one call after another.
    """

    _green = False  # gevent/eventlet: see _GreenExecModel

    def __init__(self, backend):
        self.backend = backend

    def __repr__(self):
        return "<ExecModel %r>" % self.backend

    # primitives
    def get_ident(self):
        return threading.get_ident()

    def sleep(self, delay):
        import time

        time.sleep(delay)

    def start(self, func, args=()):
        # a bare thread, as stock execnet's (not in threading.enumerate())
        import _thread

        _thread.start_new_thread(func, tuple(args))

    def fdopen(self, fd, mode, bufsize=1, closefd=True):
        return os.fdopen(fd, mode, bufsize, closefd=closefd)

    def Lock(self):
        # stock execnet hands out a re-entrant lock here, and code written
        # against it may rely on that
        return threading.RLock()

    def RLock(self):
        return threading.RLock()

    # the model's modules, as stock execnet offers them (pytest-xdist 3.6
    # uses execmodel.queue): imported on first use
    @property
    def queue(self):
        import queue

        return queue

    @property
    def socket(self):
        import socket

        return socket

    @property
    def subprocess(self):
        import subprocess

        return subprocess

    def Event(self):
        return threading.Event()

    def Condition(self, lock=None):
        return threading.Condition(lock)

    def Queue(self, maxsize=0):
        import queue

        return queue.Queue(maxsize)

    def select(self, rlist, wlist, xlist, timeout=None):
        import select

        return select.select(rlist, wlist, xlist, timeout)

    def PopenPiped(self, args, **kwargs):
        import subprocess

        return subprocess.Popen(args, **kwargs)


class _GreenExecModel(ExecModel):
    """gevent/eventlet: green threads and the library's primitives.

    The library is imported when the model is first asked for, never at
    module import.  Gateways of a green model use the pure-Python engine
    (``_GreenEngine``, ``_GreenChannelQueue``): its fds are non-blocking and
    read and written through the library's cooperative helpers, and every
    wait -- channel receive, waitclose, the worker's serve loop -- parks the
    greenlet and lets the hub run the others.
    """

    _green = True

    def __init__(self, backend):
        super().__init__(backend)
        import greenlet

        self._getcurrent = greenlet.getcurrent
        if backend == "gevent":
            import gevent
            import gevent.event
            import gevent.lock
            import gevent.os
            import gevent.queue
            import gevent.select

            self._mod = gevent
            self._sem = gevent.lock.Semaphore
            self._rlock = gevent.lock.RLock
            self._event = gevent.event.Event
            self._spawn = gevent.spawn
            self._queue = gevent.queue.Queue
            self._nb_read = gevent.os.nb_read
            self._nb_write = gevent.os.nb_write
            self._select = gevent.select.select
        else:
            import eventlet
            import eventlet.green.select
            import eventlet.hubs
            import eventlet.queue
            import eventlet.semaphore

            trampoline = eventlet.hubs.trampoline

            def nb_read(fd, n):
                while True:
                    try:
                        return os.read(fd, n)
                    except BlockingIOError:
                        trampoline(fd, read=True)

            def nb_write(fd, data):
                while True:
                    try:
                        return os.write(fd, data)
                    except BlockingIOError:
                        trampoline(fd, write=True)

            self._mod = eventlet
            self._sem = eventlet.semaphore.Semaphore
            self._rlock = None  # _GreenRLock
            self._event = None  # _GreenEvent
            self._spawn = eventlet.spawn
            self._queue = eventlet.queue.Queue
            self._nb_read = nb_read
            self._nb_write = nb_write
            self._select = eventlet.green.select.select

    def get_ident(self):
        return id(self._getcurrent())

    def sleep(self, delay):
        self._mod.sleep(delay)

    def start(self, func, args=()):
        return self._spawn(func, *args)

    def fdopen(self, fd, mode, bufsize=1, closefd=True):
        if self.backend == "gevent":
            from gevent.fileobject import FileObject

            return FileObject(fd, mode, bufsize, close=closefd)
        import eventlet.greenio

        if not closefd:
            fd = os.dup(fd)
        return eventlet.greenio.GreenPipe(fd, mode, bufsize)

    def Lock(self):
        return self.RLock()  # re-entrant, as for threads

    @property
    def queue(self):
        return __import__(self.backend + ".queue", fromlist=["queue"])

    @property
    def socket(self):
        if self.backend == "gevent":
            import gevent.socket as mod
        else:
            import eventlet.green.socket as mod
        return mod

    @property
    def subprocess(self):
        if self.backend == "gevent":
            import gevent.subprocess as mod
        else:
            import eventlet.green.subprocess as mod
        return mod

    def RLock(self):
        if self._rlock is None:
            return _GreenRLock(self)
        return self._rlock()

    def Event(self):
        if self._event is None:
            return _GreenEvent(self)
        return self._event()

    def Condition(self, lock=None):
        return _GreenCondition(self, lock)

    def Queue(self, maxsize=0):
        # both libraries read 0 as a rendezvous channel: None is unbounded
        return self._queue(maxsize if maxsize > 0 else None)

    def select(self, rlist, wlist, xlist, timeout=None):
        return self._select(rlist, wlist, xlist, timeout)

    def PopenPiped(self, args, **kwargs):
        if self.backend == "gevent":
            import gevent.subprocess as sp
        else:
            import eventlet.green.subprocess as sp
        return sp.Popen(args, **kwargs)


class _GreenCondition:
    """A condition variable whose waits park the greenlet (one waiter
    semaphore per wait), over any lock with acquire/release."""

    def __init__(self, model, lock=None):
        import collections

        self._sem = model._sem
        self._lock = lock if lock is not None else model._sem(1)
        self._waiters = collections.deque()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)

    def acquire(self, *args, **kwargs):
        return self._lock.acquire(*args, **kwargs)

    def release(self):
        self._lock.release()

    def wait(self, timeout=None):
        """Release the lock, wait for a notify (or ``timeout``), reacquire;
        return False on timeout."""
        waiter = self._sem(0)
        self._waiters.append(waiter)
        self._lock.release()
        got = returned = False
        try:
            got = waiter.acquire(True, timeout)
            returned = True
        finally:
            self._lock.acquire()
            if not got:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    # notified just as we gave up: a timeout takes the
                    # notification, an exception (a kill) passes it on
                    if returned:
                        got = True
                    else:
                        self.notify()
        return got

    def wait_for(self, predicate, timeout=None):
        import time

        result = predicate()
        if result or (timeout is not None and timeout <= 0):
            return result
        endtime = None
        if timeout is not None:
            endtime = time.monotonic() + timeout
        while not result:
            if endtime is not None:
                timeout = endtime - time.monotonic()
                if timeout <= 0:
                    break
            self.wait(timeout)
            result = predicate()
        return result

    def notify(self, n=1):
        waiters = self._waiters
        while waiters and n > 0:
            waiters.popleft().release()
            n -= 1

    def notify_all(self):
        self.notify(len(self._waiters))


class _GreenRLock:
    """A reentrant lock owned by a greenlet (eventlet has none of its own)."""

    def __init__(self, model):
        self._block = model._sem(1)
        self._getcurrent = model._getcurrent
        self._owner = None
        self._count = 0

    def acquire(self, blocking=True, timeout=None):
        me = self._getcurrent()
        if self._owner is me:
            self._count += 1
            return True
        if timeout is not None and timeout < 0:
            timeout = None
        if blocking:
            ok = self._block.acquire(True, timeout)
        else:
            ok = self._block.acquire(False)
        if ok:
            self._owner = me
            self._count = 1
        return ok

    def release(self):
        if self._owner is not self._getcurrent():
            raise RuntimeError("cannot release un-acquired lock")
        self._count -= 1
        if not self._count:
            self._owner = None
            self._block.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class _GreenEvent:
    """threading.Event's interface on a _GreenCondition (for eventlet)."""

    def __init__(self, model):
        self._cond = _GreenCondition(model)
        self._flag = False

    def is_set(self):
        return self._flag

    isSet = is_set

    def set(self):
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self):
        with self._cond:
            self._flag = False

    def wait(self, timeout=None):
        with self._cond:
            return self._cond.wait_for(lambda: self._flag, timeout)
_execmodels = {}


def get_execmodel(backend):
    """Return the ExecModel named ``backend`` (or ``backend`` if it is one)."""
    if hasattr(backend, "backend"):
        return backend
    model = _execmodels.get(backend)
    if model is None:
        if backend in ("thread", "main_thread_only"):
            model = ExecModel(backend)
        elif backend in ("gevent", "eventlet"):
            model = _GreenExecModel(backend)
        else:
            raise ValueError("unknown execmodel %r" % (backend,))
        _execmodels[backend] = model
    return model


# ---------------------------------------------------------------------------
# serializer: opcodes of execnet 2.x (see doc/protocol.rst)

FOUR_BYTE_INT_MAX = 2147483647
_int4 = struct.Struct("!i")
_double = struct.Struct("!d")
_complex = struct.Struct("!dd")
_header = struct.Struct("!bii")
MAX_NESTING = 1000
MAX_STREAM_LIST = 1 << 26  # load() from a file cannot check against the input size


def _dumps_payload(obj):
    """Serialize ``obj`` without the version byte, ending with STOP."""
    out = []
    try:
        _save(out.append, obj, 0, None)
    except RecursionError:
        raise DumpError("object too deeply nested or recursive") from None
    out.append(b"Q")
    return b"".join(out)


def _save(w, obj, depth, _channel_type):
    tp = type(obj)
    if tp is int:
        if -FOUR_BYTE_INT_MAX - 1 <= obj <= FOUR_BYTE_INT_MAX:
            w(b"F" + _int4.pack(obj))
        else:
            try:
                s = str(obj).encode("ascii")
            except ValueError as exc:  # int max str digits
                raise DumpError("can't serialize int: %s" % (exc,)) from None
            w(b"H" + _int4.pack(len(s)) + s)
    elif tp is str:
        try:
            s = obj.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DumpError("can't serialize str: %s" % (exc,)) from None
        w(b"N" + _int4.pack(len(s)))
        w(s)
    elif tp is bytes:
        w(b"A" + _int4.pack(len(obj)))
        w(obj)
    elif obj is None:
        w(b"L")
    elif obj is True:
        w(b"R")
    elif obj is False:
        w(b"C")
    elif tp is float:
        w(b"D" + _double.pack(obj))
    elif tp is complex:
        w(b"T" + _complex.pack(obj.real, obj.imag))
    elif tp is list or tp is dict or tp is tuple or tp is set or tp is frozenset:
        if depth >= MAX_NESTING:
            raise DumpError("object too deeply nested (>%d levels) or recursive"
                            % MAX_NESTING)
        depth += 1
        if tp is list:
            w(b"K" + _int4.pack(len(obj)))
            for i, item in enumerate(obj):
                w(b"F" + _int4.pack(i))
                _save(w, item, depth, None)
                w(b"P")
        elif tp is dict:
            w(b"J")
            for key, value in obj.items():
                _save(w, key, depth, None)
                _save(w, value, depth, None)
                w(b"P")
        else:
            for item in obj:
                _save(w, item, depth, None)
            code = b"@" if tp is tuple else b"O" if tp is set else b"E"
            w(code + _int4.pack(len(obj)))
    elif isinstance(obj, Channel):
        w(b"B" + _int4.pack(obj.id))
    else:
        raise DumpError("can't serialize %r" % (tp,))


class _Reader:
    """Byte source for the decoder: a buffer, or a file read on demand."""

    __slots__ = ("data", "pos", "file")

    def __init__(self, data=None, file=None):
        self.data = memoryview(data) if data is not None else None
        self.pos = 0
        self.file = file

    def read(self, n):
        if self.file is not None:
            b = self.file.read(n)
            if len(b) != n:
                raise LoadError("truncated data: wanted %d bytes, got %d"
                                % (n, len(b)))
            return b
        end = self.pos + n
        if end > len(self.data):
            raise LoadError("truncated data at offset %d: wanted %d bytes"
                            % (self.pos, n))
        b = self.data[self.pos:end]
        self.pos = end
        return b

    def remaining(self):
        if self.file is not None:
            return None
        return len(self.data) - self.pos


def _read_count(r):
    n = _int4.unpack(r.read(4))[0]
    if n < 0:
        raise LoadError("negative length %d" % n)
    rem = r.remaining()
    if rem is not None and n > rem:
        raise LoadError("length %d exceeds the %d bytes left" % (n, rem))
    return n


class _Unserializer:
    """Postfix stack machine over the opcode stream."""

    def __init__(self, reader, channel_factory, py2str_as_py3str,
                 py3str_as_py2str=False):
        self.r = reader
        self.stack = []
        self.channel_factory = channel_factory
        self.py2str_as_py3str = py2str_as_py3str
        self.py3str_as_py2str = py3str_as_py2str

    def load(self):
        r = self.r
        stack = self.stack
        push = stack.append
        # nesting depth of the containers built so far, by id(); bounded like
        # the native decoder so that deallocating the result cannot overflow
        # the C stack
        depth = {}
        while True:
            op = bytes(r.read(1))
            if op == b"F" or op == b"G":
                push(_int4.unpack(r.read(4))[0])
            elif op == b"N" or op == b"S":
                n = _read_count(r)
                if op == b"N" and self.py3str_as_py2str:
                    push(bytes(r.read(n)))  # the raw UTF-8, unchecked
                    continue
                try:
                    push(str(r.read(n), "utf-8"))
                except UnicodeDecodeError as exc:
                    raise LoadError("invalid UTF-8 in str: %s" % (exc,)) from None
            elif op == b"A":
                push(bytes(r.read(_read_count(r))))
            elif op == b"P":
                if len(stack) < 3:
                    raise LoadError("setitem with too few items on the stack")
                value = stack.pop()
                key = stack.pop()
                container = stack[-1]
                tp = type(container)
                d = depth.get(id(value), 0) + 1
                if d > depth.get(id(container), 1):
                    if d > MAX_NESTING:
                        raise LoadError("data nested deeper than %d levels"
                                        % MAX_NESTING)
                    depth[id(container)] = d
                if tp is dict:
                    try:
                        container[key] = value
                    except TypeError as exc:
                        raise LoadError("unhashable dict key: %s" % (exc,)) from None
                elif tp is list:
                    if type(key) is not int or not 0 <= key < len(container):
                        raise LoadError("bad list index %r" % (key,))
                    container[key] = value
                else:
                    raise LoadError("setitem on %s" % (tp.__name__,))
            elif op == b"L":
                push(None)
            elif op == b"R":
                push(True)
            elif op == b"C":
                push(False)
            elif op == b"K":
                n = _int4.unpack(r.read(4))[0]
                rem = r.remaining()
                if n < 0 or n > (MAX_STREAM_LIST if rem is None else rem // 7):
                    raise LoadError("bad list length %d" % n)
                lst = [None] * n
                depth[id(lst)] = 1
                push(lst)
            elif op == b"J":
                dct = {}
                depth[id(dct)] = 1
                push(dct)
            elif op == b"@" or op == b"O" or op == b"E":
                n = _int4.unpack(r.read(4))[0]
                if n < 0 or n > len(stack):
                    raise LoadError("bad item count %d" % n)
                items = stack[len(stack) - n:]
                del stack[len(stack) - n:]
                d = 1 + max([depth.get(id(x), 0) for x in items], default=0)
                if d > MAX_NESTING:
                    raise LoadError("data nested deeper than %d levels" % MAX_NESTING)
                if op == b"@":
                    obj = tuple(items)
                else:
                    try:
                        obj = set(items) if op == b"O" else frozenset(items)
                    except TypeError as exc:
                        raise LoadError("unhashable set item: %s" % (exc,)) from None
                depth[id(obj)] = d
                push(obj)
            elif op == b"H" or op == b"I":
                n = _read_count(r)
                push(_parse_long(bytes(r.read(n))))
            elif op == b"D":
                push(_double.unpack(r.read(8))[0])
            elif op == b"T":
                re_, im = _complex.unpack(r.read(16))
                push(complex(re_, im))
            elif op == b"M":
                b = bytes(r.read(_read_count(r)))
                push(b.decode("latin-1") if self.py2str_as_py3str else b)
            elif op == b"B":
                chid = _int4.unpack(r.read(4))[0]
                if self.channel_factory is None:
                    raise LoadError("channel in data without a gateway")
                push(self.channel_factory(chid))
            elif op == b"Q":
                if len(stack) != 1:
                    raise LoadError("stop with %d items on the stack" % len(stack))
                return stack.pop()
            elif not op:
                raise LoadError("truncated data")
            else:
                raise LoadError("unknown opcode %r" % (op,))


def _loads_payload(data, channel_factory=None, py2str_as_py3str=False,
                   py3str_as_py2str=False):
    """Decode one payload (no version byte) that ends with STOP.

    The buffer fast path of ``_Unserializer`` (which ``load`` uses for
    streams): same opcodes, same checks, with offsets instead of reads.
    ``py2str_as_py3str``: ``M`` loads as str (latin-1), else bytes;
    ``py3str_as_py2str``: ``N`` loads as its raw UTF-8 bytes, else str.
    """
    if type(data) is not bytes:
        data = bytes(data)
    try:
        return _decode_buffer(data, channel_factory, py2str_as_py3str,
                              py3str_as_py2str)
    except (struct.error, IndexError):
        raise LoadError("truncated data") from None


def _decode_buffer(data, channel_factory, py2str_as_py3str, py3str_as_py2str):
    end = len(data)
    pos = 0
    stack = []
    push = stack.append
    pop = stack.pop
    unpack4 = _int4.unpack_from
    depth = {}  # nesting depth of containers by id(), as in _Unserializer
    while True:
        op = data[pos]
        pos += 1
        if op == 0x46 or op == 0x47:  # F G
            push(unpack4(data, pos)[0])
            pos += 4
        elif op == 0x4E or op == 0x53:  # N S
            n = unpack4(data, pos)[0]
            pos += 4
            if n < 0 or n > end - pos:
                raise LoadError("bad str length %d" % n)
            if py3str_as_py2str and op == 0x4E:
                push(data[pos:pos + n])  # the raw UTF-8, unchecked
                pos += n
                continue
            try:
                push(data[pos:pos + n].decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise LoadError("invalid UTF-8 in str: %s" % (exc,)) from None
            pos += n
        elif op == 0x50:  # P
            if len(stack) < 3:
                raise LoadError("setitem with too few items on the stack")
            value = pop()
            key = pop()
            container = stack[-1]
            if depth:
                d = depth.get(id(value), 0) + 1
                if d > depth.get(id(container), 1):
                    if d > MAX_NESTING:
                        raise LoadError("data nested deeper than %d levels"
                                        % MAX_NESTING)
                    depth[id(container)] = d
            tp = type(container)
            if tp is dict:
                try:
                    container[key] = value
                except TypeError as exc:
                    raise LoadError("unhashable dict key: %s" % (exc,)) from None
            elif tp is list:
                if type(key) is not int or not 0 <= key < len(container):
                    raise LoadError("bad list index %r" % (key,))
                container[key] = value
            else:
                raise LoadError("setitem on %s" % (tp.__name__,))
        elif op == 0x4C:  # L
            push(None)
        elif op == 0x52:  # R
            push(True)
        elif op == 0x43:  # C
            push(False)
        elif op == 0x4A:  # J
            obj = {}
            depth[id(obj)] = 1
            push(obj)
        elif op == 0x4B:  # K
            n = unpack4(data, pos)[0]
            pos += 4
            if n < 0 or n > (end - pos) // 7:
                raise LoadError("bad list length %d" % n)
            obj = [None] * n
            depth[id(obj)] = 1
            push(obj)
        elif op == 0x41:  # A
            n = unpack4(data, pos)[0]
            pos += 4
            if n < 0 or n > end - pos:
                raise LoadError("bad bytes length %d" % n)
            push(data[pos:pos + n])
            pos += n
        elif op == 0x40 or op == 0x4F or op == 0x45:  # @ O E
            n = unpack4(data, pos)[0]
            pos += 4
            if n < 0 or n > len(stack):
                raise LoadError("bad item count %d" % n)
            items = stack[len(stack) - n:]
            del stack[len(stack) - n:]
            d = 1 + max([depth.get(id(x), 0) for x in items], default=0)
            if d > MAX_NESTING:
                raise LoadError("data nested deeper than %d levels" % MAX_NESTING)
            if op == 0x40:
                obj = tuple(items)
            else:
                try:
                    obj = set(items) if op == 0x4F else frozenset(items)
                except TypeError as exc:
                    raise LoadError("unhashable set item: %s" % (exc,)) from None
            depth[id(obj)] = d
            push(obj)
        elif op == 0x44:  # D
            push(_double.unpack_from(data, pos)[0])
            pos += 8
        elif op == 0x48 or op == 0x49:  # H I
            n = unpack4(data, pos)[0]
            pos += 4
            if n < 0 or n > end - pos:
                raise LoadError("bad long int length %d" % n)
            push(_parse_long(data[pos:pos + n]))
            pos += n
        elif op == 0x54:  # T
            re_, im = _complex.unpack_from(data, pos)
            push(complex(re_, im))
            pos += 16
        elif op == 0x4D:  # M
            n = unpack4(data, pos)[0]
            pos += 4
            if n < 0 or n > end - pos:
                raise LoadError("bad str length %d" % n)
            b = data[pos:pos + n]
            push(b.decode("latin-1") if py2str_as_py3str else b)
            pos += n
        elif op == 0x42:  # B
            chid = unpack4(data, pos)[0]
            pos += 4
            if channel_factory is None:
                raise LoadError("channel in data without a gateway")
            push(channel_factory(chid))
        elif op == 0x51:  # Q
            if len(stack) != 1:
                raise LoadError("stop with %d items on the stack" % len(stack))
            if pos != end:
                raise LoadError("trailing data after stop opcode")
            return stack[0]
        else:
            raise LoadError("unknown opcode %r at offset %d" % (bytes([op]), pos - 1))


def _parse_long(digits):
    body = digits[1:] if digits[:1] == b"-" else digits
    if not body or not body.isdigit():
        raise LoadError("bad long int digits")
    try:
        return int(digits)
    except ValueError as exc:
        raise LoadError("bad long int: %s" % (exc,)) from None


def dumps(obj):
    """Serialize ``obj`` to bytes (with the format version byte)."""
    return DUMPFORMAT_VERSION + _dumps_payload(obj)


def loads(bytestring, py2str_as_py3str=False, py3str_as_py2str=False):
    """Inverse of :func:`dumps`."""
    data = memoryview(bytestring)
    if len(data) < 1 or data[:1] != DUMPFORMAT_VERSION:
        raise LoadError("unknown serialization format version (%r)"
                        % (bytes(data[:1]),))
    return _loads_payload(data[1:], None, py2str_as_py3str, py3str_as_py2str)


def dump(byteio, obj):
    """Write ``dumps(obj)`` to the binary file ``byteio``."""
    byteio.write(dumps(obj))


def load(byteio, py2str_as_py3str=False, py3str_as_py2str=False):
    """Read one object written by :func:`dump` from ``byteio``."""
    version = byteio.read(1)
    if version != DUMPFORMAT_VERSION:
        raise LoadError("unknown serialization format version (%r)" % (version,))
    return _Unserializer(_Reader(file=byteio), None, py2str_as_py3str,
                         py3str_as_py2str).load()


# ---------------------------------------------------------------------------
# messages

class Message:
    """Names of the message types; the frame is ``!bii`` + payload."""

    STATUS = 0
    RECONFIGURE = 1
    GATEWAY_TERMINATE = 2
    CHANNEL_EXEC = 3
    CHANNEL_DATA = 4
    CHANNEL_CLOSE = 5
    CHANNEL_CLOSE_ERROR = 6
    CHANNEL_LAST_MESSAGE = 7

    _names = ["STATUS", "RECONFIGURE", "GATEWAY_TERMINATE", "CHANNEL_EXEC",
              "CHANNEL_DATA", "CHANNEL_CLOSE", "CHANNEL_CLOSE_ERROR",
              "CHANNEL_LAST_MESSAGE"]


def _frame(msgcode, channelid, payload=b""):
    return _header.pack(msgcode, channelid, len(payload)) + payload


def _frame_obj(msgcode, channelid, obj):
    return _frame(msgcode, channelid, _dumps_payload(obj))


# ---------------------------------------------------------------------------
# channel queue: the per-channel FIFO with close state


class ChannelQueue:
    """FIFO of received items that ends, once, with a close.

    ``get(timeout)`` returns the next item; once the queue is closed and
    empty it raises EOFError; TimeoutError when ``timeout`` passes first.
    """

    def __init__(self):
        import collections

        self._cond = threading.Condition(threading.Lock())
        self._items = collections.deque()
        self._closed = False

    def put(self, item):
        """Append ``item``; return False (dropping it) if closed."""
        with self._cond:
            if self._closed:
                return False
            self._items.append(item)
            self._cond.notify()
            return True

    def close(self):
        """Mark the end; return False if it was closed already."""
        with self._cond:
            if self._closed:
                return False
            self._closed = True
            self._cond.notify_all()
            return True

    def is_closed(self):
        return self._closed

    def drain(self):
        """Remove and return every queued item."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items

    def get(self, timeout=None):
        if timeout is not None and timeout < 0:
            # as queue.Queue.get (and so stock execnet's receive)
            raise ValueError("'timeout' must be a non-negative number")
        with self._cond:
            if not self._items and not self._closed:
                if not self._cond.wait_for(
                        lambda: self._items or self._closed, timeout):
                    raise TimeoutError("no item after %r seconds" % (timeout,))
            if self._items:
                return self._items.popleft()
            raise EOFError()

    def wait_closed(self, timeout=None):
        """Wait until closed; return False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed, timeout)

    def __len__(self):
        return len(self._items)


class _GreenChannelQueue(ChannelQueue):
    """The pure ChannelQueue on a green condition (gevent/eventlet): a
    blocking get() parks the greenlet instead of the hub's thread."""

    def __init__(self, execmodel):
        import collections

        self._cond = execmodel.Condition(execmodel._sem(1))
        self._items = collections.deque()
        self._closed = False


# ---------------------------------------------------------------------------
# channels

NO_ENDMARKER_WANTED = object()


def _native_core():
    """Return the native core module, or None: disabled with
    ``EXECNET_NO_EXTENSIONS``, not built, or this file runs as plain source
    outside the package (the relative import cannot work there)."""
    if os.environ.get("EXECNET_NO_EXTENSIONS") or __name__ != "execnet.gateway_base":
        return None
    try:
        from . import _execnet
    except ImportError:
        return None
    return _execnet


# decided before Channel is defined, as it picks Channel's base class;
# _use_native() at the bottom switches the rest of the hot path over
_native = _native_core()


class _PyChannelBase:
    """Channel's hot methods; the native core's ``ChannelBase`` is the same
    in C, over the attributes ``id``, ``gateway``, ``_queue``, ``_closed``,
    ``_callback`` and ``_remoteerrors`` that ``Channel.__init__`` sets."""

    def send(self, item):
        """Send ``item`` to the other side (must be serializable)."""
        if self._closed:
            raise OSError("cannot send to %r" % (self,))
        gw = self.gateway
        if gw._pending_last_messages:
            gw._send_pending_last_messages()
        gw._engine.send(Message.CHANNEL_DATA, self.id, item)

    def receive(self, timeout=None):
        """Return the next item; raise EOFError when the channel closed,
        RemoteError when the peer closed it with an error, TimeoutError."""
        if self._callback is not None:
            raise OSError("calling receive() on channel with receiver callback")
        try:
            return self._queue.get(timeout)
        except EOFError:
            error = self._getremoteerror()
            if error is not None:
                raise error from None
            raise


_ChannelBase = getattr(_native, "ChannelBase", None) or _PyChannelBase


class Channel(_ChannelBase):
    """One end of a bidirectional connection to code on the other side."""

    RemoteError = RemoteError
    TimeoutError = TimeoutError
    _INTERNALWAKEUP = 1000
    _executing = False

    def __init__(self, gateway, id):
        assert isinstance(id, int)
        self.gateway = gateway
        self.id = id
        self._queue = gateway._queue_factory()
        self._closed = False  # no more sends from this side
        self._callback = None
        self._remoteerrors = []
        # how items for this channel load: the gateway's setting when the
        # channel is made, then whatever reconfigure() sets
        self._strconfig = gateway._strconfig

    def __repr__(self):
        flag = "closed" if self.isclosed() else "open"
        return "<Channel id=%d %s>" % (self.id, flag)

    def __del__(self):
        # an error the peer closed us with that nobody received is not
        # lost silently (as with stock execnet)
        try:
            for error in getattr(self, "_remoteerrors", None) or ():
                if isinstance(error, RemoteError):
                    error.warn()
        except Exception:
            pass  # interpreter shutdown: module globals may be gone
        gw = getattr(self, "gateway", None)
        if (gw is None or self._closed or self._queue.is_closed()
                or self._callback is not None):
            # (a callback goes on receiving without this object)
            return
        # nobody can receive on this channel anymore: tell the peer, from
        # another thread.  A finalizer may run inside a send (GC during an
        # allocation) where the send lock is held: never send here.
        try:
            gw._engine.clear_route(self.id)
            gw._pending_last_messages.append(self.id)
            gw._schedule_pending_flush()
        except Exception:
            pass

    def _getremoteerror(self):
        try:
            return self._remoteerrors.pop(0)
        except IndexError:
            return None

    def setcallback(self, callback, endmarker=NO_ENDMARKER_WANTED):
        """Have ``callback(item)`` called, in the receiver thread, for every
        item; already queued items are passed first.  At close,
        ``callback(endmarker)`` is called if an endmarker was given."""
        factory = self.gateway._channelfactory
        # the dispatch lock keeps the receiver out while we switch over,
        # so items reach the callback in order
        with factory._dispatchlock:
            if self._callback is not None:
                raise OSError("%r has a callback already" % (self,))
            self._callback = callback
            for item in self._queue.drain():
                # a failing callback closes the channel, as in the receiver
                if not factory._callback_call(callback, self.id, item):
                    return
            if self._queue.is_closed():
                if endmarker is not NO_ENDMARKER_WANTED:
                    callback(endmarker)
                return
            factory._callbacks[self.id] = (callback, endmarker)
            if self._strconfig == self.gateway._strconfig:
                self.gateway._engine.set_route(self.id, callback)
            else:
                self.gateway._engine.clear_route(self.id)

    def isclosed(self):
        """True once the channel is closed (by us, or by the peer's close)."""
        return self._closed

    def makefile(self, mode="w", proxyclose=False):
        """A file-like object writing to (mode 'w') or reading from ('r') the channel."""
        if mode == "w":
            return ChannelFileWrite(channel=self, proxyclose=proxyclose)
        elif mode == "r":
            return ChannelFileRead(channel=self, proxyclose=proxyclose)
        raise ValueError("mode %r not available" % (mode,))

    def close(self, error=None):
        """Close the channel; with ``error`` the peer's receive/waitclose
        raise it as a RemoteError."""
        if self._executing:
            raise OSError("cannot explicitly close channel within remote_exec")
        self._close(error)

    def _close(self, error=None):
        if self._closed:
            return
        self._closed = True
        gw = self.gateway
        peer_open = not self._queue.is_closed()
        gw._channelfactory._local_close(self.id, None, local=True)
        if peer_open:
            try:
                if error is not None:
                    gw._send(Message.CHANNEL_CLOSE_ERROR, self.id, str(error))
                else:
                    gw._send(Message.CHANNEL_CLOSE, self.id)
            except (OSError, ValueError):
                pass

    def waitclose(self, timeout=None):
        """Wait until the channel is closed; raise a RemoteError the peer
        sent, or TimeoutError."""
        if not self._queue.wait_closed(timeout):
            raise TimeoutError("Timeout after %r seconds" % (timeout,))
        error = self._getremoteerror()
        if error is not None:
            raise error

    # send() and receive() are inherited from _ChannelBase

    def __iter__(self):
        return self

    def next(self):
        try:
            return self.receive()
        except EOFError:
            raise StopIteration from None

    __next__ = next

    def reconfigure(self, py2str_as_py3str=True, py3str_as_py2str=False):
        """Set how this channel's items load, on both sides:
        ``py2str_as_py3str``: py2 str (``M``) as str, else bytes;
        ``py3str_as_py2str``: str as bytes (UTF-8)."""
        data = (py2str_as_py3str, py3str_as_py2str)
        self._strconfig = data
        if data != self.gateway._strconfig:
            # the engine decodes routed items with the gateway's setting
            self.gateway._engine.clear_route(self.id)
        self.gateway._send(Message.RECONFIGURE, self.id, data)


class ChannelFactory:
    """The channels of one gateway: id allocation and message dispatch.

    Plain channels are *routed*: the engine puts their items into the
    channel queue (or hands them to the callback) itself; frames for other
    ids come to ``_dispatch``.  The dispatch lock is held by the receiver
    while it delivers, and by ``setcallback`` while it switches over.
    """

    def __init__(self, gateway, startcount=1):
        self._channels = weakref.WeakValueDictionary()
        self._callbacks = {}
        self._writelock = gateway.execmodel.RLock()
        self._dispatchlock = gateway.execmodel.RLock()
        self.gateway = gateway
        self.count = startcount
        self.finished = False
        self._list = list  # needed during interpreter shutdown

    def new(self, id=None):
        """Return the channel with ``id``, creating it (and a fresh id) as needed."""
        with self._writelock:
            if self.finished:
                raise OSError("connection already closed: %s" % (self.gateway,))
            if id is None:
                id = self.count
                self.count += 2
            try:
                channel = self._channels[id]
            except KeyError:
                channel = self._channels[id] = Channel(self.gateway, id)
                self.gateway._engine.set_route(id, channel._queue)
            return channel

    def channels(self):
        return self._list(self._channels.values())

    def _local_close(self, id, remoteerror=None, local=False):
        """Close channel ``id``: for receiving, and for sending too."""
        self.gateway._engine.clear_route(id)
        with self._writelock:
            channel = self._channels.get(id)
            cb = self._callbacks.pop(id, None)
            if channel is not None:
                if remoteerror is not None:
                    channel._remoteerrors.append(remoteerror)
                channel._closed = True
                channel._queue.close()
                del self._channels[id]
        if cb is not None:
            callback, endmarker = cb
            if endmarker is not NO_ENDMARKER_WANTED:
                self._callback_call(callback, id, endmarker)
        elif remoteerror is not None and channel is None and not local:
            remoteerror.warn()

    def _local_receive(self, id, data):
        """Deliver one CHANNEL_DATA payload for an id that is not routed."""
        channel = self._channels.get(id)
        cb = self._callbacks.get(id)
        if channel is None and cb is None:
            return  # nobody can receive on it anymore
        cfg = self.gateway._strconfig if channel is None else channel._strconfig
        item = _loads_payload(data, self.new, cfg[0], cfg[1])
        if cb is None:
            channel._queue.put(item)
        else:
            self._callback_call(cb[0], id, item)

    def _callback_call(self, callback, id, item):
        """Call ``callback(item)``; on an exception close the channel with
        it and return False."""
        try:
            callback(item)
            return True
        except Exception as exc:
            self._callback_error(id, exc)
            return False

    def _callback_error(self, id, exc):
        """A callback raised: close its channel with the error, both sides."""
        excinfo = (type(exc), exc, exc.__traceback__)
        self.gateway._trace("exception during callback: %s" % (exc,))
        errortext = self.gateway._geterrortext(excinfo)
        try:
            self.gateway._send(Message.CHANNEL_CLOSE_ERROR, id, errortext)
        except (OSError, ValueError):
            pass
        self._local_close(id, RemoteError(errortext))

    def _finished_receiving(self, reason=None):
        """The connection ended: close every channel, with ``reason``."""
        with self._writelock:
            self.finished = True
        with self._dispatchlock:
            for id in self._list(self._channels):
                self._local_close(id, reason)
            for id in self._list(self._callbacks):
                self._local_close(id, reason)


class ChannelFile:
    def __init__(self, channel, proxyclose=True):
        self.channel = channel
        self._proxyclose = proxyclose

    def isatty(self):
        return False

    def close(self):
        if self._proxyclose:
            self.channel.close()

    def __repr__(self):
        state = "closed" if self.channel.isclosed() else "open"
        return "<ChannelFile %d %s>" % (self.channel.id, state)


class ChannelFileWrite(ChannelFile):
    def write(self, out):
        self.channel.send(out)

    def flush(self):
        pass


class ChannelFileRead(ChannelFile):
    def __init__(self, channel, proxyclose=True):
        super().__init__(channel, proxyclose)
        self._buffer = None

    def read(self, n):
        try:
            if self._buffer is None:
                self._buffer = self.channel.receive()
            while len(self._buffer) < n:
                self._buffer += self.channel.receive()
        except EOFError:
            self.close()
        if self._buffer is None:
            ret = ""
        else:
            ret = self._buffer[:n]
            self._buffer = self._buffer[n:]
        return ret

    def readline(self):
        if self._buffer is not None:
            i = self._buffer.find("\n")
            if i != -1:
                return self.read(i + 1)
            line = self.read(len(self._buffer) + 1)
        else:
            line = self.read(1)
        while line and line[-1] != "\n":
            c = self.read(1)
            if not c:
                break
            line += c
        return line


# ---------------------------------------------------------------------------
# the engine: framing and the receiver loop over a pair of file descriptors


class _Engine:
    """Frames over a (read fd, write fd) pair.

    ``send`` serializes and writes one frame under the send lock.  The
    receiver loop reads frames; CHANNEL_DATA for a routed channel id goes
    straight to its ChannelQueue (or callback), every other frame to
    ``dispatch(msgcode, channelid, payload)``.  The native core provides the
    same class.
    """

    def __init__(self, rfd, wfd):
        self.rfd = rfd
        self.wfd = wfd
        self._lock = threading.Lock()
        self._closed = False
        self._routes = {}
        self.py2str_as_py3str = False
        self.py3str_as_py2str = False

    def send(self, msgcode, channelid, obj=None):
        if obj is None and msgcode != Message.CHANNEL_DATA:
            data = _frame(msgcode, channelid)
        else:
            data = _frame_obj(msgcode, channelid, obj)
        with self._lock:
            if self._closed:
                raise OSError("cannot send (already closed?)")
            view = memoryview(data)
            while view:
                view = view[os.write(self.wfd, view):]

    def close_write(self):
        """Close the write side; later sends raise OSError."""
        with self._lock:
            if not self._closed:
                self._closed = True
                _close_fd(self.wfd)

    # every send writes its frame before it returns: nothing to batch
    batch_bursts = False

    def flush(self, timeout=None):
        """Wait until every frame sent so far is written; True when done."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._lock.release()
        return True

    def set_route(self, channelid, target):
        """Deliver DATA for ``channelid`` to ``target``: a ChannelQueue or
        a callable."""
        self._routes[channelid] = target

    def clear_route(self, channelid):
        self._routes.pop(channelid, None)

    _queue_type = None  # the routed queues' class; None: ChannelQueue

    def _reader(self):
        """Return ``read(n)``: n bytes from the read fd, fewer at EOF."""
        return os.fdopen(self.rfd, "rb", 65536, closefd=False).read

    def run_receiver(self, dispatch, channel_factory, callback_error, lock):
        """Read and dispatch frames until EOF, an error, or dispatch()
        returns True; return the reason: an exception instance, or None
        after a GATEWAY_TERMINATE.  ``lock`` is held while delivering."""
        read = self._reader()
        queue_type = self._queue_type or ChannelQueue
        routes = self._routes
        while True:
            head = read(9)
            if len(head) != 9:
                return EOFError("connection closed" if not head else
                                "connection closed inside a frame header")
            msgcode, channelid, length = _header.unpack(head)
            if length < 0:
                return LoadError("negative frame length %d" % length)
            payload = read(length) if length else b""
            if len(payload) != length:
                return EOFError("connection closed inside a frame")
            with lock:
                try:
                    target = routes.get(channelid) \
                        if msgcode == Message.CHANNEL_DATA else None
                    if target is None:
                        if dispatch(msgcode, channelid, payload):
                            return None
                        continue
                    item = _loads_payload(payload, channel_factory,
                                          self.py2str_as_py3str,
                                          self.py3str_as_py2str)
                    if type(target) is queue_type:
                        target.put(item)
                    else:
                        try:
                            target(item)
                        except Exception as exc:
                            callback_error(channelid, exc)
                    item = target = None
                except DataFormatError as exc:
                    return exc


class _GreenEngine(_Engine):
    """The pure engine for gevent/eventlet gateways.

    Both fds are made non-blocking and go through the model's cooperative
    ``nb_read``/``nb_write``, and the send lock is the model's, so a full
    or empty pipe parks the greenlet that waits on it, never the hub.
    Routed queues are _GreenChannelQueue.
    """

    _queue_type = _GreenChannelQueue

    def __init__(self, rfd, wfd, execmodel):
        super().__init__(rfd, wfd)
        self._lock = execmodel._sem(1)
        self._nb_read = execmodel._nb_read
        self._nb_write = execmodel._nb_write
        for fd in {rfd, wfd}:
            os.set_blocking(fd, False)

    def send(self, msgcode, channelid, obj=None):
        if obj is None and msgcode != Message.CHANNEL_DATA:
            data = _frame(msgcode, channelid)
        else:
            data = _frame_obj(msgcode, channelid, obj)
        write = self._nb_write
        with self._lock:
            if self._closed:
                raise OSError("cannot send (already closed?)")
            view = memoryview(data)
            while view:
                view = view[write(self.wfd, view):]

    def _reader(self):
        rfd = self.rfd
        nb_read = self._nb_read
        buf = bytearray()

        def read(n):
            while len(buf) < n:
                chunk = nb_read(rfd, min(max(n - len(buf), 65536), 262144))
                if not chunk:
                    break
                buf.extend(chunk)
            data = bytes(buf[:n])
            del buf[:n]
            return data

        return read


def _close_fd(fd):
    try:
        os.close(fd)
    except OSError:
        pass


# ---------------------------------------------------------------------------
# gateways

sysex = (KeyboardInterrupt, SystemExit)


class BaseGateway:
    """What both ends of a connection share: channels, sending, dispatch."""

    _sysex = sysex
    id = "<worker>"

    def __init__(self, rfd, wfd, id, execmodel, _startcount=2):
        self.execmodel = get_execmodel(execmodel)
        self.id = id
        # (py2str_as_py3str, py3str_as_py2str) for new channels and for
        # routed items (the engine's flags); see _set_strconfig()
        self._strconfig = (True, False)
        self._pending_last_messages = []
        self._flush_scheduled = False
        model = self.execmodel
        if model._green:
            # a blocking native call would stall the hub: the pure engine,
            # on the library's cooperative I/O and primitives
            self._engine = _GreenEngine(rfd, wfd, model)
            self._queue_factory = lambda: _GreenChannelQueue(model)
        else:
            self._engine = _Engine(rfd, wfd)
            self._queue_factory = ChannelQueue
        self._engine.py2str_as_py3str = True
        self._engine.py3str_as_py2str = False
        self._channelfactory = ChannelFactory(self, _startcount)
        self._receivelock = model.RLock()
        self._receivethread = None
        self._receive_done = model.Event()
        self._receive_reason = None

    def _trace(self, *msg):
        if os.environ.get("EXECNET_DEBUG"):
            sys.stderr.write("[%s %s] %s\n" % (os.getpid(), self.id,
                                              " ".join(map(str, msg))))

    def _geterrortext(self, excinfo):
        import traceback  # not imported before the handshake: it costs ~4 ms

        try:
            lines = traceback.format_exception(*excinfo)
            # the text goes over the wire as UTF-8: lone surrogates (from
            # a message built of undecodable bytes, say) are escaped
            return "".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")
        except Exception as exc:
            return "%s: %s (formatting the traceback failed)" % (
                type(excinfo[1]).__name__, exc)

    def _send(self, msgcode, channelid=0, data=None):
        if self._pending_last_messages:
            self._send_pending_last_messages()
        self._engine.send(msgcode, channelid, data)

    def _schedule_pending_flush(self):
        """Have the queued LAST_MESSAGEs sent soon, even if nothing else is
        ever sent on this gateway (one flusher at a time)."""
        if self._flush_scheduled or sys.is_finalizing():
            return
        self._flush_scheduled = True
        try:
            self.execmodel.start(self._flush_pending)
        except Exception:  # no new threads (interpreter shutdown): next send
            self._flush_scheduled = False

    def _flush_pending(self):
        self._flush_scheduled = False
        try:
            self._send_pending_last_messages()
        except (OSError, ValueError):
            pass  # the connection is gone: nothing to tell

    def _send_pending_last_messages(self):
        """Tell the peer about channels collected here (Channel.__del__)
        before the next frame goes out."""
        pending = self._pending_last_messages
        while pending:
            try:
                channelid = pending.pop()
            except IndexError:  # another thread took the last one
                break
            self._engine.send(Message.CHANNEL_LAST_MESSAGE, channelid)

    def _initreceive(self):
        if self.execmodel._green:
            self._receivethread = self.execmodel.start(self._thread_receiver)
            return
        # a bare thread, as stock execnet's: it does not show in
        # threading.enumerate()/active_count(), which code under test may
        # count (pytest-xdist runs whole test sessions in workers)
        import _thread

        self._receivethread = _thread.start_new_thread(self._thread_receiver, ())

    def _thread_receiver(self):
        reason = None
        try:
            factory = self._channelfactory
            reason = self._engine.run_receiver(
                self._dispatch, factory.new, factory._callback_error,
                factory._dispatchlock)
        except Exception as exc:
            # a failure in dispatch ends the connection: say why
            reason = exc
            self._trace("receiver failed: %r" % (exc,))
        finally:
            self._receive_reason = reason
            self._channelfactory._finished_receiving(self._lost_error(reason))
            self._receive_done.set()
            self._terminate_execution()

    def _dispatch(self, msgcode, channelid, payload):
        """Handle one frame; return True to stop the receiver."""
        factory = self._channelfactory
        if msgcode == Message.CHANNEL_DATA:
            factory._local_receive(channelid, payload)
        elif msgcode == Message.CHANNEL_CLOSE:
            factory._local_close(channelid)
        elif msgcode == Message.CHANNEL_CLOSE_ERROR:
            text = _loads_payload(payload)
            factory._local_close(channelid, RemoteError(text))
        elif msgcode == Message.CHANNEL_LAST_MESSAGE:
            # the peer dropped its end: as with stock execnet, sending to it
            # raises from now on (a task streaming into a dropped channel
            # stops instead of sending into the void)
            factory._local_close(channelid)
        elif msgcode == Message.CHANNEL_EXEC:
            self._local_schedulexec(channelid, payload)
        elif msgcode == Message.STATUS:
            self._send(Message.CHANNEL_DATA, channelid, self._status_dict())
            self._send(Message.CHANNEL_CLOSE, channelid)
        elif msgcode == Message.RECONFIGURE:
            data = _loads_payload(payload)
            if type(data) is not tuple or len(data) != 2:
                raise LoadError("bad reconfigure payload")
            if channelid == 0:
                self._set_strconfig(data)
            else:
                channel = factory._channels.get(channelid)
                if channel is not None:
                    channel._strconfig = data
                    if data != self._strconfig:
                        # not the engine's setting: the slow path decodes
                        self._engine.clear_route(channelid)
        elif msgcode == Message.GATEWAY_TERMINATE:
            return True
        else:
            raise LoadError("unknown message type %d" % msgcode)
        return False

    def _set_strconfig(self, strconfig):
        """Make ``strconfig`` the gateway's string setting: for channels
        made from now on, and the engine's flags for routed items.
        Existing channels keep theirs: those that differ now are unrouted,
        so the slow path decodes their items with their own setting."""
        factory = self._channelfactory
        engine = self._engine
        # the dispatch lock keeps the receiver from decoding a routed item
        # between the route change and the flag change; the write lock
        # keeps new() from making a channel meanwhile
        with factory._dispatchlock, factory._writelock:
            self._strconfig = strconfig
            for channel in factory.channels():
                if channel._strconfig != strconfig:
                    engine.clear_route(channel.id)
            engine.py2str_as_py3str = strconfig[0]
            engine.py3str_as_py2str = strconfig[1]

    def _status_dict(self):
        return {
            "numchannels": len(self._channelfactory._channels),
            "numexecuting": 0,
            "execmodel": self.execmodel.backend,
        }

    def _local_schedulexec(self, channelid, payload):
        # only workers execute code; a master answers with an error
        self._send(Message.CHANNEL_CLOSE_ERROR, channelid,
                   "execution disallowed on this side")

    def _lost_error(self, reason):
        """What open channels raise once the connection is gone: the
        DataFormatError for a corrupt stream, else an EOFError."""
        if reason is None or isinstance(reason, DataFormatError):
            return reason
        return EOFError("gateway %s: connection lost (%s: %s)"
                        % (self.id, type(reason).__name__, reason))

    def _terminate_execution(self):
        pass

    # -- public API shared by both ends
    def newchannel(self):
        """Return a new channel, to be sent to the other side."""
        return self._channelfactory.new()

    def join(self, timeout=None):
        """Wait for the receiver to end (not in the receiver itself)."""
        t = self._receivethread
        if t is None:
            return
        if self.execmodel._green:
            if t is self.execmodel._getcurrent():
                return
        elif t == threading.get_ident():
            return
        self._receive_done.wait(timeout)


def _task_code(channel, source, filename):
    """The code object of a remote_exec and the namespace to run it in."""
    if filename:
        import linecache

        linecache.cache[filename] = (len(source), None,
                                     source.splitlines(True), filename)
    co = compile(source + "\n", filename or "<remote exec>", "exec")
    return co, {"__name__": "__channelexec__", "channel": channel}


class WorkerGateway(BaseGateway):
    """The remote end: executes CHANNEL_EXEC requests."""

    def __init__(self, rfd, wfd, id, execmodel):
        super().__init__(rfd, wfd, id, execmodel, _startcount=2)
        import collections

        self._tasks = collections.deque()
        self._tasks_cond = self.execmodel.Condition()
        self._executing = 0
        self._running = 0
        self._stopping = False
        # the main thread has a task (queued or running);
        # cleared before that task's channel closes, so a remote_exec sent
        # after the close was seen finds the main thread free
        self._main_busy = False

    def _status_dict(self):
        d = super()._status_dict()
        d["numexecuting"] = self._executing
        return d

    def _local_schedulexec(self, channelid, payload):
        channel = self._channelfactory.new(channelid)
        try:
            source, filename, call_name, kwargs = _loads_payload(
                payload, self._channelfactory.new)
        except Exception:
            channel._close(self._geterrortext(sys.exc_info()))
            return
        task = (channel, source, filename, call_name, kwargs)
        if not self.execmodel._green:
            # The main thread runs the task if it is idle: remote code may
            # need it (signal.signal() works only there), and it saves a
            # thread start.  Tasks that come while it is busy get a thread
            # -- or, with main_thread_only, an error (as with stock
            # execnet: waiting could deadlock, the busy task may be waiting
            # for this one).
            with self._tasks_cond:
                if not self._main_busy:
                    self._main_busy = True
                    # counted from now on: a shutdown that comes before
                    # the main thread picks it up still waits for it
                    self._running += 1
                    self._tasks.append(task)
                    self._tasks_cond.notify()
                    return
            if self.execmodel.backend == "main_thread_only":
                channel._close(MAIN_THREAD_BUSY_TEXT)
                return
        with self._tasks_cond:
            self._running += 1
        try:
            self.execmodel.start(self._run_task, (task,))
        except BaseException:
            with self._tasks_cond:
                self._running -= 1
                self._tasks_cond.notify_all()
            raise

    def _run_task(self, task, on_main=False):
        channel, source, filename, call_name, kwargs = task
        # _running (what shutdown waits for, the close included) was
        # counted when the task was scheduled
        with self._tasks_cond:
            self._executing += 1  # what remote_status reports
        channel._executing = True
        error = None
        try:
            # run here, not in a helper: remote tracebacks then show one
            # frame of ours above the remote code, as stock's do
            co, ns = _task_code(channel, source, filename)
            exec(co, ns)
            if call_name:
                func = ns.get(call_name)
                if func is None:
                    raise NameError("remote function %r not found" % (call_name,))
                func(channel, **kwargs)
        except KeyboardInterrupt:
            error = INTERRUPT_TEXT
        except BaseException:
            excinfo = sys.exc_info()
            error = self._geterrortext(excinfo)
        finally:
            channel._executing = False
            with self._tasks_cond:
                self._executing -= 1
                if on_main:
                    self._main_busy = False
        try:
            channel._close(error)  # send errors (connection gone) end there
        finally:
            with self._tasks_cond:
                self._running -= 1
                self._tasks_cond.notify_all()

    def _terminate_execution(self):
        """The receiver ended: stop taking tasks, give running ones the
        grace period, then end the process even if one still runs (the
        main thread may be the one that is stuck)."""
        with self._tasks_cond:
            self._stopping = True
            self._tasks_cond.notify_all()
            if self.execmodel._green:
                return  # the serve loop, on the hub, finishes the job
            self._tasks_cond.wait_for(lambda: not self._running, _worker_grace())
        self._exit_process()

    def _exit_process(self):
        try:
            self._engine.close_write()
        except Exception:
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(0)

    def serve(self):
        """Run until the master terminates us or goes away, then exit."""
        _batch_bursts(self)
        self._initreceive()
        try:
            if self.execmodel._green:
                self._receive_done.wait()
            else:
                while True:
                    with self._tasks_cond:
                        while not self._tasks and not self._stopping:
                            self._tasks_cond.wait()
                        if not self._tasks:
                            break
                        task = self._tasks.popleft()
                    self._run_task(task, on_main=True)
        except KeyboardInterrupt:
            pass  # Ctrl-C at the terminal reached us too: shut down quietly
        # give running tasks a moment to notice their closed channels
        with self._tasks_cond:
            self._tasks_cond.wait_for(lambda: not self._running, _worker_grace())
        self._exit_process()


# how long a terminated or orphaned worker lets running tasks go on: about
# what stock execnet's workers give them
_DEFAULT_WORKER_GRACE = 5.0


def _worker_grace():
    try:
        return float(os.environ.get("EXECNET_WORKER_GRACE", _DEFAULT_WORKER_GRACE))
    except ValueError:
        return _DEFAULT_WORKER_GRACE


_EXIT_FLUSH_TIMEOUT = 2.0
_exit_flush = (None, None)  # (pid, WeakSet of the gateways os._exit() flushes)


def _batch_bursts(gateway):
    """Let the native engine of ``gateway`` write bursts of small sends in
    batches (its flusher thread; see doc/internals.rst), and make
    os._exit() in this process write what such sends left pending first,
    so that data sent right before os._exit() still arrives."""
    global _exit_flush
    engine = gateway._engine
    if _native is None or not isinstance(engine, _native.Engine):
        return
    pid, gateways = _exit_flush
    if pid != os.getpid():
        # the first gateway of this process (a forked child starts afresh:
        # the wrapper it inherited flushes only in its parent)
        import weakref

        gateways = weakref.WeakSet()
        _wrap_os_exit(gateways)
        _exit_flush = (os.getpid(), gateways)
    gateways.add(gateway)
    engine.batch_bursts = True


def _wrap_os_exit(gateways):
    real_exit = os._exit
    pid = os.getpid()

    def _exit(status):
        if os.getpid() == pid:  # not in a forked child: its copies are stale
            import time

            deadline = time.monotonic() + _EXIT_FLUSH_TIMEOUT
            for gw in list(gateways):
                try:
                    gw._engine.flush(max(0.0, deadline - time.monotonic()))
                except BaseException:
                    pass
        real_exit(status)

    _exit.__doc__ = real_exit.__doc__
    _exit.__wrapped__ = real_exit
    os._exit = _exit


def serve(rfd, wfd, id="<worker>", execmodel="thread"):
    """Entry point on the remote side, after the bootstrap handshake."""
    if execmodel == "eventlet":
        import warnings

        # eventlet warns at import that it is deprecated: from every worker
        # that would reach the master's stderr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_execmodel(execmodel)
    gw = WorkerGateway(rfd, wfd, id, execmodel)
    gw.serve()


# ---------------------------------------------------------------------------
# the native core replaces the hot path when it is available

backend = "python"
# the pure implementations stay reachable for tests and comparison
_py_dumps_payload = _dumps_payload
_py_loads_payload = _loads_payload
_PyEngine = _Engine
_PyChannelQueue = ChannelQueue


def _use_native():
    # Channel() and BaseGateway() look ChannelQueue and _Engine up at call
    # time, so rebinding the module globals switches every new channel and
    # gateway over to the native core.
    global _dumps_payload, _loads_payload, ChannelQueue, _Engine, backend
    _execnet = _native
    if _execnet is None:
        return
    _execnet.configure(DumpError, LoadError, DataFormatError, Channel,
                       TimeoutError)
    _dumps_payload = _execnet.dumps
    _loads_payload = _execnet.loads
    ChannelQueue = _execnet.ChannelQueue
    _Engine = _execnet.Engine
    backend = "c"


_use_native()
