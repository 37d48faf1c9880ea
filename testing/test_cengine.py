"""C-only tests of the native hot path: ``_execnet.ChannelQueue`` and
``_execnet.Engine`` (framing, coalesced sends, the receiver loop).

The queue tests run against both queue classes (the pure
``gateway_base._PyChannelQueue`` and the C one): their semantics must be
identical.  Engine tests talk over ``os.pipe()`` pairs, compare bytes with
the pure frame format, feed the receiver hostile input, and cross the C
engine with the pure one -- in-process and over real gateways in both
directions.

The module errors (rather than skips) when the core cannot be imported,
unless ``EXECNET_NO_EXTENSIONS`` asks for the pure engine.
"""
import gc
import os
import random
import signal
import struct
import sys
import threading
import time

import pytest

from execnet import gateway_base

if os.environ.get("EXECNET_NO_EXTENSIONS"):
    pytest.skip("EXECNET_NO_EXTENSIONS is set: pure engine only",
                allow_module_level=True)

from execnet import _execnet  # noqa: E402 - a broken build must error

from conftest import run_python  # noqa: E402

pytestmark = pytest.mark.c_extension

# Set by the TSan job (testing/check_memory.py), where everything runs
# several times slower: whether sends come close enough together for the
# flusher, or a consumer drops a payload soon enough for it to be recycled,
# is then luck.  engaged() skips instead of failing there.
LAX_TIMING = bool(os.environ.get("EXECNET_LAX_TIMING"))


def engaged(ok, what, engine=None):
    """Check that an optimisation (the flusher, payload recycling) was
    used; under LAX_TIMING skip when it was not, after closing `engine` for
    writing (which waits for its flusher) so no flusher outlives the test."""
    if ok:
        return
    if LAX_TIMING:
        if engine is not None:
            engine.close_write()
        pytest.skip("%s did not engage (EXECNET_LAX_TIMING)" % what)
    pytest.fail("%s did not engage" % what)

DATA = gateway_base.Message.CHANNEL_DATA
CLOSE = gateway_base.Message.CHANNEL_CLOSE
HEADER = struct.Struct("!bii")
LoadError = gateway_base.LoadError
TimeoutError = gateway_base.TimeoutError


def test_native_engine_is_in_use():
    assert gateway_base.backend == "c"
    assert gateway_base.ChannelQueue is _execnet.ChannelQueue
    assert gateway_base._Engine is _execnet.Engine


# ---------------------------------------------------------------------------
# ChannelQueue: the same behaviour as the pure class


@pytest.fixture(params=["python", "c"])
def Queue(request):
    if request.param == "python":
        return gateway_base._PyChannelQueue
    return _execnet.ChannelQueue


