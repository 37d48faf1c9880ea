"""Public names and signatures match execnet 2.1 (as listed in its docs)."""
import inspect
import os
import subprocess
import sys

import execnet
from execnet import gateway, gateway_base, gateway_bootstrap, gateway_io, multi, xspec

STOCK_ALL = ['Channel', 'DataFormatError', 'DumpError', 'Gateway', 'Group',
             'HostNotFound', 'LoadError', 'MultiChannel', 'RSync',
             'RemoteError', 'TimeoutError', 'XSpec', '__version__',
             'default_group', 'dump', 'dumps', 'load', 'loads', 'makegateway',
             'set_execmodel']


def test_all_names():
    assert sorted(execnet.__all__) == sorted(STOCK_ALL)
    for name in STOCK_ALL:
        assert getattr(execnet, name) is not None
    for old in ("PopenGateway", "SshGateway", "SocketGateway", "MultiGateway"):
        assert callable(getattr(execnet, old))


def params(func):
    return list(inspect.signature(func).parameters)


def test_signatures():
    assert params(execnet.makegateway) == ["spec"]
    assert params(execnet.Group.__init__) == ["self", "xspecs", "execmodel"]
    assert params(execnet.Group.terminate) == ["self", "timeout"]
    assert params(execnet.Group.set_execmodel) == ["self", "execmodel", "remote_execmodel"]
    assert params(execnet.Gateway.remote_exec) == ["self", "source", "kwargs"]
    assert params(execnet.Gateway.reconfigure) == ["self", "py2str_as_py3str", "py3str_as_py2str"]
    assert params(execnet.Gateway._rinfo) == ["self", "update"]
    assert params(execnet.Channel.receive) == ["self", "timeout"]
    assert params(execnet.Channel.waitclose) == ["self", "timeout"]
    assert params(execnet.Channel.close) == ["self", "error"]
    assert params(execnet.Channel.setcallback) == ["self", "callback", "endmarker"]
    assert params(execnet.Channel.makefile) == ["self", "mode", "proxyclose"]
    assert params(execnet.MultiChannel.receive_each) == ["self", "withchannel"]
    assert params(execnet.MultiChannel.make_receive_queue) == ["self", "endmarker"]
    assert params(execnet.RSync.__init__) == ["self", "sourcedir", "callback", "verbose"]
    assert params(execnet.RSync.add_target)[:4] == ["self", "gateway", "destdir",
                                                    "finishedcallback"]
    assert params(execnet.RSync.send) == ["self", "raises"]
    assert params(execnet.RSync.filter) == ["self", "path"]
    assert params(execnet.RSync._report_send_file) == ["self", "gateway", "modified_rel_path"]
    assert params(execnet.loads) == ["bytestring", "py2str_as_py3str", "py3str_as_py2str"]
    assert params(execnet.load) == ["byteio", "py2str_as_py3str", "py3str_as_py2str"]


def test_exception_hierarchy():
    assert issubclass(execnet.TimeoutError, OSError)
    assert execnet.TimeoutError is not TimeoutError
    assert issubclass(execnet.HostNotFound, Exception)
    assert execnet.RemoteError("abc").formatted == "abc"
    assert str(execnet.RemoteError("abc")) == "abc"
    assert repr(execnet.RemoteError("abc")) == "RemoteError: abc"


def test_module_names_importable():
    for mod in (gateway, gateway_base, gateway_bootstrap, gateway_io, multi, xspec):
        assert mod.__name__.startswith("execnet.")
    assert gateway_base.get_execmodel("thread").backend == "thread"
    assert gateway_base.backend in ("c", "python")
    assert isinstance(execnet.default_group, multi.Group)


def test_submodules_are_attributes_after_plain_import():
    # in a fresh interpreter: `import execnet` alone, then attribute access
    code = ("import execnet, sys\n"
            "names = ['gateway', 'gateway_base', 'gateway_bootstrap', "
            "'gateway_io', 'multi', 'rsync', 'xspec']\n"
            "mods = [getattr(execnet, n) for n in names]\n"
            "assert [m.__name__ for m in mods] == ['execnet.' + n for n in names]\n"
            "assert mods[1] is sys.modules['execnet.gateway_base']\n"
            "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(execnet.__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=60, cwd=root)
    assert res.stdout == "ok\n", res.stderr


def test_star_import():
    ns = {}
    exec("from execnet import *", ns)
    assert set(STOCK_ALL) - {"__version__"} <= set(ns)
