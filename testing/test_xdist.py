"""End-to-end: real pytest-xdist sessions running on this checkout's execnet.

Each test writes a small test suite into ``tmp_path/suite`` and runs
``sys.executable -m pytest ...`` on it as a subprocess, with
``PYTHONPATH=<repo root>`` so that xdist imports *our* execnet.  The suite's
conftest.py records, in ``tmp_path/out``:

* ``controller.json`` (controller's ``pytest_configure``): ``execnet.__file__``,
  ``__version__``, the engine (``gateway_base.backend``), pid;
* ``worker-<id>-<pid>.json`` (each worker's ``pytest_configure``): pid and its
  start time (to tell a dead pid from a reused one), ``sys.argv``, whether
  ``""`` is in ``sys.path``, the execnet modules the worker has loaded;
* ``run-<pid>.txt``: one line ``<worker_id> <nodeid>`` per test started.

Every session first checks that xdist really ran on our execnet, then what the
case is about.  Nothing here is skipped except the whole module when
pytest-xdist is not installed.
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import default_sigint

pytest.importorskip("xdist")

REPO = Path(__file__).resolve().parent.parent
SESSION_TIMEOUT = 120  # a hung session fails its test instead of the run

CONFTEST = r'''
import json
import os
import sys

import pytest

OUT = os.environ["XDIST_E2E_OUT"]
_controller = False


def _starttime(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def _execnet_modules():
    return {name: getattr(mod, "__file__", None)
            for name, mod in list(sys.modules.items())
            if mod is not None and "execnet" in name}


def pytest_configure(config):
    import execnet
    import execnet.gateway_base
    info = {
        "pid": os.getpid(),
        "starttime": _starttime(os.getpid()),
        "argv": list(sys.argv),
        "empty_in_path": "" in sys.path,
        "execnet_file": execnet.__file__,
        "execnet_version": execnet.__version__,
        "backend": getattr(execnet.gateway_base, "backend", None),
        "modules": _execnet_modules(),
    }
    if hasattr(config, "workerinput"):
        info["workerid"] = config.workerinput["workerid"]
        info["env_workerid"] = os.environ.get("PYTEST_XDIST_WORKER")
        name = "worker-%s-%d.json" % (info["workerid"], os.getpid())
    else:
        global _controller
        _controller = True
        name = "controller.json"
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(info, f)


def pytest_runtest_logreport(report):
    # controller side only: the reports as they arrived from the workers
    if not _controller:
        return
    node = getattr(report, "node", None)
    with open(os.path.join(OUT, "reports.jsonl"), "a") as f:
        f.write(json.dumps({
            "nodeid": report.nodeid, "when": report.when,
            "outcome": report.outcome,
            "worker": node.gateway.id if node is not None else None,
            "longrepr": report.longreprtext if report.failed else "",
        }) + "\n")


def pytest_xdist_newgateway(gateway):
    # controller side, in the order xdist makes the gateways
    import execnet
    rinfo = gateway._rinfo()
    with open(os.path.join(OUT, "gateways.txt"), "a") as f:
        f.write(json.dumps({
            "id": gateway.id, "spec": str(gateway.spec),
            "execmodel": gateway.spec.execmodel,
            "class_module": sys.modules[type(gateway).__module__].__file__,
            "cwd": rinfo.cwd, "executable": rinfo.executable,
            "version_info": list(rinfo.version_info)[:3],
        }) + "\n")


@pytest.fixture(autouse=True)
def _record_worker(request, worker_id):
    with open(os.path.join(OUT, "run-%d.txt" % os.getpid()), "a") as f:
        f.write("%s %s\n" % (worker_id, request.node.nodeid))
    yield
'''


# ------------------------------------------------------------------ helpers

def make_suite(tmp_path, files):
    """Write conftest.py, pytest.ini and ``files`` (name -> source)."""
    suite = tmp_path / "suite"
    out = tmp_path / "out"
    suite.mkdir()
    out.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "conftest.py").write_text(CONFTEST)
    for name, src in files.items():
        path = suite / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src))
    return suite, out


def session_env(out):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "COV_CORE_", "COVERAGE_"))}
    env["PYTHONPATH"] = str(REPO)
    env["XDIST_E2E_OUT"] = str(out)
    return env


def start(suite, out, *args):
    # plugins that have nothing to do with xdist but cost ~1.5 s of start-up
    # in the controller and every worker, where installed
    quiet = ["-p", "no:benchmark", "-p", "no:hypothesispytest"]
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *quiet, *args]
    return subprocess.Popen(
        cmd, cwd=suite, env=session_env(out), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=default_sigint)


class Result:
    def __init__(self, proc, output, out):
        self.ret = proc.returncode
        self.output = output
        self.out = out

    @property
    def text(self):
        """For assertion messages (a str is shown whole, an object cut)."""
        return "pytest exited %s; its output:\n%s" % (self.ret, self.output)


def run(tmp_path, files, *args, timeout=SESSION_TIMEOUT):
    suite, out = make_suite(tmp_path, files)
    proc = start(suite, out, *args)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = kill_session(proc, out)
        pytest.fail("pytest session did not finish in %ss:\n%s" % (timeout, output))
    finally:
        reap_workers(out)
    return Result(proc, output, out)


def kill_session(proc, out):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    output, _ = proc.communicate()
    reap_workers(out)
    return output


def read_controller(out):
    path = out / "controller.json"
    assert path.exists(), "the controller's conftest did not run"
    return json.loads(path.read_text())


def read_workers(out):
    return [json.loads(p.read_text()) for p in sorted(out.glob("worker-*.json"))]


def read_gateways(out):
    path = out / "gateways.txt"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_reports(out):
    """Test reports the controller received, {nodeid: [report, ...]}."""
    path = out / "reports.jsonl"
    reports = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rep = json.loads(line)
            reports.setdefault(rep["nodeid"], []).append(rep)
    return reports


def outcomes(out):
    """{nodeid: 'passed'|'failed'|...} from the controller's reports."""
    result = {}
    for nodeid, reps in read_reports(out).items():
        failed = [r for r in reps if r["outcome"] == "failed"]
        call = [r for r in reps if r["when"] == "call"]
        result[nodeid] = "failed" if failed else (call[0]["outcome"] if call else "?")
    return result


