"""Transports: how the master reaches a remote interpreter's protocol fds."""
import os
import shlex
import signal
import subprocess
import sys

from . import gateway_bootstrap


def popen_args(spec):
    """The interpreter command for ``spec`` (``python=`` split like a shell)."""
    python = spec.python
    if not python or python is True:
        return [sys.executable]
    return shlex.split(python)


def _remote_stdout(spec):
    """Where a popen child's stdout goes.

    ``stdout=`` in the spec (or EXECNET_REMOTE_STDOUT) chooses: ``devnull``
    (the default: remote print() output is discarded, as stock execnet has
    always done -- pytest-xdist's workers print whole sessions that way),
    ``stderr`` (our stderr: remote print() stays visible without mixing
    into our own stdout) or ``inherit`` (our stdout).
    """
    choice = spec.stdout or os.environ.get("EXECNET_REMOTE_STDOUT") or "devnull"
    if choice == "devnull":
        return subprocess.DEVNULL
    fd = 1 if choice == "inherit" else 2
    if choice not in ("stderr", "inherit"):
        raise ValueError("stdout=%s: expected stderr, inherit or devnull" % (choice,))
    try:
        os.fstat(fd)
    except OSError:
        return subprocess.DEVNULL
    return fd


class Popen2IOMaster:
    """A local subprocess with the protocol on its own pipe pair.

    The child's stdin and stdout are /dev/null (see _remote_stdout) and its
    stderr is ours; remote output never touches the protocol.
    """

    remoteaddress = "localhost"

    def __init__(self, spec, execmodel):
        self.spec = spec
        self.execmodel = execmodel  # the local one: handshake waits with it
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        args = popen_args(spec)
        if spec.dont_write_bytecode:
            args.append("-B")
        args += ["-c", gateway_bootstrap.stage1(p2c_r)]
        env = None
        if spec.env:
            env = dict(os.environ)
            env.update(spec.env)
        try:
            self.popen = execmodel.PopenPiped(
                args, stdin=subprocess.DEVNULL, stdout=_remote_stdout(spec),
                pass_fds=(p2c_r, c2p_w),
                env=env, close_fds=True)
        except OSError as exc:
            for fd in (p2c_r, p2c_w, c2p_r, c2p_w):
                os.close(fd)
            raise gateway_bootstrap.HostNotFound(
                "%s: cannot start %s: %s" % (spec, args[0], exc)) from exc
        os.close(p2c_r)
        os.close(c2p_w)
        self.rfd = c2p_r
        self.wfd = p2c_w
        self.remote_fds = (p2c_r, c2p_w)

    def write_all(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view):]

    def describe_failure(self):
        try:
            code = self.popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()
            return ""
        return " (exit status %s)" % code

    def wait(self, timeout=None):
        """Wait for the child; return its exit status or None on timeout."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def poll(self):
        return self.popen.poll()

    def kill(self):
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGKILL)
            except OSError:
                pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def close_fds(self):
        for name in ("rfd", "wfd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                try:
                    os.close(fd)
                except OSError:
                    pass


def create_io(spec, execmodel):
    """Start the transport for ``spec``; return (io, remote rfd, remote wfd)."""
    if spec.popen:
        io = Popen2IOMaster(spec, execmodel)
        return io, io.remote_fds[0], io.remote_fds[1]
    if spec.ssh:
        raise NotImplementedError("ssh gateways are not implemented yet")
    if spec.socket:
        raise NotImplementedError("socket gateways are not implemented yet")
    if spec.vagrant_ssh:
        raise NotImplementedError("vagrant_ssh gateways are not implemented yet")
    raise ValueError("no gateway type found in %r" % (spec._spec,))
