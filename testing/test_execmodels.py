"""The green execution models, gevent and eventlet, on both sides.

remote_exec'd code and the receiver run as greenlets; blocking channel
operations park the greenlet and let the hub run the others.  Each test runs
for every model whose library is installed (skipped otherwise).
"""
import subprocess
import sys
import time
import warnings

import pytest

import execnet
from execnet import gateway_base

GREEN = ["gevent", "eventlet"]

# eventlet warns about every fork() after its import, subprocess's included
pytestmark = pytest.mark.filterwarnings("ignore:Using fork:DeprecationWarning")


def _importorskip(name):
    with warnings.catch_warnings():
        # eventlet announces its deprecation at import
        warnings.simplefilter("ignore")
        return pytest.importorskip(name)


@pytest.fixture(params=GREEN)
def model(request):
    _importorskip(request.param)
    return request.param


@pytest.fixture
def green(model):
    """A Group with ``model`` on both sides."""
    g = execnet.Group(execmodel=model)
    yield g
    g.terminate(timeout=10)


@pytest.fixture
def ggw(green):
    return green.makegateway()


def _spawn(model, func, *args):
    return gateway_base.get_execmodel(model).start(func, args)


def _sleep(model, delay):
    gateway_base.get_execmodel(model).sleep(delay)


# -- models and engine choice

def test_group_models_both_sides(green, model):
    assert green.execmodel.backend == model
    assert green.remote_execmodel.backend == model
    gw = green.makegateway()
    assert gw.execmodel.backend == model
    ch = gw.remote_exec("channel.send(channel.gateway.execmodel.backend)")
    assert ch.receive(timeout=10) == model
    ch.waitclose(10)
    assert gw.remote_status().execmodel == model


def test_spec_execmodel_key(model):
    group = execnet.Group()  # thread locally
    try:
        gw = group.makegateway("popen//execmodel=%s" % model)
        assert gw.execmodel.backend == "thread"
        ch = gw.remote_exec("channel.send(channel.gateway.execmodel.backend)")
        assert ch.receive(timeout=10) == model
    finally:
        group.terminate(timeout=10)


def test_green_gateways_use_the_pure_engine(ggw, model):
    # even when the native core is loaded: a blocking C call would stall the hub
    assert type(ggw._engine) is gateway_base._GreenEngine
    assert isinstance(ggw._engine, gateway_base._PyEngine)
    ch = ggw.newchannel()
    assert type(ch._queue) is gateway_base._GreenChannelQueue
    ch = ggw.remote_exec("""
        channel.send((type(channel.gateway._engine).__name__,
                      type(channel._queue).__name__))
    """)
    assert ch.receive(timeout=10) == ("_GreenEngine", "_GreenChannelQueue")
    ch.waitclose(10)


def test_thread_gateways_keep_the_module_engine(gw):
    assert type(gw._engine) is gateway_base._Engine
    assert type(gw.newchannel()._queue) is gateway_base.ChannelQueue


def test_remote_code_runs_as_greenlets(ggw, model):
    ch = ggw.remote_exec("""
        import threading, greenlet
        channel.send((threading.current_thread() is threading.main_thread(),
                      greenlet.getcurrent().parent is not None))
    """)
    # every greenlet lives on the main thread, none is the main greenlet
    assert ch.receive(timeout=10) == (True, True)


# -- channel operations

def test_round_trip(ggw):
    ch = ggw.remote_exec("""
        for item in channel:
            channel.send(item)
    """)
    items = [1, "two", b"three", [4.0, None], {"five": (5, True)}, 2**100]
    for item in items:
        ch.send(item)
        assert ch.receive(timeout=10) == item
    ch.close()
    ch.waitclose(10)


def test_function_remote_exec_with_kwargs(ggw):
    ch = ggw.remote_exec(_remote_add, a=2, b=3)
    assert ch.receive(timeout=10) == 5


def _remote_add(channel, a, b):
    channel.send(a + b)


def test_concurrent_blocked_channels_are_all_served(ggw):
    n = 5
    channels = [ggw.remote_exec("""
        x = channel.receive()
        channel.send(x * 10)
    """) for _ in range(n)]
    # all five are parked in receive() at once, in one hub
    deadline = time.monotonic() + 10
    while ggw.remote_status().numexecuting != n:
        assert time.monotonic() < deadline, "remote tasks did not all start"
        time.sleep(0.02)
    for i, ch in reversed(list(enumerate(channels))):
        ch.send(i)
    assert [ch.receive(timeout=10) for ch in channels] == [0, 10, 20, 30, 40]
    for ch in channels:
        ch.waitclose(10)


