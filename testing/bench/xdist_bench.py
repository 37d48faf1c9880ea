#!/usr/bin/env python
"""pytest-xdist on stock execnet 2.1.2 vs on ours, side by side in one run.

    python testing/bench/xdist_bench.py [--reps N] [--quick] [--only a,b]
                                        [--no-profile] [--json OUT]

Two virtualenvs under ~/.cache, made from this very interpreter (same Python
version on both sides), with the same pytest and pytest-xdist versions (those
of this interpreter when it has them, else whatever stock's venv got):

* ``execnet-xdist-stock``: ``pip install execnet==2.1.2 pytest pytest-xdist``;
* ``execnet-xdist-ours``: ``pip install pytest pytest-xdist``, stock execnet
  (pulled in by xdist's dependency) uninstalled again, and a ``.pth`` file
  that puts this checkout (the repo holding this script) on ``sys.path``.

Each venv is checked before use: which execnet it imports, its version, and
for ours that the native core is the engine (``gateway_base.backend``).

Workloads (generated suites, run as ``pytest -n 2 -q -p no:cacheprovider``):

* ``trivial3000``: 3,000 trivial tests in 30 modules;
* ``sleep300``: 300 tests of ``time.sleep(0.005)`` each;
* ``fail500``: 500 failing tests, each failing 20 calls deep with biggish
  locals; run with ``-l`` (``--showlocals``) so that the locals are in the
  reports (without it pytest never looks at them);
* ``startup8``: ``-n 8`` on 8 trivial tests: worker start-up.

For each run: wall time; the controller's own CPU (user+sys), reported by a
tiny wrapper around ``runpy.run_module("pytest")`` from
``resource.getrusage(RUSAGE_SELF)`` at exit (the workers are the controller's
children, so they are not in it; execnet's threads are); the whole tree's CPU
from ``os.wait4`` on the controller (it reaps its workers); and phase times
from hooks of a conftest.py in the generated suite (controller side): start-up
until ``pytest_configure``, until xdist sets up the nodes, until every worker
is ready, until every worker has collected, until the last test report, and
the rest (node teardown, summary, exit).  Runs alternate stock, ours, stock,
ours, ...; a priming run per side (not counted) writes bytecode caches.

Profile (``trivial3000``, once per side, not counted in the timings):

* CPU profile: cProfile with ``time.thread_time`` as the timer in every
  Python thread of the controller (the main thread and the threads started
  through ``_thread.start_new_thread``, which is where execnet's receiver
  runs), so tottime is CPU time; summed by where the function lives:
  execnet (for ours also the ``_execnet`` C functions called from Python),
  xdist, pytest, pluggy, stdlib, other.  Percentages are of the profiled CPU
  and of the controller's rusage CPU in that same (profiled, so slower) run.
* wall profile of the controller's main thread (``time.perf_counter``), to
  see what bounds the wall time: gateway start-up (``setup_nodes``), waiting
  for workers (``loop_once`` blocked in ``queue.get``), handling reports, node
  teardown.

Output: tables on stdout (progress on stderr) and JSON
(``testing/bench/results/xdist.json`` by default).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_JSON = HERE / "results" / "xdist.json"
CACHE = Path("~/.cache").expanduser()
STOCK_VENV = CACHE / "execnet-xdist-stock"
OURS_VENV = CACHE / "execnet-xdist-ours"
STOCK_VERSION = "2.1.2"
SIDES = ("stock", "ours")
RUN_TIMEOUT = 600


def log(msg):
    print("[xdist-bench] %s" % msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------- venvs

def vpy(venv):
    return venv / "bin" / "python"


def site_packages(venv):
    out = subprocess.run(
        [str(vpy(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def local_version(dist):
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def venv_versions(venv):
    """{dist: version} of pytest, pytest-xdist, execnet in ``venv`` (or {})."""
    if not vpy(venv).exists():
        return {}
    code = ("import json; from importlib import metadata as m\n"
            "out = {}\n"
            "for d in ('pytest', 'pytest-xdist', 'execnet'):\n"
            "    try: out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: out[d] = None\n"
            "print(json.dumps(out))")
    res = subprocess.run([str(vpy(venv)), "-c", code], capture_output=True, text=True)
    if res.returncode:
        return {}
    return json.loads(res.stdout)


def same_python(venv):
    res = subprocess.run([str(vpy(venv)), "-c", "import sys; print(sys.version)"],
                         capture_output=True, text=True)
    return res.returncode == 0 and res.stdout.strip() == sys.version


def pip(venv, *args):
    subprocess.run([str(vpy(venv)), "-m", "pip", *args, "-q",
                    "--disable-pip-version-check"], check=True)


def make_venv(venv):
    if vpy(venv).exists() and same_python(venv):
        return
    log("creating venv %s from %s" % (venv, sys.executable))
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)


def ensure_venvs(pins):
    """Make/refresh both venvs; return {side: python path}."""
    make_venv(STOCK_VENV)
    want = {"execnet": STOCK_VERSION, **pins}
    have = venv_versions(STOCK_VENV)
    if any(have.get(d) != v for d, v in want.items() if v):
        specs = ["execnet==%s" % STOCK_VERSION] + [
            "%s==%s" % (d, v) if v else d for d, v in pins.items()]
        log("installing %s into %s" % (" ".join(specs), STOCK_VENV))
        pip(STOCK_VENV, "install", *specs)
    have = venv_versions(STOCK_VENV)
    # the same pytest/xdist on both sides, whatever stock's venv resolved to
    pins = {d: have[d] for d in pins}

    make_venv(OURS_VENV)
    have = venv_versions(OURS_VENV)
    if any(have.get(d) != v for d, v in pins.items()):
        specs = ["%s==%s" % (d, v) for d, v in pins.items()]
        log("installing %s into %s" % (" ".join(specs), OURS_VENV))
        pip(OURS_VENV, "install", *specs)
        have = venv_versions(OURS_VENV)
    if have.get("execnet"):
        log("removing stock execnet %s pulled into %s" % (have["execnet"], OURS_VENV))
        pip(OURS_VENV, "uninstall", "-y", "execnet")
    pth = site_packages(OURS_VENV) / "execnet_ours_checkout.pth"
    pth.write_text(str(REPO) + "\n")
    return {"stock": vpy(STOCK_VENV), "ours": vpy(OURS_VENV)}, pins


def verify(side, python):
    """Which execnet the side imports; raises unless it is the right one."""
    code = ("import json, execnet, execnet.gateway_base as g, pytest, xdist\n"
            "print(json.dumps({'file': execnet.__file__, 'version': execnet.__version__,"
            " 'backend': getattr(g, 'backend', None), 'pytest': pytest.__version__,"
            " 'xdist': xdist.__version__}))")
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), env=clean_env())
    if res.returncode:
        raise SystemExit("%s venv cannot import execnet/xdist:\n%s" % (side, res.stderr))
    info = json.loads(res.stdout)
    path = Path(info["file"]).resolve()
    if side == "stock":
        ok = info["version"] == STOCK_VERSION and "site-packages" in path.parts
    else:
        ok = (path.is_relative_to(REPO) and info["version"].endswith("+native")
              and info["backend"] == "c")
    log("%s: execnet %s from %s (backend %s), pytest %s, xdist %s"
        % (side, info["version"], info["file"], info["backend"], info["pytest"],
           info["xdist"]))
    if not ok:
        raise SystemExit("%s venv imports the wrong execnet: %s" % (side, info))
    info["execnet_dir"] = str(path.parent)
    return info


def clean_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "COV_CORE_", "COVERAGE_", "EXECNET_"))
           and k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHOME",
                         "PYTHONDEVMODE", "PYTHONSTARTUP")}
    return env


# -------------------------------------------------------------- workloads

PHASE_CONFTEST = r'''
import json
import os
import time

import pytest

_T = {}
_controller = False


def pytest_configure(config):
    global _controller
    if not hasattr(config, "workerinput"):
        _controller = True
        _T["configure"] = time.time()


def pytest_xdist_setupnodes(config, specs):
    _T["setupnodes"] = time.time()


def pytest_testnodeready(node):
    _T.setdefault("ready", []).append(time.time())


def pytest_xdist_node_collection_finished(node, ids):
    _T.setdefault("collected", []).append(time.time())


def pytest_runtest_logreport(report):
    if _controller:
        now = time.time()
        _T.setdefault("first_report", now)
        _T["last_report"] = now


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session):
    # around xdist's, which tears the nodes down
    _T["sessionfinish_start"] = time.time()
    try:
        return (yield)
    finally:
        _T["sessionfinish_end"] = time.time()


def pytest_unconfigure(config):
    if _controller and os.environ.get("XB_PHASES"):
        _T["unconfigure"] = time.time()
        with open(os.environ["XB_PHASES"], "w") as f:
            json.dump(_T, f)
'''

RUSAGE_WRAPPER = r'''
import atexit, json, os, resource, runpy, sys, time

def _report():
    r = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.environ["XB_RUSAGE"], "w") as f:
        json.dump({"user": r.ru_utime, "sys": r.ru_stime, "maxrss_kb": r.ru_maxrss}, f)

atexit.register(_report)
sys.argv[0] = "pytest"
sys.path[0] = os.getcwd()   # as "python -m pytest" has it
runpy.run_module("pytest", run_name="__main__", alter_sys=True)
'''

PROFILE_WRAPPER = r'''
import _thread, atexit, cProfile, os, pstats, resource, runpy, sys, threading, time

MODE = os.environ["XB_PROF_MODE"]          # "cpu": all threads; "wall": main
OUT = os.environ["XB_PROF_OUT"]
TIMER = time.thread_time if MODE == "cpu" else time.perf_counter
_profiles = []                             # (thread label, Profile, finished)

if MODE == "cpu":
    _orig_start = _thread.start_new_thread

    def _start_new_thread(func, args=(), kwargs=None):
        def run(*a, **k):
            p = cProfile.Profile(TIMER)
            entry = [getattr(func, "__qualname__", repr(func)), p, False]
            _profiles.append(entry)
            p.enable()
            try:
                return func(*a, **k)
            finally:
                p.disable()
                entry[2] = True
        return _orig_start(run, args, kwargs or {})

    _thread.start_new_thread = _start_new_thread
    threading._start_new_thread = _start_new_thread

_main = cProfile.Profile(TIMER)


def _dump():
    _main.disable()
    r = resource.getrusage(resource.RUSAGE_SELF)
    _main.dump_stats(OUT + ".main")
    threads = None
    for label, p, finished in list(_profiles):
        p.create_stats()          # a thread still running: what it has so far
        if not p.stats:
            continue
        threads = pstats.Stats(p) if threads is None else threads.add(p)
    if threads is not None:
        threads.dump_stats(OUT + ".threads")
    with open(OUT + ".rusage", "w") as f:
        f.write("%r\n" % ({"user": r.ru_utime, "sys": r.ru_stime,
                           "threads": [(l, f) for l, _, f in _profiles]},))

atexit.register(_dump)
sys.argv[0] = "pytest"
sys.path[0] = os.getcwd()
_main.enable()
runpy.run_module("pytest", run_name="__main__", alter_sys=True)
'''


def _trivial_module(n):
    return "".join("def test_%d():\n    assert %d\n\n" % (i, i + 1) for i in range(n))


def suite_trivial(n_modules, per_module):
    return {"test_triv%02d.py" % m: _trivial_module(per_module) for m in range(n_modules)}


def suite_sleep(n_modules, per_module, seconds):
    body = "import time\n\n" + "".join(
        "def test_%d():\n    time.sleep(%r)\n\n" % (i, seconds) for i in range(per_module))
    return {"test_sleep%02d.py" % m: body for m in range(n_modules)}


def suite_fail(n_modules, per_module, depth):
    head = textwrap.dedent('''\
        def descend(n, want):
            table = {"key%d" % i: "value-" * 8 + str(i) for i in range(40)}
            numbers = list(range(100))
            text = "x" * 500
            if n == 0:
                assert want == table["key1"], "mismatch at the bottom"
            return descend(n - 1, want) + len(table) + numbers[0] + len(text)


        ''')
    tests = "".join("def test_fail_%d():\n    descend(%d, 'expected-%d')\n\n" % (i, depth, i)
                    for i in range(per_module))
    return {"test_fail%02d.py" % m: head + tests for m in range(n_modules)}


def workloads(quick):
    q = quick
    return {
        "trivial3000": dict(
            label="3,000 trivial tests, -n 2",
            files=suite_trivial(10 if q else 30, 50 if q else 100),
            args=["-n", "2"]),
        "sleep300": dict(
            label="300 tests x sleep 5 ms, -n 2",
            files=suite_sleep(3 if q else 6, 20 if q else 50, 0.005),
            args=["-n", "2"]),
        "fail500": dict(
            label="500 failing tests, 20 frames deep, -l, -n 2",
            files=suite_fail(5 if q else 10, 20 if q else 50, 20),
            args=["-n", "2", "-l"]),
        "startup8": dict(
            label="8 trivial tests, -n 8 (worker start-up)",
            files=suite_trivial(1, 8),
            args=["-n", "8"]),
    }


def write_suite(root, files):
    root.mkdir(parents=True)
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "conftest.py").write_text(PHASE_CONFTEST)
    for name, src in files.items():
        (root / name).write_text(src)


# -------------------------------------------------------------------- runs

def run_session(python, suite, args, work, wrapper, extra_env=None):
    """One pytest session; returns a dict of measurements."""
    for name in ("rusage.json", "phases.json", "out.txt"):
        (work / name).unlink(missing_ok=True)
    env = clean_env()
    env["XB_RUSAGE"] = str(work / "rusage.json")
    env["XB_PHASES"] = str(work / "phases.json")
    env.update(extra_env or {})
    cmd = [str(python), str(wrapper), "-q", "-p", "no:cacheprovider", *args]
    with open(work / "out.txt", "wb") as out:
        t_spawn = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=suite, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        t_exit = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = (work / "out.txt").read_text(errors="replace")
    res = {"wall": wall, "exit": proc.returncode,
           "tree_cpu": ru.ru_utime + ru.ru_stime,
           "summary": output.strip().splitlines()[-1] if output.strip() else ""}
    try:
        r = json.loads((work / "rusage.json").read_text())
        res["ctl_cpu"] = r["user"] + r["sys"]
        res["ctl_user"], res["ctl_sys"] = r["user"], r["sys"]
        res["ctl_maxrss_mb"] = r["maxrss_kb"] / 1024
        res["workers_cpu"] = res["tree_cpu"] - res["ctl_cpu"]
    except (OSError, ValueError):
        pass
    try:
        res["phases"] = phases(json.loads((work / "phases.json").read_text()),
                               t_spawn, t_exit)
    except (OSError, ValueError, KeyError):
        pass
    if proc.returncode not in (0, 1):
        res["error"] = output[-3000:]
    return res


def phases(t, t_spawn, t_exit):
    ready = max(t["ready"])
    collected = max(t["collected"])
    last = t.get("last_report", collected)
    return {
        "python+pytest start": t["configure"] - t_spawn,
        "configure->setupnodes": t["setupnodes"] - t["configure"],
        "workers ready": ready - t["setupnodes"],
        "workers collect": collected - ready,
        "run tests": last - collected,
        "sessionfinish (teardown nodes)": t["sessionfinish_end"] - t["sessionfinish_start"],
        "rest until exit": (t_exit - last) - (t["sessionfinish_end"] - t["sessionfinish_start"]),
    }


def check_result(name, side, res, expect):
    if "error" in res or res["exit"] != expect["exit"] or expect["summary"] not in res["summary"]:
        raise SystemExit("%s/%s: unexpected result (exit %s, %r):\n%s" % (
            side, name, res["exit"], res["summary"], res.get("error", "")))


EXPECT = {
    "trivial3000": lambda q: {"exit": 0, "summary": "%d passed" % (500 if q else 3000)},
    "sleep300": lambda q: {"exit": 0, "summary": "%d passed" % (60 if q else 300)},
    "fail500": lambda q: {"exit": 1, "summary": "%d failed" % (100 if q else 500)},
    "startup8": lambda q: {"exit": 0, "summary": "8 passed"},
}


# ---------------------------------------------------------------- profile

def classify(key, execnet_dir):
    filename, _, func = key
    if filename == "~":
        if "_execnet" in func:
            return "execnet"
        return "builtins"
    path = os.path.realpath(filename)
    if path.startswith(execnet_dir + os.sep):
        return "execnet"
    if "/xdist/" in path:
        return "xdist"
    if "/_pytest/" in path or "/pytest/" in path:
        return "pytest"
    if "/pluggy/" in path:
        return "pluggy"
    if "site-packages" in path:
        return "other packages"
    if path.startswith(os.path.realpath(sys.base_prefix)) or filename.startswith("<frozen"):
        return "stdlib"
    return "other"


def summarize_stats(path, execnet_dir, top=12):
    """tottime summed by category; a builtin's time (os.read, struct, locks,
    list.append...) goes to the category of the function that called it."""
    if not Path(path).exists():
        return None
    st = pstats.Stats(str(path)).stats
    by_cat = {}
    total = 0.0
    execnet_funcs = []

    def short(key):
        if key[0] == "~":
            return key[2]
        return "%s:%d(%s)" % (os.path.relpath(os.path.realpath(key[0]),
                                              os.path.dirname(execnet_dir)), key[1], key[2])

    for key, (cc, nc, tt, ct, callers) in st.items():
        total += tt
        cat = classify(key, execnet_dir)
        if cat == "builtins" and callers:
            shares = {}
            for ckey, cval in callers.items():
                ccat = classify(ckey, execnet_dir)
                shares[ccat] = shares.get(ccat, 0.0) + cval[2]
            known = sum(shares.values())
            for ccat, t in shares.items():
                by_cat[ccat] = by_cat.get(ccat, 0.0) + t
            by_cat["builtins"] = by_cat.get("builtins", 0.0) + max(tt - known, 0.0)
            ex = shares.get("execnet", 0.0)
            if ex:
                execnet_funcs.append({"func": "%s (called from execnet)" % key[2],
                                      "tottime": ex, "cumtime": None, "calls": nc})
            continue
        by_cat[cat] = by_cat.get(cat, 0.0) + tt
        if cat == "execnet":
            execnet_funcs.append({"func": short(key), "tottime": tt, "cumtime": ct,
                                  "calls": nc})
    execnet_funcs.sort(key=lambda f: -f["tottime"])
    return {"total": total, "by_category": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "execnet_top": execnet_funcs[:top]}


def cumtime(path, matches):
    """{label: cumtime} of the functions picked by (file part, func name)."""
    st = pstats.Stats(str(path)).stats
    out = {}
    for label, (file_part, func) in matches.items():
        out[label] = sum(v[3] for k, v in st.items()
                         if k[2] == func and file_part in k[0])
    return out


WALL_POINTS = {
    "setup_nodes (start workers)": ("xdist/workermanage.py", "setup_nodes"),
    "makegateway": ("execnet", "makegateway"),
    "runtestloop": ("xdist/dsession.py", "pytest_runtestloop"),
    "loop_once": ("xdist/dsession.py", "loop_once"),
    "queue.get (waiting for workers)": ("queue.py", "get"),
    "worker_testreport (handling reports)": ("xdist/dsession.py", "worker_testreport"),
    "worker_collectionfinish": ("xdist/dsession.py", "worker_collectionfinish"),
    "teardown_nodes": ("xdist/workermanage.py", "teardown_nodes"),
    "terminal summary": ("_pytest/terminal.py", "pytest_terminal_summary"),
}


def profile_side(side, python, suite, args, work, info):
    execnet_dir = info["execnet_dir"]
    out = {}
    for mode in ("cpu", "wall"):
        prof = work / ("%s-%s.prof" % (side, mode))
        for suffix in (".main", ".threads", ".rusage"):
            Path(str(prof) + suffix).unlink(missing_ok=True)
        res = run_session(python, suite, args, work, work / "profile_wrapper.py",
                          {"XB_PROF_MODE": mode, "XB_PROF_OUT": str(prof)})
        ru = eval(Path(str(prof) + ".rusage").read_text())
        if mode == "cpu":
            main = summarize_stats(str(prof) + ".main", execnet_dir)
            threads = summarize_stats(str(prof) + ".threads", execnet_dir)
            ctl_cpu = ru["user"] + ru["sys"]
            both = {}
            for s in (main, threads):
                for cat, tt in (s or {"by_category": {}})["by_category"].items():
                    both[cat] = both.get(cat, 0.0) + tt
            profiled = sum(both.values())
            ex = both.get("execnet", 0.0)
            out["cpu"] = {
                "wall": res["wall"], "controller_cpu_rusage": ctl_cpu,
                "profiled_cpu": profiled,
                "execnet_tottime": ex,
                "execnet_share_of_profiled": ex / profiled if profiled else None,
                "execnet_share_of_controller_cpu": ex / ctl_cpu if ctl_cpu else None,
                "by_category": dict(sorted(both.items(), key=lambda kv: -kv[1])),
                "main_thread": main, "other_threads": threads,
                "threads_seen": ru["threads"],
            }
        else:
            out["wall"] = {"wall": res["wall"],
                           "main_thread_cumtime": cumtime(str(prof) + ".main", WALL_POINTS)}
    return out


# ------------------------------------------------------------------ report

def fmt(x, unit="s"):
    if x is None:
        return "-"
    return "%.2f %s" % (x, unit) if unit else "%.2f" % x


def median(samples, key):
    vals = [s[key] for s in samples if key in s]
    return statistics.median(vals) if vals else None


def print_tables(result):
    rows = [("wall", "wall time"), ("ctl_cpu", "controller CPU (user+sys)"),
            ("workers_cpu", "workers CPU"), ("tree_cpu", "total CPU (ctl+workers)")]
    print()
    print("pytest-xdist %s, pytest %s, Python %s; medians of %d runs"
          % (result["versions"]["pytest-xdist"], result["versions"]["pytest"],
             platform.python_version(), result["reps"]))
    print()
    head = "| workload | metric | stock 2.1.2 | ours | ours/stock |"
    print(head)
    print("|---|---|---:|---:|---:|")
    for name, w in result["workloads"].items():
        for key, label in rows:
            s, o = w["median"]["stock"].get(key), w["median"]["ours"].get(key)
            ratio = "%.2f" % (o / s) if s and o is not None else "-"
            print("| %s | %s | %s | %s | %s |" % (name, label, fmt(s), fmt(o), ratio))
        if name == "startup8":
            s, o = (w["median"][side].get("phases", {}).get("workers ready")
                    for side in SIDES)
            ratio = "%.2f" % (o / s) if s and o else "-"
            print("| %s | 8 workers ready (setupnodes->last ready) | %s | %s | %s |"
                  % (name, fmt(s), fmt(o), ratio))
    print()
    print("Phases (controller clock, medians, seconds): stock / ours")
    print()
    names = list(next(iter(result["workloads"].values()))["median"]["stock"]
                 .get("phases", {}).keys())
    print("| phase | " + " | ".join(result["workloads"]) + " |")
    print("|---|" + "---:|" * len(result["workloads"]))
    for ph in names:
        cells = []
        for w in result["workloads"].values():
            s = w["median"]["stock"].get("phases", {}).get(ph)
            o = w["median"]["ours"].get("phases", {}).get(ph)
            cells.append("%s / %s" % (fmt(s, ""), fmt(o, "")))
        print("| %s | %s |" % (ph, " | ".join(cells)))
    prof = result.get("profile")
    if not prof:
        return
    print()
    print("Controller CPU profile, trivial3000 (cProfile, thread CPU time, all Python threads):")
    print()
    print("| | stock 2.1.2 | ours |")
    print("|---|---:|---:|")
    for key, label in (("wall", "wall (profiled run)"),
                       ("controller_cpu_rusage", "controller CPU, rusage (profiled run)"),
                       ("profiled_cpu", "CPU seen by cProfile"),
                       ("execnet_tottime", "execnet tottime")):
        print("| %s | %s | %s |" % (label, fmt(prof["stock"]["cpu"][key]),
                                    fmt(prof["ours"]["cpu"][key])))
    for key, label in (("execnet_share_of_profiled", "execnet share of profiled CPU"),
                       ("execnet_share_of_controller_cpu", "execnet share of controller CPU")):
        print("| %s | %.1f %% | %.1f %% |" % (label, 100 * prof["stock"]["cpu"][key],
                                             100 * prof["ours"]["cpu"][key]))
    cats = []
    for side in SIDES:
        for c in prof[side]["cpu"]["by_category"]:
            if c not in cats:
                cats.append(c)
    for c in cats:
        print("| tottime in %s | %s | %s |" % (
            c, fmt(prof["stock"]["cpu"]["by_category"].get(c)),
            fmt(prof["ours"]["cpu"]["by_category"].get(c))))
    print()
    print("Controller main thread, wall clock (cProfile perf_counter), cumulative:")
    print()
    print("| | stock 2.1.2 | ours |")
    print("|---|---:|---:|")
    print("| wall (profiled run) | %s | %s |" % (fmt(prof["stock"]["wall"]["wall"]),
                                               fmt(prof["ours"]["wall"]["wall"])))
    for label in WALL_POINTS:
        print("| %s | %s | %s |" % (label,
                                    fmt(prof["stock"]["wall"]["main_thread_cumtime"][label]),
                                    fmt(prof["ours"]["wall"]["main_thread_cumtime"][label])))
    for side in SIDES:
        print()
        print("Top execnet functions by tottime (%s, all controller threads):" % side)
        funcs = []
        for part in ("main_thread", "other_threads"):
            s = prof[side]["cpu"].get(part)
            if s:
                funcs += [dict(f, thread=part) for f in s["execnet_top"]]
        funcs.sort(key=lambda f: -f["tottime"])
        for f in funcs[:10]:
            print("  %7.3f s  %8d calls  [%s] %s" % (f["tottime"], f["calls"],
                                                    f["thread"], f["func"]))


# -------------------------------------------------------------------- main

def checkout_info():
    """Which tree "ours" is; for a copy made by ``git archive`` (no .git), set
    XB_CHECKOUT_NOTE to say which commit it is."""
    info = {"root": str(REPO), "note": os.environ.get("XB_CHECKOUT_NOTE")}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "execnet", "csrc"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        info.update(git_head=head, dirty_engine_files=dirty.splitlines())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller suites, 1 rep")
    ap.add_argument("--only", help="comma-separated workloads")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    opts = ap.parse_args(argv)
    reps = 1 if opts.quick and opts.reps == 3 else opts.reps

    pins = {d: local_version(d) for d in ("pytest", "pytest-xdist")}
    pythons, pins = ensure_venvs(pins)
    infos = {side: verify(side, pythons[side]) for side in SIDES}

    wls = workloads(opts.quick)
    if opts.only:
        wls = {k: v for k, v in wls.items() if k in opts.only.split(",")}
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "executable": sys.executable,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": os.getloadavg()},
        "versions": {"pytest": pins["pytest"], "pytest-xdist": pins["pytest-xdist"],
                     "stock": infos["stock"], "ours": infos["ours"]},
        "checkout": checkout_info(),
        "reps": reps, "quick": opts.quick, "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="xdist-bench-") as tmp:
        tmp = Path(tmp)
        work = tmp / "work"
        work.mkdir()
        (work / "rusage_wrapper.py").write_text(RUSAGE_WRAPPER)
        (work / "profile_wrapper.py").write_text(PROFILE_WRAPPER)
        for name, wl in wls.items():
            suite = tmp / name
            write_suite(suite, wl["files"])
            expect = EXPECT[name](opts.quick)
            samples = {side: [] for side in SIDES}
            for side in SIDES:   # priming: bytecode caches, page cache
                res = run_session(pythons[side], suite, wl["args"], work,
                                  work / "rusage_wrapper.py")
                check_result(name, side, res, expect)
            for rep in range(reps):
                for side in SIDES:
                    res = run_session(pythons[side], suite, wl["args"], work,
                                      work / "rusage_wrapper.py")
                    check_result(name, side, res, expect)
                    samples[side].append(res)
                    log("%-12s %-5s rep %d: wall %.2fs  ctl cpu %.2fs  workers cpu %.2fs"
                        % (name, side, rep + 1, res["wall"], res.get("ctl_cpu", -1),
                           res.get("workers_cpu", -1)))
            med = {}
            for side in SIDES:
                m = {k: median(samples[side], k)
                     for k in ("wall", "ctl_cpu", "ctl_user", "ctl_sys", "workers_cpu",
                               "tree_cpu", "ctl_maxrss_mb")}
                ph = [s["phases"] for s in samples[side] if "phases" in s]
                if ph:
                    m["phases"] = {k: statistics.median(p[k] for p in ph) for k in ph[0]}
                med[side] = m
            result["workloads"][name] = {"label": wl["label"], "args": wl["args"],
                                         "median": med, "samples": samples}
        if not opts.no_profile and "trivial3000" in wls:
            wl = wls["trivial3000"]
            result["profile"] = {}
            for side in SIDES:
                log("profiling trivial3000 on %s" % side)
                result["profile"][side] = profile_side(
                    side, pythons[side], tmp / "trivial3000", wl["args"], work, infos[side])
    result["machine"]["loadavg_end"] = os.getloadavg()
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print_tables(result)
    print()
    print("load average at start %s, at end %s; JSON: %s" % (
        "/".join("%.1f" % x for x in result["machine"]["loadavg_start"]),
        "/".join("%.1f" % x for x in result["machine"]["loadavg_end"]), opts.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