def read_runs(out):
    """[(worker_id, nodeid)] for every test started, in no particular order."""
    runs = []
    for p in out.glob("run-*.txt"):
        for line in p.read_text().splitlines():
            wid, nodeid = line.split(" ", 1)
            runs.append((wid, nodeid))
    return runs


def is_alive(pid, starttime):
    """The process is there, is the one recorded, and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return int(fields[19]) == starttime and fields[0] not in ("Z", "X")


def survivors(out, within=5.0):
    """Worker pids still alive after ``within`` seconds."""
    workers = read_workers(out)
    deadline = time.monotonic() + within
    while True:
        alive = [w["pid"] for w in workers if is_alive(w["pid"], w["starttime"])]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def reap_workers(out):
    """Cleanup after a failed check: kill worker processes the session left."""
    for w in read_workers(out):
        if is_alive(w["pid"], w["starttime"]):
            try:
                os.kill(w["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def expected_backend():
    return "python" if os.environ.get("EXECNET_NO_EXTENSIONS") else "c"


def check_ours(res, nworkers=None):
    """xdist ran on this checkout's execnet, in the controller and workers."""
    ctl = read_controller(res.out)
    assert ctl["execnet_version"].endswith("+native"), ctl
    assert Path(ctl["execnet_file"]).resolve().is_relative_to(REPO), ctl
    assert ctl["backend"] == expected_backend(), ctl
    workers = read_workers(res.out)
    assert workers, "no worker ran the conftest:\n%s" % res.output
    for w in workers:
        assert w["execnet_version"].endswith("+native"), w
        assert Path(w["execnet_file"]).resolve().is_relative_to(REPO), w
        # how our popen gateway starts the interpreter, as stock does
        assert w["argv"] == ["-c"], w
        assert not w["empty_in_path"], w
        assert w["env_workerid"] == w["workerid"], w
    if nworkers is not None:
        ids = sorted(w["workerid"] for w in workers)
        assert ids == ["gw%d" % i for i in range(nworkers)], ids
    return ctl, workers


