"""Gateways over popen: remote_exec forms, info, spec keys, bootstrap."""
import os
import subprocess
import sys
import textwrap

import pytest

import execnet
from execnet import gateway_base

from conftest import run_python


def test_remote_exec_string_dedented(gw):
    ch = gw.remote_exec("""
        import sys
        channel.send((__name__, sys.argv))
    """)
    assert ch.receive(10) == ("__channelexec__", ["-c"])


def test_remote_code_imports_from_its_current_directory(makegateway, tmp_path):
    # as under `python -c`: the current directory (here the chdir=, which
    # is created if missing) comes first on sys.path for remote code
    workdir = tmp_path / "not" / "yet"
    gw = makegateway("popen//chdir=%s" % workdir)
    (workdir / "localmod_for_remote.py").write_text("VALUE = 42\n")
    ch = gw.remote_exec("""
        import os, sys
        import localmod_for_remote
        channel.send((sys.path[0], os.getcwd(), localmod_for_remote.VALUE))
    """)
    assert ch.receive(10) == ("", str(workdir), 42)


def remote_function(channel, a, b=2):
    channel.send(a + b)


def remote_function_raising(channel):
    raise ValueError("from function")


def no_channel_arg(x):
    pass


Y = 5


def uses_global(channel):
    channel.send(Y)


def test_remote_exec_function_with_kwargs(gw):
    assert gw.remote_exec(remote_function, a=40).receive(10) == 42
    assert gw.remote_exec(remote_function, a=1, b=1).receive(10) == 2


def test_remote_exec_function_traceback_has_source_line(gw):
    ch = gw.remote_exec(remote_function_raising)
    with pytest.raises(execnet.RemoteError) as excinfo:
        ch.receive(10)
    assert 'raise ValueError("from function")' in excinfo.value.formatted
    # the line number is the one in this file
    lineno = remote_function_raising.__code__.co_firstlineno + 1
    assert ', line %d, in remote_function_raising' % lineno in excinfo.value.formatted
    # one frame of ours above the remote code, as with stock
    assert excinfo.value.formatted.count("gateway_base.py") == 1


def test_remote_exec_function_checks(gw):
    with pytest.raises(ValueError, match="channel"):
        gw.remote_exec(no_channel_arg)
    with pytest.raises(ValueError, match="lambda"):
        gw.remote_exec(lambda channel: None)
    z = 1

    def closure(channel):
        return z

    with pytest.raises(ValueError, match="closure"):
        gw.remote_exec(closure)
    with pytest.raises(ValueError, match="globals"):
        gw.remote_exec(uses_global)
    with pytest.raises(TypeError, match="kwargs"):
        gw.remote_exec("pass", a=1)
    with pytest.raises(execnet.DumpError):
        gw.remote_exec(remote_function, a=object())


