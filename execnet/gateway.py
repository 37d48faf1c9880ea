"""The master side of a gateway: remote_exec, status, exit."""
import inspect
import linecache
import os
import textwrap
import types

from . import gateway_base
from .gateway_base import Message, TimeoutError  # noqa: F401 - re-exported


class RInfo:
    """Attributes of the remote interpreter (see Gateway._rinfo)."""

    def __init__(self, kwargs):
        self.__dict__.update(kwargs)

    def __repr__(self):
        info = ", ".join("%s=%s" % item for item in sorted(self.__dict__.items()))
        return "<RInfo %r>" % info


RemoteStatus = RInfo

_rinfo_source = """
import sys, os
channel.send(dict(
    executable=sys.executable,
    version_info=tuple(sys.version_info),
    platform=sys.platform,
    cwd=os.getcwd(),
    pid=os.getpid(),
))
"""


class Gateway(gateway_base.BaseGateway):
    """A connection to one remote interpreter."""

    _group = None

    def __init__(self, io, spec, execmodel="thread"):
        self._io = io
        self.spec = spec
        self.remoteaddress = getattr(io, "remoteaddress", None)
        super().__init__(io.rfd, io.wfd, spec.id, execmodel, _startcount=1)
        gateway_base._batch_bursts(self)
        self._initreceive()

    def __repr__(self):
        r = "receive-live" if self.hasreceiver() else "not-receiving"
        n = len(self._channelfactory.channels())
        return "<Gateway id=%r %s, %s model, %d active channels>" % (
            self.id, r, self.execmodel.backend, n)

    def hasreceiver(self):
        return self._receivethread is not None and not self._receive_done.is_set()

    def exit(self):
        """Ask the remote to terminate and stop sending to it."""
        if self._group is not None:
            self._group._unregister(self)
        try:
            self._send(Message.GATEWAY_TERMINATE)
        except (OSError, ValueError):
            pass
        self._engine.close_write()
        self._io.wfd = None  # the engine closed it: never close the number again

    def join(self, timeout=None):
        """Wait for the receiver to end and reap the remote process."""
        super().join(timeout)
        if not self.hasreceiver():
            if self._io.wait(0) is not None:
                self._io.close_fds()  # reaped and no reader left: free rfd

    def reconfigure(self, py2str_as_py3str=True, py3str_as_py2str=False):
        """Set how py2/py3 strings load, on both sides, for the channels
        made from now on (existing ones keep theirs)."""
        self._set_strconfig((py2str_as_py3str, py3str_as_py2str))
        self._send(Message.RECONFIGURE, 0, self._strconfig)

    def _rinfo(self, update=False):
        """Return an RInfo of the remote: executable, version_info,
        platform, cwd, pid (cached unless ``update``)."""
        if update or not hasattr(self, "_cache_rinfo"):
            ch = self.remote_exec(_rinfo_source)
            try:
                self._cache_rinfo = RInfo(ch.receive())
            finally:
                ch.waitclose()
        return self._cache_rinfo

    def remote_status(self):
        """Return an RInfo with numchannels, numexecuting and execmodel."""
        channel = self.newchannel()
        self._send(Message.STATUS, channel.id)
        statusdict = channel.receive()
        # the other side closes the channel after the status
        channel.waitclose()
        return RInfo(statusdict)

    def remote_init_threads(self, num=None):
        """Kept for compatibility; threads are started on demand."""
        import warnings

        warnings.warn("remote_init_threads() is a no-op", DeprecationWarning,
                      stacklevel=2)

    def remote_exec(self, source, **kwargs):
        """Run ``source`` remotely with a ``channel`` connected to the
        returned channel: a string, a module-level function (called as
        ``f(channel, **kwargs)``) or a module object."""
        call_name = None
        file_name = None
        if isinstance(source, types.ModuleType):
            file_name = inspect.getsourcefile(source)
            linecache.updatecache(file_name)
            source = inspect.getsource(source)
        elif isinstance(source, types.FunctionType):
            call_name = source.__name__
            file_name = inspect.getsourcefile(source)
            source = _source_of_function(source)
        else:
            source = textwrap.dedent(str(source))
        if not call_name and kwargs:
            raise TypeError("can't pass kwargs to non-function remote_exec")
        channel = self.newchannel()
        self._send(Message.CHANNEL_EXEC, channel.id,
                   (source, file_name, call_name, kwargs))
        return channel


def _find_non_builtin_globals(source, codeobj):
    import ast
    import builtins

    vars = dict.fromkeys(codeobj.co_varnames)
    return [
        node.id for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Name) and node.id not in vars
        and node.id not in builtins.__dict__
    ]


def _source_of_function(function):
    if function.__name__ == "<lambda>":
        raise ValueError("can't evaluate lambda functions")
    if function.__closure__:
        raise ValueError("functions with closures can't be passed")
    try:
        lines, firstline = inspect.getsourcelines(function)
    except OSError as exc:
        raise ValueError("can't find source file for %s" % (function,)) from exc
    source = textwrap.dedent("".join(lines))
    codeobj = function.__code__
    args = inspect.getfullargspec(function).args
    if not args or args[0] != "channel":
        raise ValueError("expected first function argument to be `channel`")
    used_globals = _find_non_builtin_globals(source, codeobj)
    used_globals = [name for name in used_globals
                    if name in function.__globals__ and name != function.__name__]
    if used_globals:
        raise ValueError("the use of non-builtin globals isn't supported",
                         used_globals)
    # blank lines in front: remote tracebacks then give the function's
    # line numbers in its file
    return "\n" * (firstline - 1) + source