def summary_counts(output):
    """{'passed': N, 'failed': M, ...} from pytest's last summary line."""
    line = [ln for ln in output.splitlines() if re.search(r" in [\d.]+s", ln)][-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", line)}


def trivial_module(n, prefix="test"):
    return "".join("def %s_%d():\n    assert %d == %d\n\n" % (prefix, i, i, i)
                   for i in range(n))


# -------------------------------------------------------------------- cases

def test_n2_pass_and_fail_counts(tmp_path):
    files = {"test_a%d.py" % k: trivial_module(20) for k in range(3)}
    files["test_bad.py"] = """
        import pytest

        def test_fail_assert():
            x = [1, 2, 3]
            assert x == [1, 2, 4]

        def test_fail_raise():
            raise ValueError("boom from the worker")

        @pytest.mark.parametrize("i", [1, 2])
        def test_fail_param(i):
            assert i == 0
    """
    res = run(tmp_path, files, "-n", "2")
    check_ours(res, nworkers=2)
    assert res.ret == 1, res.text
    assert summary_counts(res.output) == {"failed": 4, "passed": 60}, res.text
    assert "created: 2/2 workers" in res.output, res.text
    # failure reports (serialized on the worker, unserialized here) are whole
    reports = read_reports(res.out)
    got = outcomes(res.out)
    assert sorted(n for n, o in got.items() if o == "failed") == [
        "test_bad.py::test_fail_assert", "test_bad.py::test_fail_param[1]",
        "test_bad.py::test_fail_param[2]", "test_bad.py::test_fail_raise"], got
    assert sum(o == "passed" for o in got.values()) == 60, got
    longrepr = {n: r["longrepr"] for n, reps in reports.items() for r in reps
                if r["outcome"] == "failed"}
    assert "ValueError: boom from the worker" in longrepr[
        "test_bad.py::test_fail_raise"], longrepr
    assert "assert [1, 2, 3] == [1, 2, 4]" in longrepr[
        "test_bad.py::test_fail_assert"], longrepr
    assert {r["worker"] for reps in reports.values() for r in reps} == {"gw0", "gw1"}
    runs = read_runs(res.out)
    assert len(runs) == 64
    assert {w for w, _ in runs} == {"gw0", "gw1"}, "both workers got tests"


def test_worker_terminal_output_stays_out(tmp_path):
    """Only the controller's terminal report reaches the terminal.

    The workers run a whole pytest session each; with stock execnet their
    stdout (fd 1) is /dev/null, so their session headers and summaries never
    show.  Worker stderr does show (warnings), as with stock.
    """
    files = {"test_o.py": """
        import os
        import sys

        def test_prints():
            os.write(1, b"WORKER-FD1-WRITE\\n")
            print("WORKER-PRINT")
    """}
    res = run(tmp_path, files, "-n", "2", "-s", "-v")
    check_ours(res, nworkers=2)
    assert res.ret == 0, res.text
    assert res.output.count("test session starts") == 1, res.text
    assert "WORKER-FD1-WRITE" not in res.output, res.text
    assert "WORKER-PRINT" not in res.output, res.text
    assert summary_counts(res.output) == {"passed": 1}, res.text


def test_tx_2popen_dist_load(tmp_path):
    files = {"test_t.py": trivial_module(30)}
    res = run(tmp_path, files, "--tx", "2*popen", "--dist", "load", "-v")
    ctl, workers = check_ours(res, nworkers=2)
    assert res.ret == 0, res.text
    assert summary_counts(res.output) == {"passed": 30}, res.text
    # xdist made the gateways gw0 then gw1, with our Gateway class
    gws = read_gateways(res.out)
    assert [g["id"] for g in gws] == ["gw0", "gw1"], gws
    for g in gws:
        assert Path(g["class_module"]).resolve().is_relative_to(REPO), g
        assert g["execmodel"] == "main_thread_only", g
        assert Path(g["cwd"]) == tmp_path / "suite", g
        assert g["executable"] == sys.executable, g
        assert g["version_info"] == list(sys.version_info[:3]), g
    ids = [gw for gw, _ in read_runs(res.out)]
    assert len(ids) == 30 and set(ids) == {"gw0", "gw1"}, ids
    assert ctl["pid"] not in {w["pid"] for w in workers}


def test_dist_loadscope_groups_scopes(tmp_path):
    """loadscope: a module's functions run on one worker, and so do a
    class's methods (the class being a scope of its own)."""
    files = {}
    for k in range(4):
        files["test_scope%d.py" % k] = textwrap.dedent("""
            import time

        """) + "".join("def test_f%d():\n    time.sleep(0.02)\n\n" % i
                       for i in range(4)) + "class TestGroup:\n" + "".join(
            "    def test_m%d(self):\n        time.sleep(0.02)\n\n" % i
            for i in range(4))
    res = run(tmp_path, files, "-n", "2", "--dist", "loadscope")
    check_ours(res, nworkers=2)
    assert res.ret == 0, res.text
    assert summary_counts(res.output) == {"passed": 32}, res.text
    by_scope = {}
    for wid, nodeid in read_runs(res.out):
        by_scope.setdefault(nodeid.rsplit("::", 1)[0], set()).add(wid)
    assert len(by_scope) == 8, by_scope
    for scope, wids in by_scope.items():
        assert len(wids) == 1, (scope, wids)
    assert set().union(*by_scope.values()) == {"gw0", "gw1"}, by_scope


def test_dist_each_runs_everything_everywhere(tmp_path):
    files = {"test_e.py": trivial_module(10)}
    res = run(tmp_path, files, "-n", "2", "--dist", "each")
    check_ours(res, nworkers=2)
    assert res.ret == 0, res.text
    assert summary_counts(res.output) == {"passed": 20}, res.text
    runs = read_runs(res.out)
    assert sorted(runs) == sorted((w, "test_e.py::test_%d" % i)
                                  for w in ("gw0", "gw1") for i in range(10))


def test_worker_crash_is_reported_and_replaced(tmp_path):
    files = {
        "test_crash.py": """
            import os

            def test_die():
                os._exit(1)
        """,
        "test_ok.py": trivial_module(30),
    }
    res = run(tmp_path, files, "-n", "2", "--max-worker-restart=2")
    ctl, workers = check_ours(res)
    assert res.ret == 1, res.text
    m = re.search(r"worker '(gw\d)' crashed while running 'test_crash.py::test_die'",
                  res.output)
    assert m, res.text
    assert "replacing crashed worker %s" % m.group(1) in res.output, res.text
    # xdist shows "Not properly terminated" when the channel's remote error
    # is None or an EOFError, as stock execnet gives for a dead worker
    assert "[%s] node down: Not properly terminated" % m.group(1) in res.output, res.text
    got = outcomes(res.out)
    assert got.pop("test_crash.py::test_die") == "failed", got
    assert sorted(got.values()) == ["passed"] * 30, got
    assert summary_counts(res.output) == {"failed": 1, "passed": 30}, res.text
    ids = sorted(w["workerid"] for w in workers)
    assert ids == ["gw0", "gw1", "gw2"], ids  # the replacement is gw2
    passed_by = {w for w, nodeid in read_runs(res.out) if "test_ok" in nodeid}
    assert passed_by <= {"gw0", "gw1", "gw2"}
    assert survivors(res.out) == []


def test_exitfirst_stops_and_leaves_no_worker(tmp_path):
    files = {
        "test_a_fail.py": """
            def test_fails_early():
                assert 0, "early failure"
        """,
        "test_b_slow.py": "import time\n\n" + "".join("def test_slow_%d():\n    time.sleep(0.1)\n\n" % i
                      for i in range(60)),
    }
    res = run(tmp_path, files, "-n", "2", "-x")
    check_ours(res, nworkers=2)
    assert res.ret == 2, res  # xdist ends -x with Interrupted, as with stock
    counts = summary_counts(res.output)
    assert counts["failed"] == 1, res.text
    assert counts.get("passed", 0) < 60, res.text
    assert "stopping after 1 failures" in res.output, res.text
    assert survivors(res.out) == [], "worker processes left behind"


def test_ctrl_c_to_controller_ends_session_and_workers(tmp_path):
    files = {
        "test_block.py": textwrap.dedent("""
            import os
            import time

            OUT = os.environ["XDIST_E2E_OUT"]

        """) + "".join(
            "def test_block_%d():\n"
            "    open(os.path.join(OUT, 'started-%%d' %% os.getpid()), 'w').close()\n"
            "    time.sleep(60)\n\n" % i for i in range(4)),
    }
    suite, out = make_suite(tmp_path, files)
    proc = start(suite, out, "-n", "2")
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("started-*"))) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                output = kill_session(proc, out)
                pytest.fail("the blocking tests did not start:\n%s" % output)
            time.sleep(0.05)
        workers = read_workers(out)
        assert sorted(w["workerid"] for w in workers) == ["gw0", "gw1"]
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)  # the controller only
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            output = kill_session(proc, out)
            pytest.fail("controller still running 30 s after SIGINT:\n%s" % output)
        elapsed = time.monotonic() - t0
        res = Result(proc, output, out)
        check_ours(res, nworkers=2)
        assert "KeyboardInterrupt" in output, res.text
        assert proc.returncode == 2, res.text
        left = survivors(out)
        assert left == [], "workers alive after Ctrl-C (%.1fs): %s" % (elapsed, left)
    finally:
        if proc.poll() is None:
            kill_session(proc, out)
        reap_workers(out)


