"""Channel semantics over a real popen gateway."""
import os
import queue
import struct
import textwrap
import threading

import pytest

import execnet

from conftest import run_python


def test_send_receive_roundtrip(gw):
    ch = gw.remote_exec("for x in channel: channel.send(x)")
    for obj in [1, "x", b"y", [1, (2, 3)], {"a": {1, 2}}, None, 2 ** 80, 1.5j]:
        ch.send(obj)
        assert ch.receive() == obj
    ch.close()
    ch.waitclose(10)


def test_receive_timeout(gw):
    ch = gw.remote_exec("channel.receive()")
    with pytest.raises(execnet.TimeoutError) as excinfo:
        ch.receive(timeout=0.05)
    assert isinstance(excinfo.value, OSError)
    assert "no item after" in str(excinfo.value)
    ch.send(None)
    ch.waitclose(10)


def test_waitclose_timeout(gw):
    ch = gw.remote_exec("channel.receive()")
    with pytest.raises(execnet.TimeoutError):
        ch.waitclose(0.05)
    ch.send(1)
    ch.waitclose(10)


def test_eof_after_normal_close(gw):
    ch = gw.remote_exec("channel.send(1)")
    assert ch.receive(10) == 1
    with pytest.raises(EOFError):
        ch.receive(10)
    ch.waitclose(10)
    assert ch.isclosed()
    with pytest.raises(OSError, match="cannot send"):
        ch.send(1)


def test_remote_error_then_eof(gw):
    ch = gw.remote_exec("raise ValueError('boom')")
    with pytest.raises(execnet.RemoteError) as excinfo:
        ch.receive(10)
    e = excinfo.value
    assert e.formatted.startswith("Traceback (most recent call last):")
    assert e.formatted.rstrip().endswith("ValueError: boom")
    assert str(e) == e.formatted
    assert repr(e) == "RemoteError: " + e.formatted
    with pytest.raises(EOFError):
        ch.receive(10)


def test_remote_error_with_unencodable_text(gw):
    # a lone surrogate in the message (undecodable bytes, say) is escaped:
    # the error arrives and the worker goes on serving
    ch = gw.remote_exec("raise ValueError('bad \\udcff byte')")
    with pytest.raises(execnet.RemoteError) as excinfo:
        ch.receive(10)
    assert excinfo.value.formatted.rstrip().endswith("ValueError: bad \\udcff byte")
    assert gw.remote_exec("channel.send(2)").receive(10) == 2


def test_unreceived_remote_error_is_warned_about():
    res = run_python(textwrap.dedent("""
        import gc, execnet
        gw = execnet.makegateway()
        seen = gw.remote_exec("raise ValueError('received error')")
        try:
            seen.waitclose(10)
        except execnet.RemoteError:
            pass
        dropped = gw.remote_exec("raise ValueError('never received')")
        assert dropped._queue.wait_closed(10)  # its error is in
        del seen, dropped
        gc.collect()
        print("collected")
        gw.exit()
        gw.join(10)
    """))
    assert res.returncode == 0, res.stderr
    assert res.stdout == "collected\n"
    # as with stock execnet: "[pid] Warning: unhandled RemoteError: ..."
    assert res.stderr.count("Warning: unhandled RemoteError") == 1, res.stderr
    assert "ValueError: never received" in res.stderr
    assert "received error" not in res.stderr.replace("never received", "")


def test_waitclose_raises_remote_error(gw):
    ch = gw.remote_exec("raise KeyError(42)")
    with pytest.raises(execnet.RemoteError, match="KeyError: 42"):
        ch.waitclose(10)


def test_items_before_error_are_not_lost(gw):
    ch = gw.remote_exec("""
        for i in range(100):
            channel.send(i)
        raise RuntimeError("after the data")
    """)
    assert [ch.receive(10) for _ in range(100)] == list(range(100))
    with pytest.raises(execnet.RemoteError, match="after the data"):
        ch.receive(10)