@pytest.fixture
def sigint_default():
    """SIGINT raises KeyboardInterrupt in the main thread, as by default."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def later(delay, func, *args):
    t = threading.Timer(delay, func, args)
    t.daemon = True
    t.start()
    return t


def sigint_main_later(delay):
    return later(delay, signal.pthread_kill, threading.main_thread().ident,
                 signal.SIGINT)


def test_queue_fifo_and_len(Queue):
    q = Queue()
    assert len(q) == 0
    for i in range(100):
        assert q.put(i) is True
    assert len(q) == 100
    assert [q.get() for _ in range(100)] == list(range(100))
    assert len(q) == 0


def test_queue_close_semantics(Queue):
    q = Queue()
    assert not q.is_closed()
    q.put("a")
    q.put("b")
    assert q.close() is True
    assert q.close() is False
    assert q.is_closed()
    assert q.put("c") is False  # dropped
    assert len(q) == 2
    assert q.get() == "a"
    assert q.get(timeout=0) == "b"
    with pytest.raises(EOFError) as excinfo:
        q.get()
    assert excinfo.value.args == ()
    with pytest.raises(EOFError):
        q.get(timeout=0)


def test_queue_drain(Queue):
    q = Queue()
    assert q.drain() == []
    items = [1, "x", None, (2, 3)]
    for x in items:
        q.put(x)
    assert q.drain() == items
    assert len(q) == 0
    q.put(5)
    q.close()
    assert q.drain() == [5]
    with pytest.raises(EOFError):
        q.get()


def test_queue_timeout_message(Queue):
    q = Queue()
    with pytest.raises(TimeoutError) as excinfo:
        q.get(0.01)
    assert str(excinfo.value) == "no item after 0.01 seconds"
    with pytest.raises(TimeoutError) as excinfo:
        q.get(timeout=0)
    assert str(excinfo.value) == "no item after 0 seconds"
    assert isinstance(excinfo.value, OSError)
    # a negative timeout is refused, as by queue.Queue.get()
    with pytest.raises(ValueError, match="'timeout' must be a non-negative number"):
        q.get(-1)


def test_queue_get_timeout_accuracy(Queue):
    q = Queue()
    for timeout in (0.05, 0.3):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            q.get(timeout)
        elapsed = time.monotonic() - t0
        assert timeout - 0.005 <= elapsed < timeout + 0.25


def test_queue_wait_closed(Queue):
    q = Queue()
    t0 = time.monotonic()
    assert q.wait_closed(0.05) is False
    assert time.monotonic() - t0 >= 0.045
    assert q.wait_closed(timeout=0) is False
    later(0.05, q.close)
    assert q.wait_closed(10) is True
    assert q.wait_closed() is True
    assert q.wait_closed(0) is True


def test_queue_get_wakes_on_put_and_close(Queue):
    q = Queue()
    later(0.05, q.put, 42)
    assert q.get(10) == 42
    later(0.05, q.close)
    with pytest.raises(EOFError):
        q.get(10)


def test_queue_close_wakes_every_getter_and_waiter(Queue):
    q = Queue()
    results = []
    lock = threading.Lock()

    def getter():
        try:
            q.get(20)
        except EOFError:
            with lock:
                results.append("eof")

    def waiter():
        ok = q.wait_closed(20)
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=getter) for _ in range(6)]
    threads += [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    q.close()
    for t in threads:
        t.join(10)
    assert sorted(map(str, results)) == ["True"] * 3 + ["eof"] * 6


def test_queue_many_producers_and_consumers(Queue):
    q = Queue()
    nprod, ncons, per = 4, 4, 5000
    got = [[] for _ in range(ncons)]

    def producer(p):
        for i in range(per):
            q.put((p, i))

    def consumer(c):
        while True:
            try:
                got[c].append(q.get(20))
            except EOFError:
                return

    cons = [threading.Thread(target=consumer, args=(c,)) for c in range(ncons)]
    prods = [threading.Thread(target=producer, args=(p,)) for p in range(nprod)]
    for t in cons + prods:
        t.start()
    for t in prods:
        t.join(30)
    q.close()
    for t in cons:
        t.join(30)
    assert not any(t.is_alive() for t in cons)
    allitems = [x for g in got for x in g]
    assert sorted(allitems) == sorted((p, i) for p in range(nprod) for i in range(per))
    for g in got:  # each consumer sees each producer's items in order
        for p in range(nprod):
            seq = [i for (pp, i) in g if pp == p]
            assert seq == sorted(seq)


def test_queue_get_interrupted_by_sigint(Queue, sigint_default):
    q = Queue()
    sigint_main_later(0.1)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        q.get(30)
    assert time.monotonic() - t0 < 5
    # the queue still works afterwards
    q.put(1)
    assert q.get(1) == 1


def test_queue_get_without_timeout_interrupted_by_sigint(Queue, sigint_default):
    q = Queue()
    sigint_main_later(0.1)
    with pytest.raises(KeyboardInterrupt):
        q.get()


def test_queue_wait_closed_interrupted_by_sigint(Queue, sigint_default):
    q = Queue()
    sigint_main_later(0.1)
    with pytest.raises(KeyboardInterrupt):
        q.wait_closed(30)


def test_queue_get_survives_a_quiet_signal_handler(Queue):
    calls = []
    old = signal.signal(signal.SIGINT, lambda *args: calls.append(args[0]))
    try:
        q = Queue()
        sigint_main_later(0.05)
        later(0.3, q.put, "after")
        assert q.get(10) == "after"
        assert calls == [signal.SIGINT]
        # and a timeout still ends the wait when the handler keeps quiet
        sigint_main_later(0.05)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            q.get(0.3)
        assert 0.29 <= time.monotonic() - t0 < 2
    finally:
        signal.signal(signal.SIGINT, old)


def test_c_queue_args_and_gc():
    Q = _execnet.ChannelQueue
    with pytest.raises(TypeError):
        Q(1)
    q = Q()
    with pytest.raises(TypeError):
        q.get(1, 2)
    with pytest.raises(TypeError):
        q.get(bogus=1)
    with pytest.raises(ValueError):
        q.get(float("nan"))
    assert q.wait_closed(timeout=0.001) is False
    # a queue holding itself is a cycle the GC breaks
    q.put(q)
    assert q in gc.get_referents(q)
    del q
    gc.collect()
    # a big burst gives its memory back when drained
    q = Q()
    for i in range(100000):
        q.put(i)
    assert len(q.drain()) == 100000
    q.put(1)
    assert q.get() == 1


# ---------------------------------------------------------------------------
# Engine: helpers


def pure_frame(msgcode, channelid, obj=None):
    if obj is None and msgcode != DATA:
        payload = b""
    else:
        payload = gateway_base._py_dumps_payload(obj)
    return HEADER.pack(msgcode, channelid, len(payload)) + payload


def read_all(fd):
    chunks = []
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def split_frames(data):
    frames = []
    pos = 0
    while pos < len(data):
        msgcode, chid, length = HEADER.unpack_from(data, pos)
        pos += 9
        frames.append((msgcode, chid, data[pos:pos + length]))
        assert len(frames[-1][2]) == length, "truncated frame"
        pos += length
    return frames


class Reader(threading.Thread):
    """Collect everything written to a pipe until EOF."""

    def __init__(self, fd):
        super().__init__(daemon=True)
        self.fd = fd
        self.data = None
        self.start()
        READERS.append(self)

    def run(self):
        self.data = read_all(self.fd)

    def result(self, timeout=30):
        self.join(timeout)
        assert not self.is_alive()
        return self.data


# Reader and Receiver threads, for fds() to join at teardown.
READERS = []


@pytest.fixture
def fds():
    """Register fds to close at teardown: the write ends first; then, once
    the reader threads started meanwhile have seen EOF and ended, the read
    ends.  A test that fails midway leaves its reader blocked in read():
    closing the fd under it would be a real race (TSan reports it) and, were
    it to read again, it would read the pipe the next test gets under the
    same number."""
    opened = []
    first_reader = len(READERS)

    def pipe():
        r, w = os.pipe()
        opened.append((r, w))
        return r, w

    def close(fd):
        try:
            os.close(fd)
        except OSError:
            pass

    yield pipe
    for r, w in opened:
        close(w)
    for reader in READERS[first_reader:]:
        reader.join(10)
    del READERS[first_reader:]
    for r, w in opened:
        close(r)


class Receiver:
    """run_receiver() in a thread, with recording dispatch/callback_error."""

    def __init__(self, engine, stop_on=(), dispatch=None):
        self.engine = engine
        self.lock = threading.RLock()
        self.dispatched = []
        self.callback_errors = []
        self.reason = "running"
        self.raised = None
        self.channels = []
        self._stop_on = stop_on
        self._dispatch = dispatch
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        READERS.append(self.thread)

    def dispatch(self, msgcode, channelid, payload):
        assert self.lock._is_owned()
        assert type(payload) is bytes
        if self._dispatch is not None:
            return self._dispatch(msgcode, channelid, payload)
        self.dispatched.append((msgcode, channelid, payload))
        return msgcode in self._stop_on

    def factory(self, chid):
        self.channels.append(chid)
        return ("channel", chid)

    def callback_error(self, channelid, exc):
        self.callback_errors.append((channelid, exc))

    def _run(self):
        try:
            self.reason = self.engine.run_receiver(
                self.dispatch, self.factory, self.callback_error, self.lock)
        except BaseException as exc:  # noqa: B036 - recorded for the test
            self.raised = exc

    def join(self, timeout=30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "receiver did not stop"
        return self.reason


def c_pair(fds):
    """Two C engines connected both ways: (a, b)."""
    a2b_r, a2b_w = fds()
    b2a_r, b2a_w = fds()
    return _execnet.Engine(b2a_r, a2b_w), _execnet.Engine(a2b_r, b2a_w)


# ---------------------------------------------------------------------------
# Engine: sending


SAMPLES = [
    (DATA, 1, None),
    (DATA, 1, 0),
    (DATA, 3, -5),
    (DATA, 5, 2 ** 70),
    (DATA, 7, "hé"),
    (DATA, 9, b"raw"),
    (DATA, 11, [1, (2, "x"), {"k": {3}}, frozenset([4])]),
    (DATA, -2147483648, 1.5),
    (DATA, 2147483647, complex(1, 2)),
    (DATA, 2, b"z" * 70000),          # big bytes: the writev path
    (DATA, 4, b"y" * 65535),
    (DATA, 6, [b"w" * 100000]),
    (CLOSE, 3, None),
    (gateway_base.Message.GATEWAY_TERMINATE, 0, None),
    (gateway_base.Message.CHANNEL_CLOSE_ERROR, 5, "traceback text"),
    (gateway_base.Message.CHANNEL_EXEC, 1, ("src", None, None, {})),
    (-1, 0, None),
    (127, 0, True),
]


def test_send_writes_the_pure_frame_format(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    reader = Reader(r)
    for msgcode, chid, obj in SAMPLES:
        engine.send(msgcode, chid, obj)
    engine.send(DATA, 8)  # obj defaults to None, still serialized for DATA
    engine.send(CLOSE, 8)
    engine.close_write()
    expected = b"".join(pure_frame(*s) for s in SAMPLES)
    expected += pure_frame(DATA, 8, None) + pure_frame(CLOSE, 8)
    assert reader.result() == expected


def test_send_argument_errors(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    with pytest.raises(ValueError):
        engine.send(128, 1, 1)
    with pytest.raises(OverflowError):
        engine.send(DATA, 2 ** 31, 1)
    with pytest.raises(TypeError):
        engine.send(DATA)
    with pytest.raises(TypeError):
        engine.send("4", 1, 1)
    assert engine.rfd == r and engine.wfd == w
    engine.py2str_as_py3str = 1
    assert engine.py2str_as_py3str is True
    engine.py2str_as_py3str = False
    assert engine.py2str_as_py3str is False
    assert engine.py3str_as_py2str is False
    engine.py3str_as_py2str = 1
    assert engine.py3str_as_py2str is True
    engine.py3str_as_py2str = False


def test_dump_error_leaves_the_stream_clean(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    reader = Reader(r)
    engine.send(DATA, 1, "before")
    with pytest.raises(gateway_base.DumpError):
        engine.send(DATA, 1, [1, 2, object()])
    with pytest.raises(gateway_base.DumpError):
        engine.send(DATA, 1, "\udc80")
    engine.send(DATA, 1, "after")
    engine.close_write()
    assert reader.result() == pure_frame(DATA, 1, "before") + pure_frame(DATA, 1, "after")


def test_send_after_close_write_raises(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    engine.close_write()
    engine.close_write()  # idempotent
    with pytest.raises(OSError) as excinfo:
        engine.send(DATA, 1, 1)
    assert str(excinfo.value) == "cannot send (already closed?)"
    with pytest.raises(OSError):
        engine.send(DATA, 1, b"x" * 100000)
    with pytest.raises(OSError):
        os.fstat(w)  # the fd is closed
    assert os.read(r, 10) == b""


def test_send_to_a_dead_peer_raises_epipe(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    os.close(r)
    for obj in (1, b"x" * 200000):
        with pytest.raises(OSError) as excinfo:
            engine.send(DATA, 1, obj)
        assert excinfo.value.errno == __import__("errno").EPIPE
    engine.close_write()  # does not raise


def _frame_checker(fd, expected_payload, count, throttle=0.0):
    """Read frames from fd in a thread, checking payload i against
    expected_payload(i); returns (thread, errors, seen)."""
    errors = []
    seen = []

    def run():
        buf = bytearray()
        i = 0
        reads = 0
        while i < count:
            b = os.read(fd, 1 << 16)
            if not b:
                errors.append("EOF after %d frames" % i)
                return
            reads += 1
            if throttle and reads % 8 == 0:
                time.sleep(throttle)  # let the pipe stay full for a while
            buf += b
            while len(buf) >= HEADER.size:
                msgcode, chid, n = HEADER.unpack_from(buf)
                if len(buf) < HEADER.size + n:
                    break
                payload = bytes(buf[HEADER.size:HEADER.size + n])
                del buf[:HEADER.size + n]
                if payload != expected_payload(i):
                    errors.append("frame %d differs" % i)
                seen.append(i)
                i += 1

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors, seen


def _vmsplice_payload(i):
    return bytes([i % 256]) * ((1 << 20) + i * 4097)


@pytest.mark.parametrize("throttle", [0.0, 0.002])
def test_big_bytes_survive_being_freed_after_send(fds, throttle):
    # vmsplice makes the pipe reference the sender's pages: the engine
    # must keep each object alive until the reader has consumed them,
    # even though the caller drops it at once and its memory is reused.
    r, w = fds()
    engine = _execnet.Engine(r, w)
    count = 40
    dumps = gateway_base._py_dumps_payload
    t, errors, seen = _frame_checker(
        r, lambda i: dumps(_vmsplice_payload(i)), count, throttle)
    for i in range(count):
        engine.send(DATA, 1, _vmsplice_payload(i))  # freed right after
        # new objects of the same sizes, other contents: likely the memory
        # of the objects just sent
        junk = [bytes([(i + 128) % 256]) * ((1 << 20) + j * 4097)
                for j in range(i, i + 3)]
        del junk
    t.join(60)
    assert not t.is_alive()
    assert errors == []
    assert seen == list(range(count))


def test_mixed_small_and_big_frames_keep_their_order(fds):
    a, b = c_pair(fds)
    q = _execnet.ChannelQueue()
    b.set_route(1, q)
    rec = Receiver(b)
    items = []
    for i in range(300):
        if i % 3 == 0:
            items.append(bytes([i % 256]) * (65536 + i * 511))
        elif i % 3 == 1:
            items.append(i)
        else:
            items.append(b"s" * (i % 50))
    senders = []
    for k in range(3):
        # three threads, each on its own channel, big and small mixed
        qk = _execnet.ChannelQueue()
        b.set_route(10 + k, qk)
        senders.append((threading.Thread(
            target=lambda k=k: [a.send(DATA, 10 + k, x) for x in items]), qk))
    for th, _ in senders:
        th.start()
    for x in items:
        a.send(DATA, 1, x)
    for th, qk in senders:
        th.join(60)
        assert [qk.get(30) for _ in items] == items
    assert [q.get(30) for _ in items] == items
    a.close_write()
    assert str(rec.join()) == "connection closed"


def test_big_send_to_a_peer_that_closed_raises_epipe(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    # the reader takes part of a big payload, then goes away while the
    # sender is blocked in the middle of it
    blob = b"v" * (8 << 20)

    def reader():
        os.read(r, 1 << 16)
        time.sleep(0.1)
        os.close(r)

    t = threading.Thread(target=reader)
    t.start()
    with pytest.raises(OSError) as excinfo:
        engine.send(DATA, 1, blob)
    t.join()
    assert excinfo.value.errno == __import__("errno").EPIPE
    with pytest.raises(OSError) as excinfo:
        engine.send(DATA, 1, blob)
    assert excinfo.value.errno == __import__("errno").EPIPE
    engine.close_write()  # does not raise


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="vmsplice is Linux only")
def test_vmspliced_objects_are_released(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    reader = Reader(r)
    blobs = [bytes([i]) * (100 << 10) for i in range(50)]
    base = [sys.getrefcount(blobs[i]) for i in range(len(blobs))]
    for i in range(len(blobs)):
        engine.send(DATA, 1, blobs[i])

    def held():
        return [i for i in range(len(blobs))
                if sys.getrefcount(blobs[i]) != base[i]]

    # the pipe (1 MiB) may still reference the last ~10 objects' pages:
    # those are held, the older ones released
    now = held()
    assert now and now == list(range(now[0], 50))
    assert 5 <= len(now) <= 12
    # a pipe's worth of later bytes, small frames this time, frees them
    for i in range(300):
        engine.send(DATA, 2, b"x" * 4000)
    assert held() == []
    # a held object stays alive past close_write, until the engine goes
    # (the reader has drained the pipe by then: see the next test otherwise)
    engine.send(DATA, 1, blobs[0])
    deadline = time.monotonic() + 30
    while unread(w) and time.monotonic() < deadline:
        time.sleep(0.001)  # the reader thread drains the pipe
    engine.close_write()
    assert held() == [0]
    del engine
    gc.collect()
    assert held() == []
    assert len(reader.result()) > 50 * (100 << 10)


def unread(fd):
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="vmsplice is Linux only")
def test_vmspliced_objects_unread_at_close_are_never_freed(fds):
    """If the pipe still held bytes when the engine closed it, the reader
    may yet copy pages of held objects: their memory must never be reused,
    so they outlive the engine."""
    r, w = fds()
    engine = _execnet.Engine(r, w)
    blob = bytes(range(256)) * 1024  # 256 KiB: goes out with vmsplice
    base = sys.getrefcount(blob)
    engine.send(DATA, 1, blob)
    engine.close_write()
    assert unread(r) > len(blob)
    del engine
    gc.collect()
    assert sys.getrefcount(blob) == base + 1  # retired, not freed
    frame = read_all(r)
    assert frame == pure_frame(DATA, 1, blob)


def test_big_bytes_over_a_socket_fall_back_to_writev():
    import socket

    a, b = socket.socketpair()
    with a, b:
        engine = _execnet.Engine(b.fileno(), a.fileno())
        out = []
        t = threading.Thread(target=lambda: out.append(read_all(b.fileno())))
        t.start()
        blob = os.urandom(3 << 20)
        engine.send(DATA, 1, blob)
        engine.send(DATA, 1, blob[::-1])
        a.shutdown(socket.SHUT_WR)
        t.join(30)
        assert out[0] == pure_frame(DATA, 1, blob) + pure_frame(DATA, 1, blob[::-1])
        del engine


def test_close_write_flushes_pending_frames(fds):
    """A writer blocked on a full pipe takes other threads' frames; they
    return at once, and close_write() writes everything before closing."""
    r, w = fds()
    engine = _execnet.Engine(r, w)
    pipesize = 1 << 20
    import fcntl
    pipesize = max(pipesize, fcntl.fcntl(w, 1032))  # F_GETPIPE_SZ
    big = b"B" * (pipesize * 2)
    writer = threading.Thread(target=engine.send, args=(DATA, 1, big))
    writer.start()
    time.sleep(0.2)
    assert writer.is_alive()  # blocked: nobody reads yet
    t0 = time.monotonic()
    for i in range(100):
        engine.send(DATA, 3, i)  # handed to the active writer
    assert time.monotonic() - t0 < 1.0
    closer = threading.Thread(target=engine.close_write)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive()  # waits for the flush
    data = read_all(r)
    writer.join(10)
    closer.join(10)
    frames = split_frames(data)
    assert frames[0] == (DATA, 1, gateway_base._py_dumps_payload(big))
    assert [gateway_base._py_loads_payload(p) for (_, _, p) in frames[1:]] == list(range(100))


def test_concurrent_senders_do_not_interleave(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    reader = Reader(r)
    nthreads, per = 8, 1500
    errors = []

    def sender(t):
        rnd = random.Random(t)
        try:
            for i in range(per):
                kind = rnd.random()
                if kind < 0.01:
                    payload = bytes([t]) * rnd.randrange(65536, 200000)
                elif kind < 0.3:
                    payload = "s" * rnd.randrange(0, 3000)
                else:
                    payload = i
                engine.send(DATA, t, (i, payload))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.close_write()
    assert not errors
    seen = {t: [] for t in range(nthreads)}
    for msgcode, chid, payload in split_frames(reader.result()):
        assert msgcode == DATA
        i, payload = gateway_base._py_loads_payload(payload)
        seen[chid].append(i)
    for t in range(nthreads):
        assert seen[t] == list(range(per))


# ---------------------------------------------------------------------------
# Engine: the receiver loop


def test_receiver_delivers_to_queue_callback_and_dispatch(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    q = _execnet.ChannelQueue()
    got = []
    engine.set_route(1, q)
    engine.set_route(3, got.append)
    engine.set_route(5, q)
    engine.clear_route(5)
    engine.clear_route(12345)  # unknown ids are fine
    rec = Receiver(engine, stop_on=(gateway_base.Message.GATEWAY_TERMINATE,))
    stream = b"".join([
        pure_frame(DATA, 1, "q1"),
        pure_frame(DATA, 3, "cb1"),
        pure_frame(DATA, 5, "unrouted"),
        pure_frame(CLOSE, 1),
        pure_frame(DATA, 1, [1, 2]),
        pure_frame(DATA, 3, ("cb2",)),
        pure_frame(DATA, 1, 7),
    ])
    os.write(w, stream)
    assert q.get(10) == "q1"
    assert q.get(10) == [1, 2]
    assert q.get(10) == 7
    os.write(w, pure_frame(gateway_base.Message.GATEWAY_TERMINATE, 0)
             + pure_frame(DATA, 1, "after terminate"))
    assert rec.join() is None
    assert got == ["cb1", ("cb2",)]
    assert rec.dispatched == [
        (DATA, 5, gateway_base._py_dumps_payload("unrouted")),
        (CLOSE, 1, b""),
        (gateway_base.Message.GATEWAY_TERMINATE, 0, b""),
    ]
    assert len(q) == 0


def test_receiver_callback_errors(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    q = _execnet.ChannelQueue()

    def bad(item):
        raise ValueError(item)

    def fatal(item):
        raise KeyboardInterrupt

    engine.set_route(3, bad)
    engine.set_route(5, fatal)
    engine.set_route(1, q)
    rec = Receiver(engine)
    os.write(w, pure_frame(DATA, 3, "boom") + pure_frame(DATA, 1, "ok"))
    assert q.get(10) == "ok"
    assert len(rec.callback_errors) == 1
    chid, exc = rec.callback_errors[0]
    assert chid == 3 and type(exc) is ValueError and exc.args == ("boom",)
    os.write(w, pure_frame(DATA, 5, "x"))
    rec.join()
    assert isinstance(rec.raised, KeyboardInterrupt)


def test_receiver_channel_factory_and_py2str(fds):
    # a channel opcode calls channel_factory, even when the payload then
    # turns out to be bad (no STOP opcode): LoadError ends the loop
    r, w = fds()
    engine = _execnet.Engine(r, w)
    engine.set_route(1, _execnet.ChannelQueue())
    rec = Receiver(engine)
    os.write(w, HEADER.pack(DATA, 1, 5) + b"B\x00\x00\x00\x08")
    assert isinstance(rec.join(), LoadError)
    assert rec.channels == [8]

    m_payload = b"M\x00\x00\x00\x02\xe9tQ"
    r, w = fds()
    engine = _execnet.Engine(r, w)
    q = _execnet.ChannelQueue()
    engine.set_route(1, q)
    rec = Receiver(engine)
    chan = b"B\x00\x00\x00\x08"
    payload = chan + b"F\x00\x00\x00\x01" + b"@\x00\x00\x00\x02Q"
    os.write(w, HEADER.pack(DATA, 1, len(payload)) + payload)
    assert q.get(10) == (("channel", 8), 1)
    os.write(w, HEADER.pack(DATA, 1, len(m_payload)) + m_payload)
    assert q.get(10) == b"\xe9t"
    engine.py2str_as_py3str = True
    os.write(w, HEADER.pack(DATA, 1, len(m_payload)) + m_payload)
    assert q.get(10) == "\xe9t"
    # py3str_as_py2str: 'N' loads as its raw bytes (not checked as UTF-8)
    n_payload = b"K\x00\x00\x00\x02F\x00\x00\x00\x00N\x00\x00\x00\x02\xe9tP" \
        b"F\x00\x00\x00\x01M\x00\x00\x00\x01mPQ"
    engine.py3str_as_py2str = True
    os.write(w, HEADER.pack(DATA, 1, len(n_payload)) + n_payload)
    assert q.get(10) == [b"\xe9t", "m"]
    engine.py2str_as_py3str = False
    os.write(w, HEADER.pack(DATA, 1, len(n_payload)) + n_payload)
    assert q.get(10) == [b"\xe9t", b"m"]
    os.close(w)
    assert str(rec.join()) == "connection closed"


@pytest.mark.parametrize("stream, cls, message", [
    (b"", EOFError, "connection closed"),
    (HEADER.pack(DATA, 1, 4)[:5], EOFError,
     "connection closed inside a frame header"),
    (HEADER.pack(DATA, 1, 4) + b"F\x00", EOFError,
     "connection closed inside a frame"),
    (HEADER.pack(DATA, 1, -1), LoadError, "negative frame length -1"),
    (HEADER.pack(DATA, 1, 3) + b"XYZ", LoadError, None),        # garbage
    (HEADER.pack(DATA, 1, 0), LoadError, None),                 # empty
    (HEADER.pack(DATA, 1, 6) + b"LQLQLQ", LoadError, None),      # trailing
])
def test_receiver_end_reasons(fds, stream, cls, message):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    engine.set_route(1, _execnet.ChannelQueue())
    rec = Receiver(engine)
    os.write(w, pure_frame(CLOSE, 9) + stream)
    os.close(w)
    reason = rec.join()
    assert type(reason) is cls
    if message is not None:
        assert str(reason) == message
    assert rec.raised is None
    assert rec.dispatched == [(CLOSE, 9, b"")]


def test_receiver_dispatch_errors(fds):
    # a DataFormatError from dispatch is the reason the loop ends ...
    r, w = fds()

    def dispatch(msgcode, channelid, payload):
        raise LoadError("bad payload %r" % (payload,))

    rec = Receiver(_execnet.Engine(r, w), dispatch=dispatch)
    os.write(w, pure_frame(CLOSE, 1))
    reason = rec.join()
    assert type(reason) is LoadError and "bad payload" in str(reason)

    # ... any other exception propagates
    r, w = fds()

    def dispatch2(msgcode, channelid, payload):
        raise ZeroDivisionError

    rec = Receiver(_execnet.Engine(r, w), dispatch=dispatch2)
    os.write(w, pure_frame(CLOSE, 1))
    rec.join()
    assert isinstance(rec.raised, ZeroDivisionError)


def test_receiver_big_bytes_read_straight_into_the_object(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    q = _execnet.ChannelQueue()
    engine.set_route(1, q)
    rec = Receiver(engine)
    big = os.urandom(3 << 20)
    frame = pure_frame(DATA, 1, big)
    # in pieces, so the receiver sees a partial frame and switches over
    pieces = [frame[:20], frame[20:70000], frame[70000:-1], frame[-1:]]
    for piece in pieces:
        os.write(w, piece)
        time.sleep(0.02)
    assert q.get(10) == big
    os.write(w, frame[:100])
    time.sleep(0.05)
    os.write(w, frame[100:] + pure_frame(DATA, 1, "next"))
    assert q.get(10) == big
    assert q.get(10) == "next"
    assert rec.dispatched == []
    # unrouted, the same frame goes to dispatch as its payload bytes
    engine.clear_route(1)
    os.write(w, frame[:100])
    time.sleep(0.05)
    os.write(w, frame[100:])
    deadline = time.monotonic() + 10
    while not rec.dispatched and time.monotonic() < deadline:
        time.sleep(0.01)
    # a wrong byte instead of the final STOP opcode
    bad = bytearray(frame)
    bad[-1] = ord("L")
    engine.set_route(1, q)
    os.write(w, bytes(bad[:100]))
    time.sleep(0.05)
    os.write(w, bytes(bad[100:]))
    reason = rec.join()
    assert type(reason) is LoadError
    assert rec.dispatched == [(DATA, 1, gateway_base._py_dumps_payload(big))]


def test_receiver_recycles_only_big_payloads_nobody_holds(fds):
    # A big payload the consumer has dropped may take the next one of the
    # same size; one still referenced (directly, through a memoryview or a
    # container) must never change, and a recycled one must not keep the
    # hash of its old contents.
    r, w = fds()
    engine = _execnet.Engine(r, w)
    q = _execnet.ChannelQueue()
    engine.set_route(1, q)
    rec = Receiver(engine)
    size = 400_000     # more than the receive buffer: read in place
    sent, kept, views = [], [], []
    for i in range(40):
        blob = os.urandom(size)
        sent.append(blob)
        os.write(w, pure_frame(DATA, 1, blob))
        got = q.get(10)
        assert got == blob
        assert hash(got) == hash(blob)   # caches the hash in `got`
        if i % 5 == 0:
            kept.append((i, got))
        elif i % 5 == 1:
            views.append((i, memoryview(got)))
        del got
    engaged(engine.recycled > 0, "payload recycling")
    for i, obj in kept:
        assert obj == sent[i]
    for i, view in views:
        assert view == sent[i]
    # another size is never read into a kept object of the old size
    other = os.urandom(size + 1)
    os.write(w, pure_frame(DATA, 1, other))
    assert q.get(10) == other
    os.close(w)
    assert str(rec.join()) == "connection closed"


def test_receiver_lets_go_of_kept_payloads_when_idle(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    q = _execnet.ChannelQueue()
    engine.set_route(1, q)
    rec = Receiver(engine)
    os.write(w, pure_frame(DATA, 1, os.urandom(400_000)))
    got = q.get(10)
    base = sys.getrefcount(object())    # a temporary: just the argument
    deadline = time.monotonic() + 10
    while sys.getrefcount(got) > base + 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sys.getrefcount(got) == base + 1, "receiver still holds it"
    os.close(w)
    rec.join()


def test_receiver_stops_when_the_peer_closes(fds):
    a, b = c_pair(fds)
    rec = Receiver(b)
    a.send(DATA, 1, "unrouted")
    a.close_write()
    assert str(rec.join()) == "connection closed"
    assert len(rec.dispatched) == 1


def test_receiver_refuses_to_run_twice(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    rec = Receiver(engine)
    time.sleep(0.1)
    with pytest.raises(RuntimeError):
        engine.run_receiver(None, None, None, threading.RLock())
    os.close(w)
    rec.join()


def test_20mib_both_ways(fds):
    a, b = c_pair(fds)
    qa, qb = _execnet.ChannelQueue(), _execnet.ChannelQueue()
    a.set_route(1, qa)
    b.set_route(2, qb)
    ra, rb = Receiver(a), Receiver(b)
    blob_ab = os.urandom(20 << 20)
    blob_ba = blob_ab[::-1]
    t = threading.Thread(target=b.send, args=(DATA, 1, blob_ba))
    t.start()
    a.send(DATA, 2, blob_ab)
    t.join(30)
    assert qb.get(30) == blob_ab
    assert qa.get(30) == blob_ba
    a.close_write()
    b.close_write()
    assert str(ra.join()) == "connection closed"
    assert str(rb.join()) == "connection closed"


def test_many_small_messages_both_ways(fds):
    a, b = c_pair(fds)
    qa, qb = _execnet.ChannelQueue(), _execnet.ChannelQueue()
    a.set_route(1, qa)
    b.set_route(2, qb)
    ra, rb = Receiver(a), Receiver(b)
    n = 20000

    def pump(engine, chid):
        for i in range(n):
            engine.send(DATA, chid, i)

    t = threading.Thread(target=pump, args=(b, 1))
    t.start()
    pump(a, 2)
    assert [qb.get(30) for _ in range(n)] == list(range(n))
    assert [qa.get(30) for _ in range(n)] == list(range(n))
    t.join(30)
    a.close_write()
    b.close_write()
    ra.join()
    rb.join()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def burst(engine, n, chid=1):
    for i in range(n):
        engine.send(DATA, chid, i)


def bursty(r, w):
    engine = _execnet.Engine(r, w)
    assert engine.batch_bursts is False
    engine.batch_bursts = True
    return engine


def test_without_batch_bursts_every_send_is_written_before_it_returns(fds):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    one = len(pure_frame(DATA, 1, 1))
    for i in range(1, 2001):
        engine.send(DATA, 1, 1)
        assert unread(r) == i * one
    assert engine.flushed == 0


def test_flush_waits_for_the_flusher(fds):
    r, w = fds()
    engine = bursty(r, w)
    one = len(pure_frame(DATA, 1, 1))
    for round in range(20):
        burst(engine, 1000)
        assert engine.flush() is True
        assert unread(r) == 1000 * one
        os.read(r, 1000 * one)
    engaged(engine.flushed > 0, "the flusher", engine)
    assert engine.flush(0) is True
    with pytest.raises(ValueError):
        engine.flush(-1)
    engine.close_write()
    assert engine.flush() is True


def test_flush_times_out_while_the_peer_does_not_read(fds):
    r, w = fds()
    engine = bursty(r, w)
    blob = b"x" * 60000
    done = threading.Event()

    def fill():
        try:
            while True:       # until the pipe is full and the flusher blocks
                engine.send(DATA, 1, blob)
        except OSError:
            pass
        done.set()
    t = threading.Thread(target=fill, daemon=True)
    t.start()
    try:
        assert wait_for(lambda: unread(r) > 900_000)
        t0 = time.monotonic()
        # False in time, whoever holds the writer role: flush() with a
        # timeout never blocks in write() itself (it leaves the writing to
        # the flusher thread and waits for it)
        assert engine.flush(0.2) is False
        assert 0.15 < time.monotonic() - t0 < 5
    finally:
        os.close(r)           # the peer goes: the blocked writers get EPIPE
        done.wait(10)
    assert done.is_set()


def test_a_burst_goes_out_whole_and_in_order_through_the_flusher(fds):
    # Sends close together are left to the flusher; close_write() waits for
    # it, so every frame is out, in order, when it returns.
    r, w = fds()
    engine = bursty(r, w)
    reader = Reader(r)
    n = 20000
    burst(engine, n)
    engine.close_write()
    frames = split_frames(reader.result())
    assert frames == [(DATA, 1, gateway_base._py_dumps_payload(i))
                      for i in range(n)]
    engaged(engine.flushed > 0, "the flusher")


def test_big_send_after_a_burst_keeps_the_order(fds):
    r, w = fds()
    engine = bursty(r, w)
    reader = Reader(r)
    big = os.urandom(300_000)
    for round in range(5):
        burst(engine, 500)
        engine.send(DATA, 2, big)   # waits for the role: after the burst
    engine.close_write()
    frames = split_frames(reader.result())
    expect = ([(DATA, 1, gateway_base._py_dumps_payload(i)) for i in range(500)]
              + [(DATA, 2, gateway_base._py_dumps_payload(big))]) * 5
    assert frames == expect


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def flusher_tids():
    """The ids of this process's flusher threads (they name themselves)."""
    tids = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/comm" % tid) as f:
                if f.read().strip() == "execnet-flusher":
                    tids.add(tid)
        except OSError:
            pass            # the thread just ended
    return tids


