"""Bootstrap: bring a fresh interpreter to the point where it speaks the protocol.

Stage one is a fixed one-liner given to ``python -c``: it reads a length
line and that many bytes of stage two from the protocol's read fd and
executes them.  Stage two (written here, per gateway) applies the spec
(environment, chdir, nice, bytecode writing), then tries to import this very
package -- same ``PROTOCOL_TAG`` -- from the directory the master loaded it
from.  If that fails it writes ``S`` and reads the source of
``gateway_base.py`` (zero-install).  It answers ``1`` once it serves.  See
doc/protocol.rst.
"""
import os
import select
import time

from . import gateway_base

PKGDIR = os.path.dirname(os.path.dirname(os.path.abspath(gateway_base.__file__)))


class HostNotFound(Exception):
    """The remote interpreter could not be started or did not answer."""


def bootstrap_timeout():
    try:
        return float(os.environ.get("EXECNET_BOOTSTRAP_TIMEOUT", "60"))
    except ValueError:
        return 60.0


def stage1(rfd):
    """The ``-c`` argument: read stage two from fd ``rfd`` and run it."""
    return ("import os;r=os.fdopen(%d,'rb');exec(r.read(int(r.readline())))"
            % rfd)


_STAGE2 = '''\
import os, sys
def _execnet_boot(r, rfd, wfd):
    # our own imports must not come from the current directory; remote
    # code gets it back on sys.path below, as `python -c` has it
    cwd_entry = bool(sys.path) and sys.path[0] == ""
    if cwd_entry:
        del sys.path[0]
    env = %(env)r
    if env:
        os.environ.update(env)
    if %(dont_write_bytecode)r:
        sys.dont_write_bytecode = True
    chdir = %(chdir)r
    if chdir is not None:
        os.makedirs(chdir, exist_ok=True)
        os.chdir(chdir)
    if %(nice)r:
        os.nice(%(nice)r)
    serve = None
    pkgdir = %(pkgdir)r
    if pkgdir is not None:
        sys.path.insert(0, pkgdir)
        try:
            from execnet import gateway_base
            if getattr(gateway_base, "PROTOCOL_TAG", None) == %(tag)r:
                serve = gateway_base.serve
        except Exception:
            pass
        finally:
            try:
                sys.path.remove(pkgdir)
            except ValueError:
                pass
        if serve is None:
            for name in list(sys.modules):
                if name == "execnet" or name.startswith("execnet."):
                    del sys.modules[name]
    if serve is None:
        os.write(wfd, b"S")
        source = r.read(int(r.readline()))
        import types
        mod = types.ModuleType("execnet_gateway_base")
        sys.modules[mod.__name__] = mod
        exec(compile(source, "<execnet gateway_base>", "exec"), mod.__dict__)
        serve = mod.serve
    green = %(execmodel)r
    if green in ("gevent", "eventlet"):
        import warnings
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                __import__(green)
        except ImportError as exc:
            sys.stderr.write("execnet: execmodel " + green + ": " + str(exc) + "\\n")
            sys.exit(1)
    # subprocesses of remote code must not hold the protocol pipes open
    os.set_inheritable(rfd, False)
    os.set_inheritable(wfd, False)
    os.write(wfd, b"1")
    if cwd_entry:
        sys.path.insert(0, "")
    serve(rfd, wfd, %(id)r, %(execmodel)r)
_execnet_boot(r, %(rfd)d, %(wfd)d)
'''


def stage2(spec, rfd, wfd, execmodel, pkgdir=None):
    """Stage two's source for ``spec`` on the remote fds ``rfd``/``wfd``."""
    if pkgdir is None:
        pkgdir = PKGDIR
    nice = int(spec.nice) if spec.nice else 0
    return _STAGE2 % dict(
        env=dict(spec.env), dont_write_bytecode=bool(spec.dont_write_bytecode),
        chdir=spec.chdir, nice=nice, pkgdir=pkgdir,
        tag=gateway_base.PROTOCOL_TAG, id="%s-worker" % (spec.id,),
        execmodel=execmodel, rfd=rfd, wfd=wfd)


_source_cache = []


def gateway_base_source():
    """The source of the pure protocol module, as bytes."""
    if not _source_cache:
        path = gateway_base.__file__
        if path.endswith((".pyc", ".pyo")):
            path = path[:-1]
        with open(path, "rb") as f:
            _source_cache.append(f.read())
    return _source_cache[0]


def _length_prefixed(data):
    return b"%d\n" % len(data) + data


def handshake(io, spec, execmodel, remote_rfd, remote_wfd, timeout=None):
    """Send stage two over ``io`` and wait for the remote to serve.

    Raises HostNotFound if the remote exits or answers garbage, and
    after ``timeout`` seconds (default EXECNET_BOOTSTRAP_TIMEOUT or 60).
    """
    if timeout is None:
        timeout = bootstrap_timeout()
    deadline = time.monotonic() + timeout
    # a green local model waits cooperatively (the hub keeps running)
    wait = getattr(getattr(io, "execmodel", None), "select", select.select)
    src = stage2(spec, remote_rfd, remote_wfd, execmodel)
    try:
        io.write_all(_length_prefixed(src.encode("utf-8")))
    except OSError:
        pass  # the remote died; its answer (EOF) tells below
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            io.kill()
            raise HostNotFound("%s: no answer from the remote interpreter within "
                               "%.1f s" % (spec, timeout))
        ready, _, _ = wait([io.rfd], [], [], left)
        if not ready:
            continue
        byte = os.read(io.rfd, 1)
        if byte == b"1":
            return
        if byte == b"S":
            try:
                io.write_all(_length_prefixed(gateway_base_source()))
            except OSError:
                pass
            continue
        detail = io.describe_failure()
        if not byte:
            raise HostNotFound("%s: the remote interpreter ended during start-up%s"
                               % (spec, detail))
        io.kill()
        raise HostNotFound("%s: unexpected answer %r during start-up%s"
                           % (spec, byte, detail))