def test_many_greenlets_receiving_locally(ggw, model):
    channels = [ggw.remote_exec("channel.send(channel.receive() + 1)")
                for _ in range(20)]
    results = {}

    def wait_on(i, ch):
        results[i] = ch.receive(timeout=10)

    tasks = [_spawn(model, wait_on, i, ch) for i, ch in enumerate(channels)]
    _sleep(model, 0.05)
    for i, ch in enumerate(channels):
        ch.send(i)
    deadline = time.monotonic() + 10
    while len(results) < len(channels):
        assert time.monotonic() < deadline
        _sleep(model, 0.01)
    assert results == {i: i + 1 for i in range(20)}
    assert len(tasks) == 20


def test_killed_receiver_greenlet_leaves_the_channel_usable(ggw, model):
    ch = ggw.remote_exec("""
        channel.receive()
        channel.send("first")
        channel.send("second")
    """)
    got = []
    task = _spawn(model, lambda: got.append(ch.receive()))
    _sleep(model, 0.05)
    task.kill()
    _sleep(model, 0.01)
    ch.send(None)
    assert ch.receive(timeout=10) == "first"
    assert ch.receive(timeout=10) == "second"
    assert got == []


def test_receive_timeout(ggw):
    ch = ggw.remote_exec("channel.receive()")
    t0 = time.monotonic()
    with pytest.raises(ch.TimeoutError):
        ch.receive(timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 5
    with pytest.raises(execnet.TimeoutError):
        ch.receive(0.05)
    ch.send(None)
    ch.waitclose(10)


def test_remote_receive_timeout(ggw):
    ch = ggw.remote_exec("""
        try:
            channel.receive(timeout=0.1)
        except channel.TimeoutError:
            channel.send("timed out")
    """)
    assert ch.receive(timeout=10) == "timed out"
    ch.waitclose(10)


def test_setcallback(ggw, model):
    ch = ggw.remote_exec("""
        for i in range(5):
            channel.send(i)
    """)
    got = []
    ch.setcallback(got.append, endmarker="end")
    ch.waitclose(10)
    deadline = time.monotonic() + 10
    while got[-1:] != ["end"]:
        assert time.monotonic() < deadline
        _sleep(model, 0.01)
    assert got == [0, 1, 2, 3, 4, "end"]


def test_remote_setcallback(ggw):
    ch = ggw.remote_exec("""
        got = []
        done = channel.gateway.execmodel.Event()
        def cb(item):
            got.append(item)
            if item is None:
                done.set()
        channel.setcallback(cb)
        done.wait(10)
        channel.send(got)
    """)
    for i in range(3):
        ch.send(i)
    ch.send(None)
    assert ch.receive(timeout=10) == [0, 1, 2, None]


def test_waitclose(ggw):
    ch = ggw.remote_exec("channel.receive()")
    with pytest.raises(ch.TimeoutError):
        ch.waitclose(0.1)
    ch.send(1)
    ch.waitclose(10)
    assert ch.isclosed()


def test_remote_error_propagates(ggw):
    ch = ggw.remote_exec("""
        channel.receive()
        raise ValueError("green boom")
    """)
    ch.send(0)
    with pytest.raises(execnet.RemoteError) as excinfo:
        ch.receive(timeout=10)
    assert "ValueError: green boom" in str(excinfo.value)
    ch2 = ggw.remote_exec("1/0")
    with pytest.raises(execnet.RemoteError, match="ZeroDivisionError"):
        ch2.waitclose(10)


def test_channel_over_channel(ggw):
    ch = ggw.remote_exec("""
        sub = channel.receive()
        sub.send(sub.receive() * 2)
    """)
    sub = ggw.newchannel()
    ch.send(sub)
    sub.send(21)
    assert sub.receive(timeout=10) == 42
    ch.waitclose(10)


def test_make_receive_queue_is_green(green, model):
    gws = [green.makegateway() for _ in range(2)]
    mch = green.remote_exec("channel.send(channel.gateway.id)")
    q = mch.make_receive_queue(endmarker=-1)
    assert type(q).__module__.startswith(model)
    got = [q.get(timeout=10) for _ in range(4)]
    ids = sorted(item for ch, item in got if item != -1)
    assert ids == sorted(gw.id + "-worker" for gw in gws)
    assert sum(1 for ch, item in got if item == -1) == 2


def test_big_payloads_both_ways_at_once(ggw):
    # more than a pipe holds, sent by both sides before either reads:
    # a send that blocks must park its greenlet, not the hub
    size = 4 * 1024 * 1024
    ch = ggw.remote_exec("""
        size = channel.receive()
        channel.send(b"r" * size)
        data = channel.receive()
        channel.send(len(data))
    """)
    ch.send(size)
    ch.send(b"m" * size)
    assert ch.receive(timeout=30) == b"r" * size
    assert ch.receive(timeout=30) == size


# -- the hub is not blocked

def test_local_hub_runs_while_receive_waits(ggw, model):
    ch = ggw.remote_exec("""
        channel.gateway.execmodel.sleep(0.3)
        channel.send("late")
    """)
    counter = [0]
    stop = []

    def spin():
        while not stop:
            counter[0] += 1
            _sleep(model, 0)

    _spawn(model, spin)
    try:
        assert ch.receive(timeout=10) == "late"
    finally:
        stop.append(True)
    assert counter[0] > 10, counter


def test_remote_hub_runs_while_a_task_waits(ggw):
    blocker = ggw.remote_exec("channel.receive()")
    counter = ggw.remote_exec("""
        model = channel.gateway.execmodel
        count = [0]
        stop = []
        def spin():
            while not stop:
                count[0] += 1
                model.sleep(0)
        model.start(spin)
        model.sleep(0.2)
        stop.append(1)
        channel.send(count[0])
    """)
    assert counter.receive(timeout=10) > 10
    blocker.send(None)
    blocker.waitclose(10)


def test_gateway_creation_keeps_the_hub_running(green, model):
    # the start-up handshake waits with the model's select
    counter = [0]
    stop = []

    def spin():
        while not stop:
            counter[0] += 1
            _sleep(model, 0.001)

    _spawn(model, spin)
    try:
        gw = green.makegateway()
        during = counter[0]
    finally:
        stop.append(True)
    assert during > 3, during
    gw.remote_exec("pass").waitclose(10)


def test_zero_install_remote(model, tmp_path, monkeypatch):
    # a remote that cannot import our package runs gateway_base from source
    fake = tmp_path / "execnet"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not this one')\n")
    from execnet import gateway_bootstrap

    monkeypatch.setattr(gateway_bootstrap, "PKGDIR", str(tmp_path))
    group = execnet.Group(execmodel=model)
    try:
        gw = group.makegateway()
        ch = gw.remote_exec("""
            import sys
            channel.send((sorted(n for n in sys.modules if n.startswith("execnet")),
                          channel.gateway.execmodel.backend,
                          type(channel.gateway._engine).__name__))
            channel.send(channel.receive() * 2)
        """)
        assert ch.receive(10) == (["execnet_gateway_base"], model, "_GreenEngine")
        ch.send([1])
        assert ch.receive(10) == [1, 1]
    finally:
        group.terminate(timeout=10)


def test_remote_without_the_library_fails_start_up(model, otherpython, capfd):
    probe = subprocess.run([otherpython, "-c", "import " + model],
                           capture_output=True)
    if probe.returncode == 0:
        pytest.skip("%s has %s" % (otherpython, model))
    group = execnet.Group()
    try:
        with pytest.raises(execnet.HostNotFound, match="during start-up"):
            group.makegateway("popen//python=%s//execmodel=%s"
                              % (otherpython, model))
    finally:
        group.terminate(timeout=10)
    assert "execnet: execmodel %s: " % model in capfd.readouterr().err


# -- termination

def test_terminate_with_blocked_remote_tasks(model):
    group = execnet.Group(execmodel=model)
    gw = group.makegateway()
    channels = [gw.remote_exec("channel.receive()") for _ in range(3)]
    gw.remote_status()
    t0 = time.monotonic()
    group.terminate(timeout=5)
    assert time.monotonic() - t0 < 8
    assert not gw.hasreceiver()
    for ch in channels:
        with pytest.raises((EOFError, execnet.RemoteError)):
            ch.receive(timeout=5)


def test_terminate_bounded_when_remote_hub_is_stuck(model):
    group = execnet.Group(execmodel=model)
    gw = group.makegateway()
    # time.sleep does not yield: the worker's hub is stuck for good
    gw.remote_exec("import time; channel.send(1); time.sleep(120)").receive(10)
    pid = gw._io.popen.pid
    t0 = time.monotonic()
    group.terminate(timeout=1)
    assert time.monotonic() - t0 < 8
    from conftest import pid_alive

    assert not pid_alive(pid)


def test_worker_exits_when_the_master_dies(model):
    from conftest import pid_alive, run_python

    proc = run_python(
        "import execnet, os\n"
        "g = execnet.Group(execmodel=%r)\n"
        "gw = g.makegateway()\n"
        "ch = gw.remote_exec('channel.send(__import__(\"os\").getpid()); "
        "channel.receive()')\n"
        "print(ch.receive(10), flush=True)\n"
        "os._exit(0)\n" % model, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.split()[-1])
    deadline = time.monotonic() + 15
    while pid_alive(pid):
        assert time.monotonic() < deadline, "worker outlived its master"
        time.sleep(0.05)


# -- mixed models

@pytest.mark.parametrize("side", ["local", "remote"])
def test_thread_mixed_with_green(model, side):
    group = execnet.Group()
    if side == "local":
        group.set_execmodel(model, "thread")
        expected = ("thread", model)
    else:
        group.set_execmodel("thread", model)
        expected = (model, "thread")
    try:
        gw = group.makegateway()
        assert gw.execmodel.backend == expected[1]
        channels = [gw.remote_exec("""
            x = channel.receive()
            channel.send((channel.gateway.execmodel.backend, x + 1))
        """) for _ in range(5)]
        for i, ch in enumerate(channels):
            ch.send(i)
        assert [ch.receive(timeout=10) for ch in channels] == \
            [(expected[0], i + 1) for i in range(5)]
        ch = gw.remote_exec("1/0")
        with pytest.raises(execnet.RemoteError):
            ch.waitclose(10)
    finally:
        group.terminate(timeout=10)


def test_default_group_set_execmodel(model):
    group = execnet.Group()
    group.set_execmodel("thread", model)
    assert group.execmodel.backend == "thread"
    assert group.remote_execmodel.backend == model
    try:
        gw = group.makegateway()
        assert gw.remote_status().execmodel == model
    finally:
        group.terminate(timeout=10)


# -- primitives

def test_primitives(model):
    em = gateway_base.get_execmodel(model)
    assert em is gateway_base.get_execmodel(model)
    assert repr(em) == "<ExecModel %r>" % model
    lock = em.Lock()  # re-entrant, as stock execnet's
    with lock:
        with lock:
            pass
    assert lock.acquire(False)
    lock.release()
    # the model's own modules, as stock offers them
    q = em.queue.Queue()
    q.put(1)
    assert q.get() == 1
    with pytest.raises(em.queue.Empty):
        q.get(block=False)
    assert callable(em.socket.socket)
    assert em.subprocess.PIPE is not None
    expect = "queue" if model in ("thread", "main_thread_only") else model + ".queue"
    assert em.queue is sys.modules[expect]
    rlock = em.RLock()
    with rlock:
        with rlock:
            pass
    ev = em.Event()
    assert not ev.wait(0.01)
    em.start(ev.set)
    assert ev.wait(5)
    assert ev.is_set()
    cond = em.Condition()
    box = []

    def producer():
        with cond:
            box.append(1)
            cond.notify()

    with cond:
        em.start(producer)
        assert cond.wait_for(lambda: box, 5)
    with cond:
        assert not cond.wait(0.01)
    q = em.Queue()
    em.start(q.put, (7,))
    assert q.get(timeout=5) == 7
    idents = []
    done = em.Event()

    def record():
        idents.append(em.get_ident())
        done.set()

    em.start(record)
    done.wait(5)
    assert idents and idents[0] != em.get_ident()


def test_library_not_imported_by_gateway_base():
    from conftest import run_python

    proc = run_python(
        "import sys, execnet, execnet.gateway_base as gb\n"
        "g = execnet.Group(); gw = g.makegateway()\n"
        "gw.remote_exec('channel.send(1)').receive(10)\n"
        "g.terminate(10)\n"
        "print(sorted(m for m in ('gevent', 'eventlet', 'greenlet') "
        "if m in sys.modules))\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_unknown_model_still_rejected():
    with pytest.raises(ValueError):
        gateway_base.get_execmodel("twisted")


@pytest.mark.parametrize("name", ["thread", "main_thread_only"])
def test_thread_models_offer_stocks_primitives(name):
    em = gateway_base.get_execmodel(name)
    lock = em.Lock()  # re-entrant, as stock execnet's
    with lock:
        with lock:
            pass
    import queue
    import socket

    assert (em.queue, em.socket, em.subprocess) == (queue, socket, subprocess)
    ev = em.Event()
    em.start(ev.set)
    assert ev.wait(5)