def test_flusher_stops_with_its_engine_and_when_idle(fds):
    # Flushers of other engines (gateways of earlier tests) may come and go
    # meanwhile: follow this engine's own by thread id.
    before = flusher_tids()
    r, w = fds()
    engine = bursty(r, w)
    reader = Reader(r)
    burst(engine, 5000)
    engaged(wait_for(lambda: engine.flushed > 0), "the flusher", engine)
    assert wait_for(lambda: flusher_tids() - before)
    first = flusher_tids() - before
    # an idle flusher exits by itself (after about two seconds)
    assert wait_for(lambda: not first & flusher_tids()), "idle flusher stayed"
    burst(engine, 5000)          # a new burst starts a new one
    engaged(wait_for(lambda: flusher_tids() - before - first),
            "a second flusher", engine)
    second = flusher_tids() - before - first
    del engine                   # dealloc stops it (no close_write)
    gc.collect()
    assert wait_for(lambda: not second & flusher_tids()), "flusher outlived its engine"
    os.close(w)
    assert len(split_frames(reader.result())) == 10000


def test_a_failing_background_write_is_raised_by_a_later_send(fds):
    r, w = fds()
    engine = bursty(r, w)
    burst(engine, 1000)          # the flusher is running
    os.close(r)                  # the peer goes away mid-stream
    errors = []
    for i in range(20000):
        try:
            engine.send(DATA, 1, i)
        except OSError as exc:
            errors.append(exc)
    with pytest.raises(OSError) as info:
        engine.send(DATA, 1, "after")
    import errno
    assert info.value.errno == errno.EPIPE
    assert errors and all(e.errno == errno.EPIPE for e in errors)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_flusher_after_fork(fds):
    # A child inherits the engine but not its flusher thread: a burst there
    # must start its own instead of waiting on one that does not exist.
    r, w = fds()
    engine = bursty(r, w)
    burst(engine, 300)
    one = len(pure_frame(DATA, 1, 1))
    assert wait_for(lambda: unread(r) >= 300 * one and engine.flushed > 0)
    pid = os.fork()
    if pid == 0:   # pragma: no cover - the child
        code = 1
        try:
            burst(engine, 300, chid=2)
            engine.close_write()
            code = 0
        finally:
            os._exit(code)
    status = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child hung sending a burst")
    assert os.waitstatus_to_exitcode(status) == 0
    engine.close_write()
    frames = split_frames(read_all(r))
    assert [f[1] for f in frames] == [1] * 300 + [2] * 300