def test_close_with_error_from_remote_side(gw):
    ch = gw.remote_exec("""
        other = channel.receive()
        other.close("custom error")
    """)
    other = gw.newchannel()
    ch.send(other)
    with pytest.raises(execnet.RemoteError) as excinfo:
        other.receive(10)
    assert str(excinfo.value) == "custom error"
    ch.waitclose(10)


def test_explicit_close_inside_remote_exec_is_an_error(gw):
    ch = gw.remote_exec("channel.close()")
    with pytest.raises(execnet.RemoteError, match="cannot explicitly close"):
        ch.waitclose(10)


def test_local_close_then_receive_is_eof(gw):
    ch = gw.remote_exec("channel.receive()")
    ch.close()
    assert ch.isclosed()
    with pytest.raises(EOFError):
        ch.receive(1)
    ch.waitclose(1)


def test_channels_over_channels(gw):
    ch = gw.remote_exec("""
        newch = channel.receive()
        newch.send(newch.receive() + 1)
        sub = channel.gateway.newchannel()
        channel.send(sub)
        sub.send("from remote-made channel")
    """)
    newch = gw.newchannel()
    ch.send(newch)
    newch.send(41)
    assert newch.receive(10) == 42
    sub = ch.receive(10)
    assert isinstance(sub, execnet.Channel)
    assert sub.id % 2 == 0  # remote-allocated ids are even
    assert sub.receive(10) == "from remote-made channel"
    ch.waitclose(10)


def test_channel_ids_are_odd_locally(gw):
    ids = [gw.newchannel().id for _ in range(3)]
    assert all(i % 2 == 1 for i in ids)
    assert ids == sorted(ids)


def test_iteration_ends_at_close(gw):
    ch = gw.remote_exec("for i in range(10): channel.send(i)")
    assert list(ch) == list(range(10))


def test_setcallback_receives_all_then_endmarker(gw):
    q = queue.Queue()
    ch = gw.remote_exec("""
        for i in range(1000):
            channel.send(i)
    """)
    ch.setcallback(q.put, endmarker="END")
    got = [q.get(timeout=10) for _ in range(1001)]
    assert got == list(range(1000)) + ["END"]
    with pytest.raises(OSError):
        ch.receive()


def test_setcallback_after_items_queued_keeps_order(gw):
    ch = gw.remote_exec("""
        for i in range(50):
            channel.send(i)
        channel.receive()
        for i in range(50, 100):
            channel.send(i)
    """)
    assert ch.receive(10) == 0  # data is flowing
    got = []
    done = threading.Event()

    def cb(item):
        if item is None:
            done.set()
        else:
            got.append(item)

    ch.setcallback(cb, endmarker=None)
    ch.send("go")
    assert done.wait(10)
    assert got == list(range(1, 100))


def test_setcallback_on_closed_channel_calls_endmarker(gw):
    ch = gw.remote_exec("channel.send(1)")
    ch.waitclose(10)
    got = []
    ch.setcallback(got.append, endmarker=-1)
    assert got == [1, -1]


def test_callback_error_closes_channel_with_error(gw):
    ch = gw.remote_exec("""
        channel.send(1)
        try:
            channel.receive()
        except channel.RemoteError as e:
            channel.gateway._callback_error_seen = str(e)
    """)

    def cb(item):
        raise ValueError("callback failed")

    ch.setcallback(cb)
    with pytest.raises(execnet.RemoteError, match="callback failed"):
        ch.waitclose(10)
    # the remote side got the error too
    probe = gw.remote_exec("""
        import time
        for _ in range(1000):
            seen = getattr(channel.gateway, "_callback_error_seen", None)
            if seen:
                break
            time.sleep(0.01)
        channel.send(seen)
    """)
    assert "callback failed" in probe.receive(15)