def test_remote_exec_module(gw, tmp_path):
    modfile = tmp_path / "remote_mod_for_test.py"
    modfile.write_text(textwrap.dedent("""
        def helper():
            return 6 * 7

        if __name__ == "__channelexec__":
            channel.send(helper())
            x = channel.receive()
            raise RuntimeError("module failed with %s" % x)
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import remote_mod_for_test as mod
    finally:
        sys.path.remove(str(tmp_path))
    ch = gw.remote_exec(mod)
    assert ch.receive(10) == 42
    ch.send("input")
    with pytest.raises(execnet.RemoteError) as excinfo:
        ch.receive(10)
    tb = excinfo.value.formatted
    # the source line appears in the remote traceback
    assert 'raise RuntimeError("module failed with %s" % x)' in tb
    assert str(modfile) in tb


def test_rinfo(gw):
    info = gw._rinfo()
    assert info.executable == sys.executable
    assert info.version_info == tuple(sys.version_info)
    assert info.platform == sys.platform
    assert info.cwd == os.getcwd()
    assert isinstance(info.pid, int) and info.pid != os.getpid()
    assert gw._rinfo() is info
    assert gw._rinfo(update=True) is not info
    assert repr(info).startswith('<RInfo "cwd=')


def test_remote_status(gw):
    status = gw.remote_status()
    assert status.numexecuting == 0
    assert status.execmodel == "thread"
    ch = gw.remote_exec("channel.receive()")
    ch.send  # noqa: B018
    import time

    deadline = time.monotonic() + 10
    while gw.remote_status().numexecuting != 1:  # the exec starts asynchronously
        assert time.monotonic() < deadline
    ch.send(None)
    ch.waitclose(10)


WHERE_AM_I = """
import threading
channel.send(threading.current_thread() is threading.main_thread())
channel.receive()
"""


def test_remote_exec_runs_on_the_idle_main_thread(gw):
    # one at a time: each runs on the worker's main thread, where remote
    # code may install signal handlers
    for _ in range(3):
        ch = gw.remote_exec("""
            import signal, threading
            old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            signal.signal(signal.SIGUSR1, old)
            channel.send(threading.current_thread() is threading.main_thread())
        """)
        assert ch.receive(10) is True
        ch.waitclose(10)


def test_remote_exec_while_the_main_thread_is_busy(gw):
    first = gw.remote_exec(WHERE_AM_I)
    assert first.receive(10) is True
    others = [gw.remote_exec(WHERE_AM_I) for _ in range(2)]
    # they run at the same time, in other threads
    assert [ch.receive(10) for ch in others] == [False, False]
    first.send(None)
    first.waitclose(10)
    # the main thread is free again: the next one gets it
    again = gw.remote_exec(WHERE_AM_I)
    assert again.receive(10) is True
    for ch in others + [again]:
        ch.send(None)
        ch.waitclose(10)


def test_our_threads_do_not_show_in_threading(makegateway):
    # as with stock execnet: code that counts threads (a test suite run by
    # pytest-xdist checking for leaked threads, say) sees only its own
    import threading

    before = threading.active_count()
    gw = makegateway()
    ch = gw.remote_exec("""
        import threading
        channel.send([t.name for t in threading.enumerate()])
        channel.receive()
    """)
    assert ch.receive(10) == ["MainThread"]
    # a second, concurrent remote_exec runs in a thread of its own
    other = gw.remote_exec("import threading; channel.send(threading.active_count())")
    assert other.receive(10) == 1
    assert gw.hasreceiver()
    assert threading.active_count() == before
    ch.send(None)
    ch.waitclose(10)
    gw.exit()
    gw.join(10)
    assert not gw.hasreceiver()


def test_gateway_attributes_and_repr(makegateway):
    gw = makegateway("popen//id=special")
    assert gw.id == "special"
    assert isinstance(gw.spec, execnet.XSpec)
    assert gw.spec.popen
    assert repr(gw).startswith("<Gateway id='special' receive-live, thread model")
    assert gw.remoteaddress == "localhost"


def test_worker_gateway_id(gw):
    assert gw.remote_exec("channel.send(channel.gateway.id)").receive(10) == gw.id + "-worker"


def test_reconfigure(gw):
    gw.reconfigure(py2str_as_py3str=False, py3str_as_py2str=False)
    ch = gw.remote_exec("channel.send('x')")
    assert ch.receive(10) == "x"


def test_chdir_env_nice(makegateway, tmp_path):
    gw = makegateway("popen//chdir=%s//env:EXECNET_T=v1//nice=3" % tmp_path)
    ch = gw.remote_exec("""
        import os
        channel.send((os.getcwd(), os.environ.get("EXECNET_T"), os.nice(0)))
    """)
    cwd, env, nice = ch.receive(10)
    assert cwd == str(tmp_path)
    assert env == "v1"
    assert nice >= 3


def test_dont_write_bytecode(makegateway, tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    gw = makegateway("popen//dont_write_bytecode")
    assert gw.remote_exec("import sys; channel.send(sys.dont_write_bytecode)").receive(10)
    gw2 = makegateway("popen")
    assert not gw2.remote_exec(
        "import sys; channel.send(sys.dont_write_bytecode)").receive(10)


def test_remote_stderr_reaches_ours_and_stdout_is_discarded(tmp_path):
    res = run_python(textwrap.dedent("""
        import execnet
        gw = execnet.makegateway()
        ch = gw.remote_exec("import sys; print('hello from remote'); "
                            "sys.stderr.write('remote stderr\\\\n'); channel.send(1)")
        assert ch.receive(10) == 1
        ch.waitclose(10)
        gw.exit()
        gw.join(10)
        print("master done")
    """))
    assert res.returncode == 0, res.stderr
    # remote stderr is ours; remote stdout is discarded (as with stock
    # execnet), and our own stdout stays ours alone
    assert "remote stderr" in res.stderr
    assert "hello from remote" not in res.stderr
    assert res.stdout == "master done\n"


def test_remote_junk_on_stdout_at_start(makegateway, tmp_path):
    # an interpreter wrapper that prints before Python starts
    wrapper = tmp_path / "noisy-python"
    wrapper.write_text("#!/bin/sh\necho 'junk at start'\nexec %s \"$@\"\n" % sys.executable)
    wrapper.chmod(0o755)
    gw = makegateway("popen//python=%s" % wrapper)
    assert gw.remote_exec("channel.send(7)").receive(10) == 7


def test_remote_crash_at_start(makegateway, tmp_path):
    wrapper = tmp_path / "crashing-python"
    wrapper.write_text("#!/bin/sh\necho 'dying' >&2\nexit 3\n")
    wrapper.chmod(0o755)
    with pytest.raises(execnet.HostNotFound, match="exit status 3"):
        makegateway("popen//python=%s" % wrapper)


def test_remote_never_answers(makegateway, tmp_path, monkeypatch):
    wrapper = tmp_path / "silent-python"
    wrapper.write_text("#!/bin/sh\nexec sleep 60\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("EXECNET_BOOTSTRAP_TIMEOUT", "0.5")
    with pytest.raises(execnet.HostNotFound, match="no answer"):
        makegateway("popen//python=%s" % wrapper)


def test_missing_interpreter(makegateway):
    with pytest.raises(execnet.HostNotFound, match="cannot start"):
        makegateway("popen//python=/nonexistent/python")


def test_zero_install_bootstrap_sends_source(makegateway, tmp_path):
    # a remote that cannot import our package gets gateway_base as source
    fake = tmp_path / "execnet"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not this one')\n")
    from execnet import gateway_bootstrap

    old = gateway_bootstrap.PKGDIR
    gateway_bootstrap.PKGDIR = str(tmp_path)
    try:
        gw = makegateway("popen")
    finally:
        gateway_bootstrap.PKGDIR = old
    ch = gw.remote_exec("""
        import sys
        channel.send(sorted(name for name in sys.modules if name.startswith("execnet")))
    """)
    assert ch.receive(10) == ["execnet_gateway_base"]
    ch = gw.remote_exec("channel.send(channel.receive() * 2)")
    ch.send([1])
    assert ch.receive(10) == [1, 1]


def test_same_interpreter_runs_our_engine(gw):
    ch = gw.remote_exec("""
        import sys
        gb = sys.modules.get("execnet.gateway_base")
        channel.send(gb.backend if gb else None)
    """)
    assert ch.receive(10) == gateway_base.backend


def test_cross_interpreter_bootstrap(makegateway, otherpython):
    gw = makegateway("popen//python=%s" % otherpython)
    info = gw._rinfo()
    assert info.version_info[:2] != sys.version_info[:2] or info.executable != sys.executable
    ch = gw.remote_exec("""
        import sys
        for x in channel:
            channel.send((x, sys.version_info[:2]))
    """)
    for obj in [1, 2 ** 70, "text", b"raw", (1.5, None), {"k": [True]}, {1, 2}]:
        ch.send(obj)
        got, ver = ch.receive(10)
        assert got == obj
    ch.close()


def test_python_dash_m_execnet():
    root = os.path.dirname(os.path.dirname(os.path.abspath(execnet.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    res = subprocess.run(
        [sys.executable, "-m", "execnet", "--tx", "popen", "--tx", "popen//id=second",
         "import os; channel.send(6 * 7)"],
        capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines == ["gw0: 42", "second: 42"]


def test_python_dash_m_execnet_remote_error():
    root = os.path.dirname(os.path.dirname(os.path.abspath(execnet.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-m", "execnet", "1/0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1
    assert "ZeroDivisionError" in res.stderr


@pytest.mark.parametrize("choice, where", [("inherit", "stdout"), ("devnull", None),
                                           ("stderr", "stderr"), (None, None)])
def test_remote_stdout_choice(choice, where):
    # by default remote print() output is discarded, as stock's is
    spec = "popen" if choice is None else "popen//stdout=%s" % choice
    res = run_python(textwrap.dedent("""
        import execnet
        gw = execnet.makegateway(%r)
        gw.remote_exec("print('remote line')").waitclose(10)
        execnet.default_group.terminate(10)
    """ % spec))
    assert res.returncode == 0, res.stderr
    assert ("remote line" in res.stdout) == (where == "stdout")
    assert ("remote line" in res.stderr) == (where == "stderr")


def test_remote_stdout_discarded_under_xdist_controller():
    # pytest-xdist's workers print whole pytest sessions; xdist expects
    # that output to vanish, as it always has
    res = run_python(textwrap.dedent("""
        import sys, types, execnet
        sys.modules["xdist.dsession"] = types.ModuleType("xdist.dsession")
        gw = execnet.makegateway()
        gw.remote_exec("print('remote line')").waitclose(10)
        execnet.default_group.terminate(10)
    """))
    assert res.returncode == 0, res.stderr
    assert "remote line" not in res.stdout + res.stderr