# ---------------------------------------------------------------------------
# C engine <-> pure engine


@pytest.mark.parametrize("direction", ["c-to-pure", "pure-to-c"])
def test_c_and_pure_engines_talk(fds, direction):
    r1, w1 = fds()
    r2, w2 = fds()
    c = _execnet.Engine(r1, w2)
    pure = gateway_base._PyEngine(r2, w1)
    sender, receiver = (c, pure) if direction == "c-to-pure" else (pure, c)
    got = []
    receiver.set_route(1, got.append)
    rec = Receiver(receiver)
    objs = [s[2] for s in SAMPLES if s[0] == DATA] + list(range(1000))
    for obj in objs:
        sender.send(DATA, 1, obj)
    sender.send(CLOSE, 1)
    sender.send(DATA, 7, "unrouted")
    sender.close_write()
    reason = rec.join()
    assert isinstance(reason, EOFError)
    assert got == objs
    assert rec.dispatched == [(CLOSE, 1, b""),
                              (DATA, 7, gateway_base._py_dumps_payload("unrouted"))]


_BACKEND = """
import sys
gb = sys.modules[channel.gateway.__class__.__module__]
channel.send(gb.backend)
"""

_EXCHANGE = '''
_ECHO = """
for item in channel:
    channel.send(item)
"""


def _exchange(gw):
    ch = gw.remote_exec(_ECHO)
    objs = [1, 2 ** 80, "text", b"raw", None, (1.5, [True]), {"k": {1, 2}},
            bytes(3 << 20)]
    for obj in objs:
        ch.send(obj)
    for i in range(5000):
        ch.send(i)
    for obj in objs:
        assert ch.receive(30) == obj
    assert [ch.receive(30) for _ in range(5000)] == list(range(5000))
    ch.close()
    ch.waitclose(30)
'''
exec(_EXCHANGE)