def test_makefile_write_and_read(gw):
    ch = gw.remote_exec("""
        f = channel.makefile("r")
        line = f.readline()
        channel.send(line)
        out = channel.makefile("w")
        out.write("written")
    """)
    w = ch.makefile("w")
    w.write("hello\n")
    assert ch.receive(10) == "hello\n"
    assert ch.receive(10) == "written"
    ch.waitclose(10)


def test_send_unserializable_raises_in_sender(gw):
    ch = gw.remote_exec("channel.receive()")
    with pytest.raises(execnet.DumpError):
        ch.send(object())
    ch.send("still works")
    ch.waitclose(10)


def test_many_threads_sending(gw):
    ch = gw.remote_exec("""
        total = 0
        for x in channel:
            if x is None:
                break
            total += x
        channel.send(total)
    """)

    def sender():
        for i in range(500):
            ch.send(i)

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ch.send(None)
    assert ch.receive(30) == 4 * sum(range(500))


def test_bulk_bytes_both_ways(gw):
    ch = gw.remote_exec("""
        data = channel.receive()
        channel.send(data[::-1])
        channel.send(bytes(3 * 1024 * 1024))
    """)
    blob = bytes(range(256)) * 8192  # 2 MiB
    ch.send(blob)
    assert ch.receive(30) == blob[::-1]
    assert ch.receive(30) == bytes(3 * 1024 * 1024)


def test_channel_repr_and_gateway_attribute(gw):
    ch = gw.newchannel()
    assert repr(ch) == "<Channel id=%d open>" % ch.id
    assert ch.gateway is gw
    ch.close()
    assert repr(ch) == "<Channel id=%d closed>" % ch.id


def test_remote_channel_knows_execmodel(gw):
    ch = gw.remote_exec("channel.send(channel.gateway.execmodel.backend)")
    assert ch.receive(10) == "thread"


def test_collected_channel_with_a_callback_keeps_receiving(gw):
    # the callback goes on receiving without the Channel object: dropping
    # the object must not tell the peer to stop sending
    import gc

    got = queue.Queue()
    go = gw.newchannel()

    def start():
        ch = gw.remote_exec("""
            go = channel.receive()
            go.receive()  # our master has dropped its channel object
            for i in range(5):
                channel.send(i)
        """)
        ch.setcallback(got.put, endmarker="END")
        ch.send(go)

    start()
    gc.collect()
    go.send(None)  # goes out after anything the collection queued
    items = [got.get(timeout=10) for _ in range(6)]
    assert items == [0, 1, 2, 3, 4, "END"]


def test_receive_refuses_a_negative_timeout(gw):
    # as queue.Queue.get() does, and so stock execnet: also with an item
    # ready to take
    ch = gw.remote_exec("channel.send(1); channel.receive()")
    assert ch.receive(10) == 1
    with pytest.raises(ValueError, match="'timeout' must be a non-negative number"):
        ch.receive(-1)
    ch.send(None)
    ch.waitclose(10)
    # with an item queued, too
    q = gw.newchannel()._queue
    q.put(5)
    with pytest.raises(ValueError):
        q.get(-0.5)
    assert q.get(0) == 5


def test_dropped_channel_is_closed_for_the_remote(gw):
    import gc

    report = gw.newchannel()
    ch = gw.remote_exec("""
        import time
        report = channel.receive()
        deadline = time.monotonic() + 10
        # our peer dropped its end: its LAST_MESSAGE closes our side, for
        # sending too (as with stock execnet)
        while not channel._queue.is_closed() and time.monotonic() < deadline:
            time.sleep(0.005)
        try:
            channel.send("nobody listens")
            report.send(("sent", channel.isclosed()))
        except OSError as exc:
            report.send(("failed", channel.isclosed(), str(exc)))
    """)
    ch.send(report)
    del ch
    gc.collect()
    gw.remote_exec("pass").waitclose(10)  # the next send carries LAST_MESSAGE
    result = report.receive(15)
    assert result[:2] == ("failed", True), result
    assert "cannot send" in result[2]


