"""Termination: hung remotes, master death, interpreter exit, Ctrl-C."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import execnet

from conftest import OTHER_PYTHONS, default_sigint, is_zombie, pid_alive, run_python


def wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_terminate_with_hung_remotes_is_bounded():
    group = execnet.Group()
    pids = []
    for _ in range(3):
        gw = group.makegateway("popen")
        pids.append(gw._rinfo().pid)
        gw.remote_exec("while True: pass")  # CPU-bound, never ends
    gw = group.makegateway("popen")
    pids.append(gw._rinfo().pid)
    gw.remote_exec("import time; time.sleep(1000)")
    start = time.monotonic()
    group.terminate(timeout=0.5)
    elapsed = time.monotonic() - start
    assert elapsed < 3.0, elapsed
    assert len(group) == 0
    for pid in pids:
        assert not pid_alive(pid)
        assert not is_zombie(pid)  # reaped


def test_terminate_idle_gateways_is_quick(group):
    pids = [group.makegateway()._rinfo().pid for _ in range(4)]
    start = time.monotonic()
    group.terminate(timeout=10)
    assert time.monotonic() - start < 5
    assert all(not pid_alive(p) and not is_zombie(p) for p in pids)


def test_exit_then_join_reaps(group):
    gw = group.makegateway()
    pid = gw._rinfo().pid
    gw.exit()
    assert gw not in group
    gw.join(10)
    assert not gw.hasreceiver()
    assert wait_gone(pid, 10)
    with pytest.raises(OSError):
        gw.remote_exec("pass")


def test_channels_fail_when_remote_dies(gw):
    ch = gw.remote_exec("""
        import os
        channel.send(os.getpid())
        channel.send("last words")
        channel.receive()
    """)
    pid = ch.receive(10)
    assert ch.receive(10) == "last words"
    os.kill(pid, signal.SIGKILL)
    # an EOFError, as pytest-xdist expects of a crashed worker
    with pytest.raises(EOFError, match="connection lost"):
        ch.receive(10)
    with pytest.raises(OSError):
        ch.send(1)


def test_data_sent_before_death_is_received(gw):
    ch = gw.remote_exec("""
        import os
        for i in range(1000):
            channel.send(i)
        os._exit(1)
    """)
    assert [ch.receive(10) for _ in range(1000)] == list(range(1000))
    with pytest.raises(EOFError, match="connection lost"):
        ch.receive(10)


# Master-side scripts for the os._exit() tests: COUNTER, run on the
# worker, counts what arrives until the connection ends and writes the
# count to the file OUT.
EXIT_PRELUDE = r"""
import os, sys, execnet
COUNTER = (
    "n = 0\n"
    "while True:\n"
    "    try:\n"
    "        channel.receive()\n"
    "    except EOFError:\n"
    "        break\n"
    "    n += 1\n"
    "with open(%r, 'w') as f:\n"
    "    f.write(str(n))\n" % OUT)

def burst_then_os_exit():
    gw = execnet.makegateway("popen")
    ch = gw.remote_exec(COUNTER)
    for i in range(20000):
        ch.send(i)
    os._exit(0)
"""


def count_after_os_exit(tmp_path, code):
    """Run the master script ``code`` (after EXIT_PRELUDE); return what its
    worker counted."""
    out = tmp_path / "count"
    proc = run_python("OUT = %r\n" % str(out) + EXIT_PRELUDE + code,
                      env={"PYTHONWARNINGS": "ignore::DeprecationWarning"})
    assert proc.returncode == 0, proc.stderr
    # the worker writes its count when the connection ends
    deadline = time.monotonic() + 15
    while not out.exists() or not out.read_text():
        assert time.monotonic() < deadline, "the worker never reported"
        time.sleep(0.02)
    return out.read_text()


def test_master_data_sent_before_os_exit_is_received(tmp_path):
    # The master's sends may be batched too: its os._exit() writes what
    # is pending first, so the worker still gets every item.
    assert count_after_os_exit(tmp_path, "burst_then_os_exit()\n") == "20000"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_master_data_sent_before_os_exit_is_received(tmp_path):
    # A forked child that makes gateways of its own flushes them at
    # os._exit() too (the wrapper it inherited only flushes the parent's).
    code = """
first = execnet.makegateway("popen")   # the parent's os._exit wrapper
pid = os.fork()
if pid == 0:
    burst_then_os_exit()                # the child's first gateway