def test_c_master_with_pure_remote(makegateway):
    gw = makegateway("popen//env:EXECNET_NO_EXTENSIONS=1")
    assert gw.remote_exec(_BACKEND).receive(30) == "python"
    assert gateway_base.backend == "c"
    _exchange(gw)


def test_c_master_with_c_remote(makegateway):
    gw = makegateway("popen")
    assert gw.remote_exec(_BACKEND).receive(30) == "c"
    _exchange(gw)


def test_pure_master_with_c_remote():
    code = "\n".join([
        "import execnet",
        "from execnet import gateway_base",
        "assert gateway_base.backend == 'python', gateway_base.backend",
        "_BACKEND = %r" % (_BACKEND,),
        _EXCHANGE,
        "gw = execnet.makegateway('popen//env:EXECNET_NO_EXTENSIONS=')",
        "assert gw.remote_exec(_BACKEND).receive(30) == 'c'",
        "_exchange(gw)",
        "gw.exit()",
        "gw.join(10)",
        "print('OK')",
    ])
    res = run_python(code, env={"EXECNET_NO_EXTENSIONS": "1"}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("OK"), res.stdout + res.stderr


# ---------------------------------------------------------------------------
# Engine: Ctrl-C while a send blocks


def _pipe_capacity(w):
    import fcntl
    return fcntl.fcntl(w, 1032)  # F_GETPIPE_SZ


def test_sigint_during_a_blocked_write_keeps_frames_whole(fds, sigint_default):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    big = b"x" * (3 * _pipe_capacity(w))
    sigint_main_later(0.2)
    reader = []
    later(0.6, lambda: reader.append(Reader(r)))
    with pytest.raises(KeyboardInterrupt):
        engine.send(DATA, 1, big)  # finishes the frame, then raises
    engine.send(DATA, 1, "after")
    engine.close_write()
    deadline = time.monotonic() + 10
    while not reader and time.monotonic() < deadline:
        time.sleep(0.01)
    frames = split_frames(reader[0].result())
    assert frames == [(DATA, 1, gateway_base._py_dumps_payload(big)),
                      (DATA, 1, gateway_base._py_dumps_payload("after"))]


def test_second_sigint_aborts_a_blocked_write(fds, sigint_default):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    big = b"x" * (3 * _pipe_capacity(w))
    sigint_main_later(0.2)
    sigint_main_later(0.4)
    with pytest.raises(KeyboardInterrupt):
        engine.send(DATA, 1, big)
    with pytest.raises(OSError) as excinfo:
        engine.send(DATA, 1, "after")
    assert "interrupted write" in str(excinfo.value)
    reader = Reader(r)
    engine.close_write()
    assert len(reader.result()) < len(big)


def test_sigint_while_waiting_for_the_writer(fds, sigint_default):
    r, w = fds()
    engine = _execnet.Engine(r, w)
    big = b"x" * (2 * _pipe_capacity(w))
    other = threading.Thread(target=engine.send, args=(DATA, 3, big))
    other.start()
    time.sleep(0.2)  # `other` holds the writer role, blocked on the pipe
    sigint_main_later(0.2)
    with pytest.raises(KeyboardInterrupt):
        engine.send(DATA, 1, b"y" * 100000)  # waits for the role
    reader = Reader(r)
    other.join(10)
    engine.send(DATA, 1, "after")
    engine.close_write()
    frames = split_frames(reader.result())
    assert frames[0] == (DATA, 3, gateway_base._py_dumps_payload(big))
    assert frames[-1] == (DATA, 1, gateway_base._py_dumps_payload("after"))
    assert len(frames) in (2, 3)  # the interrupted frame may have gone out


def test_backpressure_bounds_pending_data(fds):
    """Senders wait for a slow reader instead of buffering without end."""
    r, w = fds()
    engine = _execnet.Engine(r, w)
    cap = _pipe_capacity(w)
    stop = threading.Event()
    sent = [0] * 4

    def sender(t):
        while not stop.is_set():
            engine.send(DATA, t, "z" * 1000)
            sent[t] += 1

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # nobody reads: the pipe fills, then the senders wait
    stop.set()
    total = sum(sent)
    # the pipe, the batch being written and the pending buffer (each at
    # most HIGH_WATER, 1 MiB, plus a frame per thread)
    assert total * 1014 < cap + 2 * ((1 << 20) + 4 * 1014)
    reader = Reader(r)
    for t in threads:
        t.join(10)
    engine.close_write()
    frames = split_frames(reader.result())
    assert len(frames) == sum(sent)


def _sneaky_channel(action):
    class Sneaky(gateway_base.Channel):
        def __init__(self):
            pass  # no gateway: __del__ does nothing

        @property
        def id(self):
            return action()

    return Sneaky()


def test_send_from_code_run_during_serialization(fds):
    """A send (or close_write) from Python code that runs while this very
    thread serializes into the outgoing buffer follows the frame in
    progress instead of deadlocking."""
    r, w = fds()
    engine = _execnet.Engine(r, w)
    reader = Reader(r)

    def nested_send():
        engine.send(DATA, 99, "nested")
        return 5

    def nested_send_then_fail():
        engine.send(DATA, 98, "survives")
        raise RuntimeError("no id")

    def nested_close():
        engine.close_write()
        return 7

    engine.send(DATA, 1, [_sneaky_channel(nested_send)])
    with pytest.raises(gateway_base.DumpError):
        engine.send(DATA, 1, _sneaky_channel(nested_send_then_fail))
    engine.send(DATA, 3, (_sneaky_channel(nested_close), "last"))
    with pytest.raises(OSError):
        engine.send(DATA, 1, "closed")
    frames = split_frames(reader.result())
    assert frames == [
        (DATA, 1, b"K\x00\x00\x00\x01F\x00\x00\x00\x00B\x00\x00\x00\x05PQ"),
        (DATA, 99, gateway_base._py_dumps_payload("nested")),
        (DATA, 98, gateway_base._py_dumps_payload("survives")),
        (DATA, 3, b"B\x00\x00\x00\x07" + gateway_base._py_dumps_payload("last")[:-1]
         + b"@\x00\x00\x00\x02Q"),
    ]


# ---------------------------------------------------------------------------
# ChannelBase: Channel's send() and receive() in C


class FakeEngine:
    """A pure engine stand-in: records what is sent."""

    def __init__(self):
        self.sent = []

    def send(self, msgcode, channelid, obj=None):
        self.sent.append((msgcode, channelid, obj))
        return "ignored"


class FakeGateway:
    def __init__(self, engine=None):
        self._engine = engine if engine is not None else FakeEngine()
        self._pending_last_messages = []

    _send_pending_last_messages = gateway_base.BaseGateway._send_pending_last_messages


def _chan_class(base):
    class Chan(base):
        """A channel base set up like Channel.__init__ does, on any gateway."""

        def __init__(self, gateway, id, queue=None):
            self.gateway = gateway
            self.id = id
            self._queue = queue if queue is not None else _execnet.ChannelQueue()
            self._closed = False
            self._callback = None
            self._remoteerrors = []

        def __repr__(self):
            return "<Chan %d>" % self.id

        def _getremoteerror(self):
            return gateway_base.Channel._getremoteerror(self)

    return Chan


Chan = _chan_class(_execnet.ChannelBase)
PyChan = _chan_class(gateway_base._PyChannelBase)


@pytest.fixture(params=["python", "c"])
def AnyChan(request):
    """The C ChannelBase and its pure twin must behave the same."""
    return PyChan if request.param == "python" else Chan


def test_channel_class_is_native():
    Channel = gateway_base.Channel
    assert gateway_base._ChannelBase is _execnet.ChannelBase
    assert Channel.__mro__[1] is _execnet.ChannelBase
    assert type(Channel.send) is type(_execnet.ChannelQueue.get)
    assert type(Channel.receive) is type(_execnet.ChannelQueue.get)
    import inspect
    assert list(inspect.signature(Channel.receive).parameters) == ["self", "timeout"]
    assert list(inspect.signature(Channel.send).parameters) == ["self", "item"]
    # the pure twin stays reachable, with the same methods
    assert set(vars(gateway_base._PyChannelBase)) >= {"send", "receive"}


def test_channel_send_on_closed_channel(gw, AnyChan):
    ch = gw.remote_exec("channel.receive()")
    ch.send(1)
    ch.waitclose(30)
    with pytest.raises(OSError, match=r"cannot send to <Channel id=\d+ closed>"):
        ch.send(2)
    ch = gw.newchannel()
    ch.close()
    with pytest.raises(OSError, match="cannot send to"):
        ch.send(item=3)
    # the flag is an ordinary attribute, any true value counts
    c = AnyChan(FakeGateway(), 5)
    c._closed = 1
    with pytest.raises(OSError, match=r"cannot send to <Chan 5>"):
        c.send(1)
    assert c.gateway._engine.sent == []


def test_channel_receive_with_callback_set(gw):
    ch = gw.remote_exec("channel.send(channel.receive())")
    got = []
    ch.setcallback(got.append)
    with pytest.raises(OSError, match="receiver callback"):
        ch.receive()
    with pytest.raises(OSError, match="receiver callback"):
        ch.receive(timeout=0)
    ch.send(42)
    ch.waitclose(30)
    assert got == [42]


def test_channel_remote_error_after_eof(gw, AnyChan):
    ch = gw.remote_exec("channel.send(1); raise ValueError('boom')")
    assert ch.receive(30) == 1
    with pytest.raises(gateway_base.RemoteError, match="boom") as info:
        ch.receive(30)
    exc = info.value
    assert exc.__cause__ is None and exc.__suppress_context__
    assert type(exc.__context__) is EOFError
    # popped: the next receive sees the bare end of the channel
    with pytest.raises(EOFError):
        ch.receive(30)
    ch.waitclose(30)  # nothing left to raise either

    # the same, on a queue closed by hand
    c = AnyChan(FakeGateway(), 3)
    err1, err2 = gateway_base.RemoteError("one"), gateway_base.RemoteError("two")
    c._remoteerrors.extend([err1, err2])
    c._queue.put("item")
    c._queue.close()
    assert c.receive() == "item"
    for err in (err1, err2):
        with pytest.raises(gateway_base.RemoteError) as info:
            c.receive()
        assert info.value is err
    with pytest.raises(EOFError):
        c.receive()
    # the Python method is asked, so it can be overridden
    c._getremoteerror = lambda: err2
    with pytest.raises(gateway_base.RemoteError) as info:
        c.receive()
    assert info.value is err2
    c._getremoteerror = lambda: None
    with pytest.raises(EOFError):
        c.receive()
    c._getremoteerror = lambda: 1 / 0
    with pytest.raises(ZeroDivisionError) as info:
        c.receive()
    assert type(info.value.__context__) is EOFError
    del c._getremoteerror
    c._remoteerrors = ["not an exception"]
    with pytest.raises(TypeError, match="BaseException") as info:
        c.receive()
    assert type(info.value.__context__) is EOFError


def test_channel_pure_engine_and_queue_paths(AnyChan):
    gw = FakeGateway()
    q = gateway_base._PyChannelQueue()
    c = AnyChan(gw, 7, q)
    c.send("x")
    assert c.send(item=None) is None
    assert gw._engine.sent == [(DATA, 7, "x"), (DATA, 7, None)]
    # pending last messages of collected channels go out first
    gw._pending_last_messages.extend([9, 11])
    c.send("y")
    LAST = gateway_base.Message.CHANNEL_LAST_MESSAGE
    assert gw._engine.sent[2:] == [(LAST, 11, None), (LAST, 9, None),
                                   (DATA, 7, "y")]
    assert gw._pending_last_messages == []
    # queue.get(timeout)
    q.put(1)
    assert c.receive() == 1
    q.put(2)
    assert c.receive(timeout=5) == 2
    with pytest.raises(gateway_base.TimeoutError):
        c.receive(0.01)
    q.close()
    with pytest.raises(EOFError):
        c.receive(1)
    with pytest.raises(TypeError):
        c.receive(1, 2)
    with pytest.raises(TypeError):
        c.receive(bogus=1)
    with pytest.raises(TypeError):
        c.send()
    with pytest.raises(TypeError):
        c.send(1, 2)
    with pytest.raises(TypeError):
        c.send(obj=1)
    c._callback = print
    with pytest.raises(OSError, match="receiver callback"):
        c.receive()


def test_channel_native_engine_path(fds):
    """Through the C engine: the same frames as Engine.send, pending last
    messages first, a new gateway picked up."""
    r, w = fds()
    gw = FakeGateway(_execnet.Engine(r, w))
    reader = Reader(r)
    c = Chan(gw, 5)
    c.send([1, "two"])
    gw._pending_last_messages.append(8)
    c.send(b"z" * 70000)  # the no-copy path
    gw2 = FakeGateway(FakeEngine())
    c.gateway = gw2
    c.send("other")
    assert gw2._engine.sent == [(DATA, 5, "other")]
    c.gateway = gw
    c.id = 2 ** 31
    with pytest.raises(OverflowError):
        c.send(1)
    c.id = 6
    with pytest.raises(gateway_base.DumpError):
        c.send(object())
    c.send(None)
    gw._engine.close_write()
    with pytest.raises(OSError, match="already closed"):
        c.send(1)
    LAST = gateway_base.Message.CHANNEL_LAST_MESSAGE
    assert split_frames(reader.result()) == [
        (DATA, 5, gateway_base._py_dumps_payload([1, "two"])),
        (LAST, 8, b""),
        (DATA, 5, gateway_base._py_dumps_payload(b"z" * 70000)),
        (DATA, 6, gateway_base._py_dumps_payload(None)),
    ]


def test_channel_subclass_attributes(gw):
    ch = gw.newchannel()
    # the hot fields are slots of the C base, the rest lives in __dict__
    assert set(vars(ch)) == {"_strconfig"}
    assert ch.gateway is gw and isinstance(ch.id, int)
    assert type(ch._queue) is _execnet.ChannelQueue
    assert ch._closed is False and ch._callback is None and ch._remoteerrors == []
    ch.extra = "x"
    assert vars(ch)["extra"] == "x"
    import weakref
    assert weakref.ref(ch)() is ch
    assert isinstance(ch, gateway_base.Channel)
    # the serializer still recognises channels
    assert gateway_base.dumps(ch) == b"\x02B" + struct.pack("!i", ch.id) + b"Q"

    # unset slots raise AttributeError, in Python and in C
    c = _execnet.ChannelBase("ignored", args=1)
    for name in ("id", "gateway", "_queue", "_closed", "_callback", "_remoteerrors"):
        with pytest.raises(AttributeError):
            getattr(c, name)
    with pytest.raises(AttributeError, match="_closed"):
        c.send(1)
    with pytest.raises(AttributeError, match="_callback"):
        c.receive()
    c._closed = False
    with pytest.raises(AttributeError, match="gateway"):
        c.send(1)
    c.gateway = object()
    with pytest.raises(AttributeError, match="_engine"):
        c.send(1)
    c.gateway = FakeGateway()
    c.gateway._pending_last_messages = ()
    with pytest.raises(TypeError, match="list"):
        c.send(1)
    c.gateway = FakeGateway()
    with pytest.raises(AttributeError, match="id"):
        c.send(1)
    c._callback = None
    with pytest.raises(AttributeError, match="_queue"):
        c.receive()
    with pytest.raises(AttributeError):
        c.anything = 1  # no __dict__ on the bare base
    c.id = 1
    del c.id
    with pytest.raises(AttributeError):
        del c.id


def test_channel_gc_of_cycles():
    import weakref

    def make():
        gw = FakeGateway(FakeEngine())
        c = Chan(gw, 3)
        c.send("x")  # fills the send cache: c -> engine, gateway, list
        gw._engine.me = c  # engine -> channel
        gw._pending_last_messages.append(c)  # no flush: pending list -> c
        c._callback = c
        c._remoteerrors.append(c)
        c._queue.put(c)
        c.cycle = [c]
        return weakref.ref(c), weakref.ref(gw)

    refs = [make() for _ in range(50)]
    gc.collect()
    assert all(r() is None and g() is None for r, g in refs)

    # real Channel objects on a real (pure-queue) gateway-less setup
    class Ch(gateway_base.Channel):
        def __init__(self):
            self.gateway = None  # __del__ does nothing
            self.id = 1
            self._queue = _execnet.ChannelQueue()
            self._closed = False
            self._callback = None
            self._remoteerrors = [self]
            self._strconfig = None

    chans = [Ch() for _ in range(50)]
    for a, b in zip(chans, chans[1:] + chans[:1]):
        a._queue.put(b)
    wrefs = [weakref.ref(c) for c in chans]
    del chans, a, b
    gc.collect()
    assert all(r() is None for r in wrefs)


def test_channel_cache_survives_reassignment_during_send(fds):
    """Python code run by a send (the pending flush, a __del__ during
    serialization) may reassign the channel's fields."""
    c = Chan(FakeGateway(), 4)

    class Flusher(FakeGateway):
        def _send_pending_last_messages(self):
            c.gateway = FakeGateway()  # drops the cached refs
            del self._pending_last_messages[:]
            gc.collect()

    gw = Flusher()
    c.gateway = gw
    gw._pending_last_messages.append(1)
    c.send("x")
    assert gw._engine.sent == [(DATA, 4, "x")]
    del gw
    c.send("y")
    assert c.gateway._engine.sent == [(DATA, 4, "y")]