def test_remote_dropping_a_channel_tells_us_without_further_sends(gw):
    sub = gw.newchannel()
    ch = gw.remote_exec("""
        import gc
        s = channel.receive()
        del s
        gc.collect()
        channel.receive()  # stays busy, sends nothing more
    """)
    ch.send(sub)
    with pytest.raises(EOFError):
        sub.receive(15)
    ch.send(None)
    ch.waitclose(10)


def test_local_close_delivers_the_endmarker(gw):
    ch = gw.remote_exec("channel.receive()")
    q = queue.Queue()
    ch.setcallback(q.put, endmarker="END")
    ch.close()
    assert q.get(timeout=10) == "END"


# -- string configuration (strconfig), pinned against stock execnet 2.1.2:
# reconfigure() sets (py2str_as_py3str, py3str_as_py2str) on BOTH ends,
# and each end loads what it receives with it.  A channel takes the
# gateway's setting when it is made; gateway.reconfigure() changes it for
# channels made later only.

_STRCONFIG_ECHO = """
    while True:
        x = channel.receive()
        if x is None:
            break
        if x in ("cfg", b"cfg"):
            channel.send((channel.gateway._strconfig, channel._strconfig))
        elif x in ("reconf", b"reconf"):
            channel.reconfigure(py2str_as_py3str=True, py3str_as_py2str=True)
        elif type(x) is tuple and x[0] == "sync":
            # the answer goes out first: once x[1] got its item, the
            # answer was received (and loaded) too
            channel.send(("echo", "x"))
            x[1].send(1)
        else:
            channel.send(("echo", x))
"""


def test_strconfig_defaults(gw):
    assert gw._strconfig == (True, False)
    assert gw.newchannel()._strconfig == (True, False)
    ch = gw.remote_exec(_STRCONFIG_ECHO)
    assert ch._strconfig == (True, False)
    ch.send("cfg")
    assert ch.receive(10) == ((True, False), (True, False))
    ch.send(["s", b"b", {"k": ("t",)}])
    assert ch.receive(10) == ("echo", ["s", b"b", {"k": ("t",)}])
    ch.send(None)
    ch.waitclose(10)


def _raw_data_frame(chid, payload):
    return struct.pack("!bii", 4, chid, len(payload)) + payload


def test_strconfig_default_loads_py2str_as_str(gw):
    # channels load the legacy M opcode as str (latin-1) by default, on
    # both ends; after reconfigure(False) as bytes
    ch = gw.remote_exec("""
        import os, struct
        x = channel.receive()
        channel.send((type(x).__name__, x))
        channel.gateway._engine.flush()
        payload = b"M" + struct.pack("!i", 2) + b"\\xe9y" + b"Q"
        os.write(channel.gateway._engine.wfd,
                 struct.pack("!bii", 4, channel.id, len(payload)) + payload)
        channel.receive()
    """)
    gw._engine.flush()
    os.write(gw._engine.wfd, _raw_data_frame(ch.id, b"M" + struct.pack("!i", 2) + b"\xe9xQ"))
    assert ch.receive(10) == ("str", "\xe9x")
    assert ch.receive(10) == "\xe9y"
    ch.send(None)
    ch.waitclose(10)

    ch = gw.remote_exec("""
        import os, struct
        channel.receive()
        channel.gateway._engine.flush()
        payload = b"M" + struct.pack("!i", 1) + b"m" + b"Q"
        os.write(channel.gateway._engine.wfd,
                 struct.pack("!bii", 4, channel.id, len(payload)) + payload)
        channel.receive()
    """)
    ch.reconfigure(py2str_as_py3str=False)
    ch.send(1)
    assert ch.receive(10) == b"m"
    ch.send(None)
    ch.waitclose(10)


