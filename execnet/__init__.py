"""execnet: distributed Python deployment and communication.

Starts Python interpreters (local subprocesses, over ssh, behind socket
servers), runs code there and talks to it over channels.  The engine is the
native core ``execnet._execnet`` where it can be loaded (``execnet.backend``
says ``"c"``), else the pure-Python protocol (``"python"``).

The names below are loaded on first use, so that a worker interpreter that
imports ``execnet.gateway_base`` does not pay for the master-side modules.
"""
from ._version import version as __version__

__all__ = [
    "Channel", "DataFormatError", "DumpError", "Gateway", "Group",
    "HostNotFound", "LoadError", "MultiChannel", "RSync", "RemoteError",
    "TimeoutError", "XSpec", "__version__", "default_group", "dump", "dumps",
    "load", "loads", "makegateway", "set_execmodel",
]

_where = {
    "Channel": "gateway_base", "DataFormatError": "gateway_base",
    "DumpError": "gateway_base", "LoadError": "gateway_base",
    "RemoteError": "gateway_base", "TimeoutError": "gateway_base",
    "dump": "gateway_base", "dumps": "gateway_base", "load": "gateway_base",
    "loads": "gateway_base", "get_execmodel": "gateway_base",
    "ExecModel": "gateway_base", "backend": "gateway_base",
    "Gateway": "gateway", "HostNotFound": "gateway_bootstrap",
    "XSpec": "xspec", "RSync": "rsync",
    "Group": "multi", "MultiChannel": "multi", "default_group": "multi",
    "makegateway": "multi", "set_execmodel": "multi",
    "MultiGateway": "multi", "PopenGateway": "multi",
    "SshGateway": "multi", "SocketGateway": "multi",
}


# submodules reachable as attributes after a plain ``import execnet``, as
# with stock execnet (which imports them all up front)
_submodules = {"gateway", "gateway_base", "gateway_bootstrap", "gateway_io",
               "multi", "rsync", "rsync_remote", "xspec"}


def __getattr__(name):
    import importlib

    if name in _submodules:
        return importlib.import_module("." + name, __name__)
    modname = _where.get(name)
    if modname is None:
        raise AttributeError("module 'execnet' has no attribute %r" % (name,))
    module = importlib.import_module("." + modname, __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_where) | _submodules)