_, status = os.waitpid(pid, 0)
first.exit()
sys.exit(os.waitstatus_to_exitcode(status))
"""
    assert count_after_os_exit(tmp_path, code) == "20000"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_os_exit_in_a_forked_child_of_a_worker(gw):
    # os._exit() in a worker first writes what its sends left to the
    # flusher; in a forked child it must neither wait for a flusher that
    # does not exist there nor disturb the parent's stream.
    ch = gw.remote_exec("""
        import os
        for i in range(3000):
            channel.send(i)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        channel.send("done")
    """)
    got = [ch.receive(10) for _ in range(3001)]
    assert got == list(range(3000)) + ["done"]
    ch.waitclose(10)


@pytest.mark.parametrize("how", ["kill", "exit"])
def test_worker_exits_when_master_dies(how):
    code = textwrap.dedent("""
        import os, sys, signal, execnet
        gw = execnet.makegateway()
        ch = gw.remote_exec("import os; channel.send(os.getpid()); channel.receive()")
        print(ch.receive(10), flush=True)
        gw2 = execnet.makegateway()
        gw2.remote_exec("while True: pass")  # busy and never reading
        print(gw2._rinfo().pid, flush=True)
        if %r == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)
    """ % how)
    res = run_python(code)
    pids = [int(x) for x in res.stdout.split()]
    assert len(pids) == 2, res.stderr
    for pid in pids:
        assert wait_gone(pid, 15), "worker %d survived its master" % pid


SHUTDOWN_SCRIPT = """
import execnet, sys
gws = [execnet.makegateway() for _ in range(2)]
chs = [gw.remote_exec("channel.receive()") for gw in gws]
idle = execnet.Group().makegateway()
print(" ".join(str(gw._rinfo().pid) for gw in gws + [idle]), flush=True)
# exit with live gateways and channels, no terminate()
"""


def _check_clean_exit(python):
    start = time.monotonic()
    root = os.path.dirname(os.path.dirname(os.path.abspath(execnet.__file__)))
    res = subprocess.run([python, "-c", SHUTDOWN_SCRIPT], capture_output=True,
                         text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=root))
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - start < 20
    assert "can't create new thread" not in res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    for pid in map(int, res.stdout.split()):
        assert wait_gone(pid, 10)


def test_interpreter_exit_with_live_gateways():
    _check_clean_exit(sys.executable)


@pytest.mark.parametrize("version", [v for v in sorted(OTHER_PYTHONS)
                                     if v.split(".")[:2] >= ["3", "12"]])
def test_interpreter_exit_newer_pythons(version):
    _check_clean_exit(OTHER_PYTHONS[version])


def test_ctrl_c_interrupts_receive():
    code = textwrap.dedent("""
        import execnet, sys
        gw = execnet.makegateway()
        ch = gw.remote_exec("channel.receive()")
        print("ready", flush=True)
        try:
            ch.receive()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(execnet.__file__)))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=root),
                            preexec_fn=default_sigint)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.1)  # let it block inside receive(); nothing to wait on
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert "interrupted" in out, err
    assert proc.returncode == 0, err


def test_worker_shuts_down_quietly_on_sigint(makegateway):
    # the worker inherits our SIGINT disposition: make it the default one
    # (a test run started as a background job has SIGINT ignored)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        gw = makegateway()
    finally:
        signal.signal(signal.SIGINT, old)
    pid = gw._rinfo().pid
    os.kill(pid, signal.SIGINT)
    assert wait_gone(pid, 15)
    gw.join(10)
    with pytest.raises(OSError, match="connection already closed"):
        gw.remote_exec("pass")


def test_remote_exec_right_before_exit_still_runs(makegateway, tmp_path):
    # the worker's shutdown waits for a task the main thread has not even
    # picked up yet
    for i in range(5):
        marker = tmp_path / ("ran%d" % i)
        gw = makegateway()
        gw.remote_exec("open(%r, 'w').write('x')" % str(marker))
        gw.exit()
        gw.join(10)
        assert marker.exists(), i


@pytest.mark.parametrize("execmodel", ["thread", "main_thread_only"])
def test_worker_with_stuck_task_exits_after_exit(execmodel):
    group = execnet.Group(execmodel=execmodel)
    try:
        gw = group.makegateway()
        pid = gw._rinfo().pid
        gw.remote_exec("import time; time.sleep(120)")
        gw.exit()
        # the worker gives the task its grace period (5 s), then leaves
        assert wait_gone(pid, 15)
    finally:
        group.terminate(1)


def test_exit_then_terminate_leaves_other_fds_alone():
    group = execnet.Group()
    gw = group.makegateway()
    gw.exit()
    r, w = os.pipe()  # may reuse the numbers of the gateway's fds
    try:
        group.terminate(10)
        os.write(w, b"still mine")
        assert os.read(r, 100) == b"still mine"
    finally:
        os.close(r)
        os.close(w)


def test_remote_subprocesses_do_not_hold_the_protocol_pipes(group):
    gw = group.makegateway()
    gw.remote_exec("import subprocess; subprocess.Popen(['sleep', '8'], close_fds=False)"
                   ).waitclose(10)
    start = time.monotonic()
    group.terminate(timeout=1)
    assert time.monotonic() - start < 4
    assert not gw.hasreceiver()