@pytest.mark.parametrize("callback", [False, True])
def test_channel_reconfigure_applies_on_both_ends(gw, callback):
    ch = gw.remote_exec(_STRCONFIG_ECHO)
    other = gw.remote_exec(_STRCONFIG_ECHO)
    ch.send("x")
    assert ch.receive(10) == ("echo", "x")
    if callback:
        items = queue.Queue()
        ch.setcallback(items.put)
    # the answer is received (loaded) before the reconfigure
    sync = gw.newchannel()
    ch.send(("sync", sync))
    assert sync.receive(10) == 1
    if callback:
        assert items.get(timeout=10) == ("echo", "x")
    ch.reconfigure(py2str_as_py3str=False, py3str_as_py2str=True)
    assert ch._strconfig == (False, True)
    assert gw._strconfig == (True, False)
    receive = (lambda: items.get(timeout=10)) if callback else (lambda: ch.receive(10))
    if not callback:
        assert receive() == ("echo", "x")
    ch.send("cfg")
    # the remote loaded "cfg" as b"cfg"; what it sends loads here as bytes
    assert receive() == ((True, False), (False, True))
    ch.send(["s", b"b", {"k": ("t",)}])
    assert receive() == (b"echo", [b"s", b"b", {b"k": (b"t",)}])
    # other channels keep the gateway's setting
    other.send("y")
    assert other.receive(10) == ("echo", "y")
    ch.send(None)
    other.send(None)
    ch.waitclose(10)
    other.waitclose(10)


def test_channel_reconfigure_by_the_remote(gw):
    ch = gw.remote_exec(_STRCONFIG_ECHO)
    ch.send("reconf")
    ch.send("cfg")
    assert ch.receive(10) == ((True, False), (True, True))
    assert ch._strconfig == (True, True)
    ch.send("x")
    assert ch.receive(10) == (b"echo", b"x")
    ch.send(None)
    ch.waitclose(10)


def test_gateway_reconfigure_applies_to_new_channels(gw):
    pre = gw.remote_exec(_STRCONFIG_ECHO)
    pre.send("x")
    assert pre.receive(10) == ("echo", "x")
    gw.reconfigure(py2str_as_py3str=False, py3str_as_py2str=True)
    assert gw._strconfig == (False, True)
    # existing channels keep theirs, on both ends
    assert pre._strconfig == (True, False)
    pre.send("cfg")
    assert pre.receive(10) == ((False, True), (True, False))
    pre.send("x")
    assert pre.receive(10) == ("echo", "x")
    # new ones take the gateway's
    new = gw.remote_exec(_STRCONFIG_ECHO)
    assert new._strconfig == (False, True)
    assert gw.newchannel()._strconfig == (False, True)
    new.send("cfg")
    assert new.receive(10) == ((False, True), (False, True))
    new.send(["s", b"b"])
    assert new.receive(10) == (b"echo", [b"s", b"b"])
    items = queue.Queue()
    new.setcallback(items.put)
    new.send("z")
    assert items.get(timeout=10) == (b"echo", b"z")
    # a channel the remote makes, and the status dict, load so too
    ch = gw.remote_exec("""
        c = channel.gateway.newchannel()
        channel.send(c)
        c.send(("z", c._strconfig))
    """)
    c = ch.receive(10)
    assert c._strconfig == (False, True)
    assert c.receive(10) == (b"z", (False, True))
    status = gw.remote_status()
    assert b"numchannels" in vars(status)
    # code and kwargs of remote_exec are not affected
    assert gw.remote_exec("channel.send(type(channel.receive()).__name__)")
    kw = gw.remote_exec(_strconfig_kwargs, a="s")
    assert kw.receive(10) == b"str"
    # back to the default: channels made meanwhile keep theirs
    gw.reconfigure()
    assert gw._strconfig == (True, False)
    pre.send("x")
    assert pre.receive(10) == ("echo", "x")
    new.send("x")
    assert items.get(timeout=10) == (b"echo", b"x")
    for c in (pre, new):
        c.send(None)
        c.waitclose(10)


def _strconfig_kwargs(channel, a):
    channel.send(type(a).__name__)
