"""Channel semantics over a real popen gateway."""
import queue
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


def test_dropped_channel_lets_the_remote_keep_sending(gw):
    import gc

    report = gw.newchannel()
    ch = gw.remote_exec("""
        import time
        report = channel.receive()
        deadline = time.monotonic() + 10
        # our peer dropped its end: its LAST_MESSAGE closes our receiving side
        while not channel._queue.is_closed() and time.monotonic() < deadline:
            time.sleep(0.005)
        try:
            channel.send("nobody listens")
            report.send(("sent", channel._queue.is_closed()))
        except Exception as exc:
            report.send(("failed", repr(exc)))
    """)
    ch.send(report)
    del ch
    gc.collect()
    gw.remote_exec("pass").waitclose(10)  # the next send carries LAST_MESSAGE
    assert report.receive(15) == ("sent", True)


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
