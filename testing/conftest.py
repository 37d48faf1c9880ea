import os
import shutil
import signal
import subprocess
import sys

import pytest

import execnet
from execnet import gateway_base

# a hung remote or a broken bootstrap must fail a test, not stall the run
os.environ.setdefault("EXECNET_BOOTSTRAP_TIMEOUT", "30")


def pytest_report_header(config):
    return "execnet engine: %s (%s)" % (gateway_base.backend, execnet.__file__)


def pytest_configure(config):
    # once test_execmodels.py has imported eventlet, it warns at every fork()
    # in this process, whichever test forks
    config.addinivalue_line(
        "filterwarnings", "ignore:Using fork\\(\\) is a bad idea:DeprecationWarning")


@pytest.fixture
def group():
    g = execnet.Group()
    yield g
    g.terminate(timeout=10)


@pytest.fixture
def makegateway(group):
    return group.makegateway


@pytest.fixture
def gw(group):
    return group.makegateway("popen")


def _other_pythons():
    """Interpreters of other versions on this machine (pyenv), 3.8+."""
    found = {}
    root = os.path.expanduser("~/.pyenv/versions")
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            exe = os.path.join(root, name, "bin", "python")
            parts = name.split(".")
            if (os.path.exists(exe) and parts[0] == "3" and len(parts) > 1
                    and parts[1].isdigit() and int(parts[1]) >= 8
                    and not os.path.samefile(exe, sys.executable)):
                found[name] = exe
    for name in ("python3.8", "python3.9", "python3.10", "python3.12", "python3.13"):
        exe = shutil.which(name)
        if exe and "shims" not in exe and not os.path.samefile(exe, sys.executable):
            found.setdefault(name, exe)
    return found


OTHER_PYTHONS = _other_pythons()


@pytest.fixture(params=sorted(OTHER_PYTHONS) or [None])
def otherpython(request):
    if request.param is None:
        pytest.skip("no second Python interpreter on this machine")
    return OTHER_PYTHONS[request.param]


def default_sigint():
    """For preexec_fn: SIGINT as by default in the child.  A test run started
    from a shell that ignores SIGINT (a background job, say) would pass
    SIG_IGN on, and Python would then not install its KeyboardInterrupt
    handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_python(code, timeout=60, env=None, **kw):
    """Run ``code`` in a fresh interpreter with this checkout importable."""
    e = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(execnet.__file__)))
    e["PYTHONPATH"] = root + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=timeout, env=e, **kw)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as dead for "no orphans", but is reported by is_zombie
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def is_zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False
