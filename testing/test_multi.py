"""Group, MultiChannel, default group and the py.execnet 1.0 names."""
import queue

import pytest

import execnet
from execnet import multi


def test_ids_in_order_and_never_reused(group):
    gws = [group.makegateway() for _ in range(3)]
    assert [gw.id for gw in gws] == ["gw0", "gw1", "gw2"]
    gws[1].exit()
    assert group.makegateway().id == "gw3"
    spec = execnet.XSpec("popen")
    group.allocate_id(spec)
    assert spec.id == "gw4"
    group.allocate_id(spec)
    assert spec.id == "gw4"
    assert group.makegateway().id == "gw5"


def test_getitem_contains_len_iter(group):
    a = group.makegateway("popen//id=a")
    b = group.makegateway()
    assert group["a"] is a and group[0] is a and group[-1] is b
    assert group[b] is b
    assert "a" in group and b in group and "zz" not in group
    assert len(group) == 2 and list(group) == [a, b]
    with pytest.raises(KeyError):
        group["zz"]
    with pytest.raises(IndexError):
        group[5]
    assert repr(group) == "<Group ['a', 'gw0']>"


def test_duplicate_id_refused(group):
    group.makegateway("popen//id=x")
    with pytest.raises((ValueError, AssertionError)):
        group.makegateway("popen//id=x")


def test_group_remote_exec_multichannel(group):
    for _ in range(3):
        group.makegateway()
    mch = group.remote_exec("channel.send(channel.gateway.id)")
    assert isinstance(mch, execnet.MultiChannel)
    assert len(mch) == 3
    assert mch.receive_each() == ["gw0-worker", "gw1-worker", "gw2-worker"]
    mch.waitclose()
    mch = group.remote_exec("channel.send(channel.receive() + 1)")
    mch.send_each(41)
    pairs = mch.receive_each(withchannel=True)
    assert [obj for ch, obj in pairs] == [42, 42, 42]
    assert all(ch in mch for ch, _ in pairs)


def test_make_receive_queue(group):
    for _ in range(2):
        group.makegateway()
    mch = group.remote_exec("channel.send(1); channel.send(2)")
    q = mch.make_receive_queue(endmarker="end")
    got = {}
    for _ in range(6):
        ch, item = q.get(timeout=10)
        got.setdefault(ch.gateway.id, []).append(item)
    assert got == {"gw0": [1, 2, "end"], "gw1": [1, 2, "end"]}
    assert mch.make_receive_queue() is q


def test_multichannel_waitclose_raises_first_error(group):
    group.makegateway()
    group.makegateway()
    mch = group.remote_exec("raise ValueError(channel.gateway.id)")
    with pytest.raises(execnet.RemoteError, match="gw0-worker"):
        mch.waitclose()


def test_main_thread_only_execmodel():
    group = execnet.Group(execmodel="main_thread_only")
    try:
        gw = group.makegateway()
        assert gw.execmodel.backend == "main_thread_only"
        ch = gw.remote_exec("""
            import threading
            channel.send((threading.current_thread() is threading.main_thread(),
                          channel.gateway.execmodel.backend))
        """)
        assert ch.receive(10) == (True, "main_thread_only")
        ch.waitclose(10)
        # a remote_exec while another runs fails at once, as with stock
        # execnet (waiting could deadlock: the first may wait for it)
        ch1 = gw.remote_exec("channel.send(channel.receive())")
        ch2 = gw.remote_exec("channel.send('second')")
        with pytest.raises(execnet.RemoteError, match="concurrent remote_exec "
                           "would cause deadlock for main_thread_only"):
            ch2.receive(10)
        ch1.send("first")
        assert ch1.receive(10) == "first"
        ch1.waitclose(10)
        # the main thread is free again once the first has closed
        ch3 = gw.remote_exec("channel.send('third')")
        assert ch3.receive(10) == "third"
    finally:
        group.terminate(10)


def test_set_execmodel_rules(group):
    group.set_execmodel("main_thread_only", "thread")
    assert group.execmodel.backend == "main_thread_only"
    assert group.remote_execmodel.backend == "thread"
    group.makegateway()
    with pytest.raises(ValueError):
        group.set_execmodel("thread")
    with pytest.raises(ValueError):
        execnet.Group(execmodel="nonsense")


def test_default_group_and_makegateway():
    assert isinstance(execnet.default_group, execnet.Group)
    gw = execnet.makegateway()
    try:
        assert gw in execnet.default_group
        assert gw.remote_exec("channel.send(1)").receive(10) == 1
    finally:
        execnet.default_group.terminate(10)
    assert len(execnet.default_group) == 0


def test_py_execnet_names():
    gw = execnet.PopenGateway()
    try:
        assert gw.remote_exec("channel.send(2)").receive(10) == 2
        mg = execnet.MultiGateway([gw])
        mch = mg.remote_exec("channel.send(3)")
        assert mch.receive_each() == [3]
        ch = gw.remote_exec("channel.receive()")
        ch.send(None)
        ch.waitclose(10)
        mg.exit()
        gw.join(10)
    finally:
        execnet.default_group.terminate(10)


def test_multichannel_make_receive_queue_is_a_queue(group):
    group.makegateway()
    mch = group.remote_exec("pass")
    assert isinstance(mch.make_receive_queue(), queue.Queue)


def test_groups_registered_for_atexit():
    g = execnet.Group()
    assert g in multi._groups
