"""Groups of gateways and channels: Group, MultiChannel, default_group."""
import atexit
import itertools
import queue
import threading
import time
import weakref

from . import gateway_base
from .gateway_base import NO_ENDMARKER_WANTED, get_execmodel
from .xspec import XSpec

_groups = weakref.WeakSet()


class Group:
    """Gateway management: create gateways, find them by id, end them all."""

    defaultspec = "popen"

    def __init__(self, xspecs=(), execmodel="thread"):
        self._gateways = []
        self._autoidcounter = itertools.count()
        self._lock = threading.Lock()
        self._gateways_to_join = []
        self.set_execmodel(execmodel)
        for xspec in xspecs:
            self.makegateway(xspec)
        _groups.add(self)

    @property
    def execmodel(self):
        return self._execmodel

    @property
    def remote_execmodel(self):
        return self._remote_execmodel

    def set_execmodel(self, execmodel, remote_execmodel=None):
        """Set the execution model for local and (default: the same)
        remote sides; only allowed while the group has no gateways."""
        if self._gateways:
            raise ValueError("can not set execution models if gateways have "
                             "been created already")
        if remote_execmodel is None:
            remote_execmodel = execmodel
        self._execmodel = get_execmodel(execmodel)
        self._remote_execmodel = get_execmodel(remote_execmodel)

    def __repr__(self):
        return "<Group %r>" % [gw.id for gw in self._gateways]

    def __getitem__(self, key):
        if isinstance(key, int):
            return self._gateways[key]
        for gw in self._gateways:
            if gw == key or gw.id == key:
                return gw
        raise KeyError(key)

    def __contains__(self, key):
        try:
            self[key]
            return True
        except KeyError:
            return False

    def __len__(self):
        return len(self._gateways)

    def __iter__(self):
        return iter(list(self._gateways))

    def makegateway(self, spec=None):
        """Create and register a gateway for ``spec`` (an XSpec or string,
        default ``popen``) and return it.

        Keys: ``popen``, ``python=``, ``chdir=``, ``nice=``, ``env:NAME=``,
        ``dont_write_bytecode``, ``execmodel=``, ``id=``.
        """
        from . import gateway_bootstrap, gateway_io
        from .gateway import Gateway

        if not spec:
            spec = self.defaultspec
        if not isinstance(spec, XSpec):
            spec = XSpec(spec)
        self.allocate_id(spec)
        if spec.execmodel is None:
            spec.execmodel = self.remote_execmodel.backend
        else:
            get_execmodel(spec.execmodel)  # validate the name
        if spec.via:
            raise NotImplementedError("via= gateways are not implemented yet")
        io, remote_rfd, remote_wfd = gateway_io.create_io(spec, self.execmodel)
        try:
            gateway_bootstrap.handshake(io, spec, spec.execmodel,
                                        remote_rfd, remote_wfd)
        except BaseException:
            io.kill()
            io.close_fds()
            raise
        gw = Gateway(io, spec, self.execmodel)
        gw._group = self
        self._register(gw)
        return gw

    def allocate_id(self, spec):
        """Give ``spec`` the next free ``gwN`` id unless it has one."""
        if spec.id is None:
            with self._lock:
                spec.id = "gw" + str(next(self._autoidcounter))
        if spec.id in self:
            raise ValueError("duplicate gateway id %r" % (spec.id,))

    def _register(self, gateway):
        assert not hasattr(gateway, "_group") or gateway._group is self
        assert gateway.id not in [gw.id for gw in self._gateways]
        self._gateways.append(gateway)

    def _unregister(self, gateway):
        try:
            self._gateways.remove(gateway)
        except ValueError:
            pass
        self._gateways_to_join.append(gateway)

    def _cleanup_atexit(self):
        self.terminate(timeout=1.0)

    def terminate(self, timeout=None):
        """Ask every gateway to exit, wait up to ``timeout`` seconds in all,
        then kill what is left.  Every child is reaped before return."""
        gateways = list(self._gateways)
        for gw in gateways:
            gw.exit()
        gateways += [gw for gw in self._gateways_to_join if gw not in gateways]
        self._gateways_to_join = []
        deadline = None if timeout is None else time.monotonic() + timeout
        for gw in gateways:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if gw._io.wait(left) is None:
                gw._io.kill()
        for gw in gateways:
            # the child is gone: its pipe ends, so the receiver ends promptly
            # (unless a grandchild inherited the pipe: then leave the fd to
            # the receiver rather than close it under a blocked read)
            gw.join(timeout=5.0)
            if not gw.hasreceiver():
                gw._io.close_fds()

    def remote_exec(self, source, **kwargs):
        """remote_exec on every gateway; return a MultiChannel."""
        channels = []
        for gw in self:
            channels.append(gw.remote_exec(source, **kwargs))
        return MultiChannel(channels)


class MultiChannel:
    """A list of channels with operations on all of them."""

    def __init__(self, channels):
        self._channels = channels

    def __len__(self):
        return len(self._channels)

    def __iter__(self):
        return iter(self._channels)

    def __getitem__(self, key):
        return self._channels[key]

    def __contains__(self, chan):
        return chan in self._channels

    def send_each(self, item):
        for ch in self._channels:
            ch.send(item)

    def receive_each(self, withchannel=False):
        assert not hasattr(self, "_queue")
        result = []
        for ch in self._channels:
            obj = ch.receive()
            result.append((ch, obj) if withchannel else obj)
        return result

    def make_receive_queue(self, endmarker=NO_ENDMARKER_WANTED):
        """A queue.Queue (the execmodel's queue under gevent/eventlet) that
        gets ``(channel, item)`` for every item of every channel (and
        ``(channel, endmarker)`` at each close)."""
        try:
            return self._queue
        except AttributeError:
            if self._channels:
                q = self._channels[0].gateway.execmodel.Queue()
            else:
                q = queue.Queue()
            self._queue = q
            for ch in self._channels:
                def putreceived(obj, channel=ch):
                    q.put((channel, obj))

                if endmarker is NO_ENDMARKER_WANTED:
                    ch.setcallback(putreceived)
                else:
                    ch.setcallback(putreceived, endmarker=endmarker)
            return q

    def waitclose(self):
        first = None
        for ch in self._channels:
            try:
                ch.waitclose()
            except ch.RemoteError as exc:
                if first is None:
                    first = exc
        if first:
            raise first


default_group = Group()
makegateway = default_group.makegateway
set_execmodel = default_group.set_execmodel


@atexit.register
def _cleanup_groups():
    for group in list(_groups):
        group._cleanup_atexit()


# py.execnet 1.0 names


def PopenGateway(python=None):
    """A popen gateway in the default group (``python``: the interpreter)."""
    spec = "popen" if not python else "popen//python=%s" % python
    return default_group.makegateway(spec)


def SshGateway(sshaddress, remotepython=None, ssh_config=None):
    spec = "ssh=%s" % sshaddress
    if remotepython:
        spec += "//python=%s" % remotepython
    if ssh_config:
        spec += "//ssh_config=%s" % ssh_config
    return default_group.makegateway(spec)


def SocketGateway(host, port):
    return default_group.makegateway("socket=%s:%s" % (host, port))


class MultiGateway:
    """py.execnet 1.0: a list of gateways with remote_exec to all."""

    def __init__(self, gateways):
        self.gateways = list(gateways)

    def remote_exec(self, source, **kwargs):
        return MultiChannel([gw.remote_exec(source, **kwargs)
                             for gw in self.gateways])

    def exit(self):
        for gw in self.gateways:
            gw.exit()