def test_pytest_cov_combines_worker_data(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/full.py": """
            def add(a, b):
                return a + b


            def mul(a, b):
                return a * b


            def neg(a):
                if a:
                    return -a
                return 0
        """,
        # 5 statements, the 2 in unused()'s body never run: 60%
        "pkg/part.py": """
            def used(x):
                return x + 1


            def unused(x):
                y = x * 2
                return y
        """,
        "test_cov1.py": """
            from pkg.full import add, neg

            def test_add():
                assert add(2, 3) == 5

            def test_neg():
                assert neg(4) == -4
                assert neg(0) == 0
        """,
        "test_cov2.py": """
            from pkg.full import mul
            from pkg.part import used

            def test_mul():
                assert mul(2, 3) == 6

            def test_used():
                assert used(1) == 2
        """,
    }
    res = run(tmp_path, files, "--cov=pkg", "--cov-report=term-missing",
              "-n", "2", "--dist", "loadfile")
    check_ours(res, nworkers=2)
    assert res.ret == 0, res.text
    assert summary_counts(res.output) == {"passed": 4}, res.text
    assert re.search(r"coverage: platform \w+, python", res.output), res.text
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^(pkg/\w+\.py)\s+(\d+)\s+(\d+)\s+(\d+)%", res.output, re.M)}
    assert rows.get("pkg/full.py") == ("8", "0", "100"), res.text
    assert rows.get("pkg/part.py") == ("5", "2", "60"), res.text
    assert "Failed to generate report" not in res.output, res.text
    assert "No data was collected" not in res.output, res.text
