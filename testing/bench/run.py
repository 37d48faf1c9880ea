#!/usr/bin/env python
"""Benchmark ours (this checkout) against stock execnet 2.1.2, side by side.

    python testing/bench/run.py [--quick] [--json OUT.json] [--only NAME,...]
                                [--engine c|python] [--reps N] [--timeout S]
                                [--venv DIR] [--md FILE] [--list]

Stock execnet is used strictly as a black box through its public API: it is
installed from PyPI into a virtualenv (default ``~/.cache/execnet-stock-venv``,
the same one ``testing/make_golden.py`` uses) made from this very interpreter,
so both sides run the same Python version.

Every workload runs in a fresh child process per side and repetition,
interleaved stock, ours, stock, ours, ...; the table shows the median over the
repetitions.  The children (``workloads.py``) print one JSON result line.

* stock: ``<venv>/bin/python -I workloads.py ...`` from a temporary cwd, no
  PYTHONPATH, so this checkout cannot be imported.
* ours: ``sys.executable workloads.py ...`` with ``PYTHONPATH=<repo root>``
  (the native core is built in place as ``execnet/_execnet*.so``); with
  ``--engine python`` ``EXECNET_NO_EXTENSIONS=1`` is set so the pure engine
  is measured.

``PYTHONDONTWRITEBYTECODE`` is removed from the children's environment (it is
exported in this environment and would make every child recompile what it
imports); a priming run per side writes the bytecode caches first.

Each child has a deadline: a stuck child gets a faulthandler stack dump, then
is killed together with its process group and descendants, and the workload
is reported as "timeout" (or "failed" with the traceback tail).

For the ping-pong and bulk rows a third column gives the hardware's own
figure: ``ceiling.c`` (compiled with ``cc`` at the start of the run) does the
same traffic over the same kind of pipes in plain C, interleaved with the two
sides, and the last column says what share of it ours reaches.

Output: a table on stdout (progress on stderr), JSON (default
``testing/bench/results/latest.json``) and, for a full run of all workloads,
the markdown snippet ``testing/bench/LATEST.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHILD = HERE / "workloads.py"
DEFAULT_VENV = Path("~/.cache/execnet-stock-venv").expanduser()
DEFAULT_JSON = HERE / "results" / "latest.json"
DEFAULT_MD = HERE / "LATEST.md"
STOCK_VERSION = "2.1.2"

# --------------------------------------------------------------- workloads
#
# Each entry: name -> (child workload, full params, quick params, rows).
# A row is (result key, label, unit, kind) where kind is
#   "time"  lower is better, ratio shown as stock/ours "x faster"
#   "rate"  higher is better, ratio shown as ours/stock "x faster"
#   "size"  lower is better, ratio shown as ours/stock "x of stock"
#   "count" plain numbers, no ratio

STREAM_FULL = {"n0": 2000, "nmax": 5_000_000, "target": 0.75, "recv_timeout": 60}
STREAM_QUICK = {"n0": 1000, "nmax": 1_000_000, "target": 0.12, "recv_timeout": 20}
BULK_FULL = {"size": 1 << 20, "n0": 4, "nmax": 8000, "target": 0.75, "recv_timeout": 60}
BULK_QUICK = {"size": 1 << 20, "n0": 4, "nmax": 64, "target": 0.12, "recv_timeout": 20}
REPORT_FULL = {"n0": 500, "nmax": 2_000_000, "target": 0.75, "recv_timeout": 60}
REPORT_QUICK = {"n0": 300, "nmax": 500_000, "target": 0.12, "recv_timeout": 20}


def _stream_spec(direction, mode, kind):
    p = {"direction": direction, "mode": mode, "kind": kind}
    arrow = "remote->local" if direction == "r2l" else "local->remote"
    who = "local" if direction == "r2l" else "remote"
    how = "receive()" if mode == "recv" else "setcallback()"
    what = "int" if kind == "int" else "tuple (i, 'abc', 1.5)"
    label = "%s %s, %s %s" % (arrow, what, who, how)
    return ("stream", {**STREAM_FULL, **p}, {**STREAM_QUICK, **p},
            [("msgs_per_s", label, "msg/s", "rate")])


WORKLOADS = {
    "startup": ("startup", {"n": 10}, {"n": 3}, [
        ("startup_ms", "popen startup: makegateway -> first remote_exec receive", "ms", "time"),
        ("terminate1_ms", "terminate a 1-gateway Group", "ms", "time"),
    ]),
    "startup_bare": ("startup", {"n": 10}, {"n": 3}, [
        ("startup_ms", "popen startup, ours from a bare venv (same interpreter floor as stock)", "ms", "time"),
    ]),
    "remote_exec": ("remote_exec",
                    {"warmup": 30, "n": 3000, "budget": 1.0},
                    {"warmup": 10, "n": 300, "budget": 0.2}, [
        ("remote_exec_us", "remote_exec('channel.send(1)').receive() latency, median", "µs", "time"),
    ]),
    "pingpong": ("pingpong",
                 {"warmup": 1000, "n": 20000},
                 {"warmup": 200, "n": 2000}, [
        ("rt_median_us", "ping-pong small int round trip, median", "µs", "time"),
        ("rt_p99_us", "ping-pong small int round trip, p99", "µs", "time"),
        ("maxrss_mib", "peak RSS of master (ping-pong child)", "MiB", "size"),
        ("remote_maxrss_mib", "peak RSS of remote (ping-pong)", "MiB", "size"),
        ("local_py_threads_per_gw", "threads per gateway, master, threading.active_count()", "", "count"),
        ("local_os_threads_per_gw", "threads per gateway, master, OS (/proc Threads)", "", "count"),
        ("remote_py_threads", "threads in remote, threading.active_count()", "", "count"),
        ("remote_os_threads", "threads in remote, OS (/proc Threads)", "", "count"),
    ]),
    "r2l_int_recv": _stream_spec("r2l", "recv", "int"),
    "r2l_int_cb": _stream_spec("r2l", "callback", "int"),
    "l2r_int_recv": _stream_spec("l2r", "recv", "int"),
    "l2r_int_cb": _stream_spec("l2r", "callback", "int"),
    "r2l_tuple_recv": _stream_spec("r2l", "recv", "tuple"),
    "r2l_tuple_cb": _stream_spec("r2l", "callback", "tuple"),
    "l2r_tuple_recv": _stream_spec("l2r", "recv", "tuple"),
    "l2r_tuple_cb": _stream_spec("l2r", "callback", "tuple"),
    "bulk_r2l": ("bulk", {**BULK_FULL, "direction": "r2l"}, {**BULK_QUICK, "direction": "r2l"}, [
        ("MB_per_s", "bulk 1 MiB bytes, remote->local", "MB/s", "rate"),
    ]),
    "bulk_l2r": ("bulk", {**BULK_FULL, "direction": "l2r"}, {**BULK_QUICK, "direction": "l2r"}, [
        ("MB_per_s", "bulk 1 MiB bytes, local->remote", "MB/s", "rate"),
    ]),
    "report_640": ("reports", {**REPORT_FULL, "target_bytes": 640},
                   {**REPORT_QUICK, "target_bytes": 640}, [
        ("msgs_per_s", "xdist-like report dict, 640 B, remote->local receive()", "msg/s", "rate"),
    ]),
    "report_4700": ("reports", {**REPORT_FULL, "target_bytes": 4700},
                    {**REPORT_QUICK, "target_bytes": 4700}, [
        ("msgs_per_s", "xdist-like report dict, 4.7 KB, remote->local receive()", "msg/s", "rate"),
    ]),
    "group8": ("group8", {"k": 8}, {"k": 8}, [
        ("create_ms", "Group of 8: 8x makegateway + one remote_exec each", "ms", "time"),
        ("terminate_ms", "Group of 8: terminate(timeout=10)", "ms", "time"),
    ]),
    "group8_bare": ("group8", {"k": 8}, {"k": 8}, [
        ("create_ms", "Group of 8 create, ours from a bare venv (same floor as stock)", "ms", "time"),
    ]),
}

# The hardware's own figure for some rows: ceiling.c does the same traffic
# over the same kind of pipes in plain C (no interpreter, no protocol), and
# runs interleaved with the two sides.  name -> (full args, quick args).
CEILING = {
    "pingpong": (["pingpong", "20000"], ["pingpong", "2000"]),
    "bulk_r2l": (["bulk", str(1 << 20), "0.75"], ["bulk", str(1 << 20), "0.12"]),
    "bulk_l2r": (["bulk", str(1 << 20), "0.75"], ["bulk", str(1 << 20), "0.12"]),
}
CEILING_SRC = HERE / "ceiling.c"

# Workloads whose "ours" side runs from a bare venv (made from sys.executable
# with no packages) instead of sys.executable.  Startup is dominated by the
# interpreter's own start, and sys.executable's site-packages may hold .pth
# files (here: one that imports certifi, ~45 ms) that the stock venv does not
# see; these rows compare the libraries on an equal interpreter floor.
BARE_WORKLOADS = {"startup_bare", "group8_bare"}
DEFAULT_BARE_VENV = Path("~/.cache/execnet-bare-venv").expanduser()


def log(msg):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# ------------------------------------------------------------------- venv

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_bare_venv(venv: Path, base: str) -> Path:
    """A venv without pip or packages, made from ``base``; recreated when it
    belongs to another interpreter version."""
    py = venv_python(venv)
    want = subprocess.run([base, "-c", "import sys; print(sys.version)"],
                          capture_output=True, text=True).stdout
    if py.exists():
        got = subprocess.run([str(py), "-c", "import sys; print(sys.version)"],
                             capture_output=True, text=True).stdout
        if got == want:
            return py
    log("creating bare venv %s" % venv)
    subprocess.run([base, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
    return py


def stock_version(py: Path) -> str | None:
    if not py.exists():
        return None
    r = subprocess.run(
        [str(py), "-I", "-c",
         "import importlib.metadata as m; print(m.version('execnet'))"],
        capture_output=True, text=True, cwd=tempfile.gettempdir())
    return r.stdout.strip() if r.returncode == 0 else None


def ensure_venv(venv: Path) -> Path:
    py = venv_python(venv)
    if stock_version(py) == STOCK_VERSION:
        return py
    if not py.exists():
        log("creating venv %s" % venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log("installing execnet==%s into %s" % (STOCK_VERSION, venv))
    subprocess.run([str(py), "-m", "pip", "install", "-q",
                    "execnet==%s" % STOCK_VERSION], check=True)
    got = stock_version(py)
    if got != STOCK_VERSION:
        raise SystemExit("could not get execnet %s into %s (got %s)"
                         % (STOCK_VERSION, venv, got))
    return py


# --------------------------------------------------------------- children

def base_env():
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for k in list(env):
        if k.startswith("EXECNET_") or k in ("PYTHONPATH", "PYTHONHOME",
                                             "PYTHONSTARTUP", "PYTHONINSPECT"):
            del env[k]
    return env


class Side:
    def __init__(self, name, argv, env):
        self.name = name
        self.argv = argv  # interpreter + flags
        self.env = env


def make_sides(stock_py: Path, engine: str, ours_python: str):
    stock = Side("stock", [str(stock_py), "-I"], base_env())
    return stock, ours_side(engine, ours_python)


def ours_side(engine: str, python: str):
    env = base_env()
    env["PYTHONPATH"] = str(REPO)
    if engine == "python":
        env["EXECNET_NO_EXTENSIONS"] = "1"
    return Side("ours", [python], env)


def descendants(pid):
    """pids of all live descendants of pid (scanned from /proc)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, ()):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc):
    pids = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session
    except OSError:
        pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def run_child(side: Side, workload: str, params: dict, timeout: float, cwd: str):
    """Run one workload child; return a dict with status/result/stderr."""
    params = dict(params, deadline=max(1.0, timeout - min(5.0, 0.2 * timeout)),
                  teardown_deadline=min(15.0, max(2.0, 0.5 * timeout)))
    cmd = side.argv + [str(CHILD), workload, json.dumps(params)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=cwd, env=side.env,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_tree(proc)
        out, err = proc.communicate()
    else:
        # reap anything the child left behind (stray gateway processes)
        leftovers = descendants(proc.pid)
        for p in leftovers:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    wall = time.perf_counter() - t0
    info = None
    for line in out.splitlines():
        if line.startswith("BENCH-RESULT "):
            try:
                info = json.loads(line[len("BENCH-RESULT "):])
            except ValueError:
                pass
    rec = {"wall_s": round(wall, 3), "rc": proc.returncode}
    if info is not None:
        rec["status"] = "ok"
        rec["info"] = {k: v for k, v in info.items() if k != "result"}
        rec["result"] = info["result"]
        if timed_out or proc.returncode != 0 or "teardown-done" not in err:
            rec["note"] = ("measured, but teardown %s (rc=%s)"
                           % ("timed out" if timed_out else "failed", proc.returncode))
            rec["stderr_tail"] = tail(err)
    else:
        rec["status"] = "timeout" if (timed_out or "Timeout (0:" in err) else "failed"
        rec["stderr_tail"] = tail(err)
    return rec


def build_ceiling(cwd):
    """Compile ceiling.c; its path, or None (the column then stays empty)."""
    exe = os.path.join(cwd, "ceiling")
    cc = os.environ.get("CC", "cc")
    r = subprocess.run([cc, "-O2", "-o", exe, str(CEILING_SRC)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        log("no hardware column: %s could not build ceiling.c:\n%s"
            % (cc, r.stderr.strip()))
        return None
    return exe


def run_ceiling(exe, args, timeout):
    t0 = time.perf_counter()
    try:
        r = subprocess.run([exe] + args, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": timeout}
    rec = {"wall_s": round(time.perf_counter() - t0, 3), "rc": r.returncode}
    try:
        rec["result"] = json.loads(r.stdout)
        rec["status"] = "ok" if r.returncode == 0 else "failed"
    except ValueError:
        rec["status"] = "failed"
        rec["stderr_tail"] = tail(r.stderr)
    return rec


def tail(text, lines=40):
    ls = text.strip().splitlines()
    return "\n".join(ls[-lines:])


def interp_floor(side: Side, cwd: str, n=5):
    """Median wall time of `python -c pass` for the side's interpreter, as
    the popen child would start it (same environment, no extra flags)."""
    py = side.argv[0]
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([py, "-c", "pass"], cwd=cwd, env=side.env, check=False)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


# ----------------------------------------------------------------- report

def median_result(runs):
    ok = [r["result"] for r in runs if r.get("status") == "ok"]
    if not ok:
        return None
    keys = [k for k, v in ok[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median([r[k] for r in ok if isinstance(r.get(k), (int, float))])
            for k in keys}


def fmt_num(v, unit):
    if v is None:
        return "—"
    if unit in ("msg/s",):
        if v >= 1e6:
            return "%.2f M" % (v / 1e6)
        if v >= 1e3:
            return "%.1f k" % (v / 1e3)
        return "%.0f" % v
    if unit == "":
        return "%g" % v
    if abs(v) >= 100:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    return "%.2f" % v


def share_text(o, c, kind):
    """ours as a share of the hardware's figure (100% = the ceiling)."""
    if o is None or c is None or kind not in ("time", "rate") or not o or not c:
        return ""
    return "%.0f%%" % (100 * (c / o if kind == "time" else o / c))


def ratio_text(s, o, kind):
    if s is None or o is None or kind == "count":
        return ""
    if kind == "size":
        return "%.2fx of stock" % (o / s) if s else ""
    if kind == "time":
        f = s / o if o else float("inf")
    else:
        f = o / s if s else float("inf")
    if f >= 1:
        return "%.2fx faster" % f
    return "%.2fx slower" % (1 / f) if f > 0 else "—"


def side_cell(wl, side, key, unit):
    med = wl[side]["median"]
    if med is None:
        st = {r.get("status") for r in wl[side]["runs"]}
        return "TIMEOUT" if "timeout" in st else "FAILED"
    v = med.get(key)
    return (fmt_num(v, unit) + (" " + unit if unit and v is not None else "")).strip()


def build_rows(results):
    rows = []
    for name, wl in results.items():
        for key, label, unit, kind in WORKLOADS[name][3]:
            sm, om = wl["stock"]["median"], wl["ours"]["median"]
            s = sm.get(key) if sm else None
            o = om.get(key) if om else None
            cm = wl.get("ceiling", {}).get("median")
            c = cm.get(key) if cm else None
            rows.append({
                "workload": name, "metric": key, "label": label, "unit": unit,
                "kind": kind, "stock": s, "ours": o,
                "stock_cell": side_cell(wl, "stock", key, unit),
                "ours_cell": side_cell(wl, "ours", key, unit),
                "ratio": ratio_text(s, o, kind),
                "ceiling": c,
                "ceiling_cell": ((fmt_num(c, unit) + " " + unit).strip()
                                 if c is not None else ""),
                "of_ceiling": share_text(o, c, kind),
            })
    return rows


TABLE_HEADER = ("workload", "stock", "ours", "ours vs stock", "hardware (C)",
                "ours of hardware")


def table_cells(r):
    return (r["label"], r["stock_cell"], r["ours_cell"], r["ratio"],
            r["ceiling_cell"], r["of_ceiling"])


def text_table(rows):
    hdr = TABLE_HEADER
    data = [table_cells(r) for r in rows]
    w = [max(len(x[i]) for x in [hdr] + data) for i in range(len(hdr))]
    out = []
    line = "  ".join(h.ljust(w[i]) if i == 0 else h.rjust(w[i]) for i, h in enumerate(hdr))
    out.append(line)
    out.append("-" * len(line))
    for d in data:
        out.append("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(d)))
    return "\n".join(out)


def md_table(rows):
    out = ["| " + " | ".join(TABLE_HEADER) + " |",
           "| --- |" + " ---: |" * (len(TABLE_HEADER) - 1)]
    for r in rows:
        out.append("| " + " | ".join(table_cells(r)) + " |")
    return "\n".join(out)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fast smoke run (~30 s)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="JSON output file")
    ap.add_argument("--only", default="", help="comma-separated workload names")
    ap.add_argument("--engine", choices=("c", "python"), default="c",
                    help="ours' engine; python sets EXECNET_NO_EXTENSIONS=1")
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions per side (default 3, quick 1)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="per-child timeout in s (default 60, quick 25)")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="stock venv")
    ap.add_argument("--ours-python", default=sys.executable,
                    help="interpreter for ours (default: this one)")
    ap.add_argument("--md", type=Path, default=None,
                    help="markdown snippet to write (default testing/bench/LATEST.md, "
                         "written only by full runs of all workloads)")
    ap.add_argument("--list", action="store_true", help="list workload names")
    args = ap.parse_args(argv)

    if args.list:
        for name in WORKLOADS:
            print(name)
        return 0
    names = list(WORKLOADS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in WORKLOADS]
        if bad:
            ap.error("unknown workload(s) %s; known: %s" % (", ".join(bad), ", ".join(WORKLOADS)))
    reps = args.reps or (1 if args.quick else 3)
    timeout = args.timeout or (25.0 if args.quick else 60.0)
    md_path = args.md
    if md_path is None and not args.quick and not args.only and args.engine == "c":
        md_path = DEFAULT_MD

    started = time.perf_counter()
    load_start = os.getloadavg()
    stock_py = ensure_venv(args.venv.expanduser())
    stock, ours = make_sides(stock_py, args.engine, args.ours_python)
    sides = (stock, ours)
    ours_bare = None
    if BARE_WORKLOADS & set(names):
        bare_py = ensure_bare_venv(DEFAULT_BARE_VENV, args.ours_python)
        ours_bare = ours_side(args.engine, str(bare_py))
    cwd = tempfile.mkdtemp(prefix="execnet-bench-")
    ceiling_exe = build_ceiling(cwd) if CEILING.keys() & set(names) else None

    # priming: writes bytecode caches, checks both sides work and who is who
    meta_side = {}
    for side in sides:
        log("priming %s ..." % side.name)
        rec = run_child(side, "probe", {}, timeout, cwd)
        if rec["status"] != "ok":
            log("  probe of %s %s:\n%s" % (side.name, rec["status"], rec.get("stderr_tail", "")))
        meta_side[side.name] = {
            "probe": rec,
            "interp_floor_ms": interp_floor(side, cwd),
        }
    if ours_bare is not None:
        rec = run_child(ours_bare, "probe", {}, timeout, cwd)
        meta_side["ours"]["bare_venv_probe"] = rec
        meta_side["ours"]["bare_venv_interp_floor_ms"] = interp_floor(ours_bare, cwd)
    ours_backend = (meta_side["ours"]["probe"].get("info") or {}).get("backend")
    if ours_backend != args.engine:
        log("WARNING: ours reports backend %r, expected %r" % (ours_backend, args.engine))

    results = {}
    total = len(names)
    for i, name in enumerate(names, 1):
        child, pfull, pquick, _rows = WORKLOADS[name]
        params = pquick if args.quick else pfull
        wl = {"child": child, "params": params,
              "stock": {"runs": []}, "ours": {"runs": []}}
        wl_sides = (stock, ours_bare) if name in BARE_WORKLOADS else sides
        if name in BARE_WORKLOADS:
            wl["ours_python"] = ours_bare.argv[0]
        for rep in range(reps):
            for side in wl_sides:
                runs = wl[side.name]["runs"]
                if any(r["status"] == "timeout" for r in runs):
                    continue  # a side that hung once is not retried
                rec = run_child(side, child, params, timeout, cwd)
                runs.append(rec)
                extra = ""
                if rec["status"] == "ok":
                    first = WORKLOADS[name][3][0][0]
                    extra = "%s=%s" % (first, fmt_num(rec["result"].get(first), "x"))
                    if "note" in rec:
                        extra += " (%s)" % rec["note"]
                if rec["status"] != "ok":
                    extra = "rc=%s" % rec["rc"]
                log("[%d/%d] %-15s %-5s rep %d: %-7s %5.1fs %s"
                    % (i, total, name, side.name, rep + 1, rec["status"], rec["wall_s"], extra))
                if rec["status"] != "ok":
                    log("    " + rec.get("stderr_tail", "").replace("\n", "\n    "))
            if ceiling_exe is not None and name in CEILING:
                cargs = CEILING[name][1 if args.quick else 0]
                rec = run_ceiling(ceiling_exe, cargs, timeout)
                wl.setdefault("ceiling", {"args": cargs, "runs": []})["runs"].append(rec)
                log("[%d/%d] %-15s %-5s rep %d: %-7s %5.1fs"
                    % (i, total, name, "hw", rep + 1, rec["status"], rec["wall_s"]))
        for side in sides:
            wl[side.name]["median"] = median_result(wl[side.name]["runs"])
        if "ceiling" in wl:
            wl["ceiling"]["median"] = median_result(wl["ceiling"]["runs"])
        results[name] = wl

    rows = build_rows(results)
    elapsed = time.perf_counter() - started
    cmd = "python testing/bench/run.py" + ("" if argv is None and len(sys.argv) <= 1
                                           else " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    now = datetime.datetime.now().astimezone()
    machine = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    failures = []
    for name, wl in results.items():
        for sname in ("stock", "ours"):
            for k, r in enumerate(wl[sname]["runs"]):
                if r["status"] != "ok" or "note" in r:
                    failures.append({"workload": name, "side": sname, "rep": k + 1,
                                     "status": r["status"], "rc": r.get("rc"),
                                     "note": r.get("note"),
                                     "stderr_tail": r.get("stderr_tail", "")})

    header = [
        "execnet benchmark, %s" % now.strftime("%Y-%m-%d %H:%M %Z"),
        "machine: %d CPUs, %s, Python %s (%s)" % (machine["nproc"], machine["cpu"],
                                                 machine["python"], machine["platform"]),
        "stock: execnet %s from PyPI in %s" % (STOCK_VERSION, args.venv),
        "ours: %s, backend %r%s" % (REPO, ours_backend,
                                     " (EXECNET_NO_EXTENSIONS=1)" if args.engine == "python" else ""),
        "interpreter floor `python -c pass`: stock venv %.1f ms, ours %.1f ms%s "
        "(popen children run these interpreters)" % (
            meta_side["stock"]["interp_floor_ms"], meta_side["ours"]["interp_floor_ms"],
            (", ours' bare venv %.1f ms" % meta_side["ours"]["bare_venv_interp_floor_ms"])
            if "bare_venv_interp_floor_ms" in meta_side["ours"] else ""),
        "median of %d interleaved repetition(s) per side, each in a fresh process; "
        "PYTHONDONTWRITEBYTECODE unset for all children" % reps,
        "command: %s  (%.0f s)" % (cmd, elapsed),
        "load average (1 min) at start / end: %.2f / %.2f on %d CPUs (the machine is shared)" % (
            machine["loadavg_start"][0], machine["loadavg_end"][0], machine["nproc"]),
    ]
    print()
    print("\n".join(header))
    print()
    print(text_table(rows))
    if failures:
        print()
        print("problems:")
        for f in failures:
            print("- %s / %s rep %d: %s (rc=%s)%s" % (
                f["workload"], f["side"], f["rep"], f["status"], f["rc"],
                (" - " + f["note"]) if f["note"] else ""))
            if f["stderr_tail"]:
                print("    " + f["stderr_tail"].replace("\n", "\n    "))

    out = {
        "date": now.isoformat(timespec="seconds"),
        "command": cmd,
        "elapsed_s": round(elapsed, 1),
        "machine": machine,
        "quick": args.quick,
        "reps": reps,
        "timeout_s": timeout,
        "engine": args.engine,
        "ours_backend": ours_backend,
        "sides": {s.name: {"argv": s.argv,
                           "env_changes": {"PYTHONPATH": s.env.get("PYTHONPATH"),
                                           "EXECNET_NO_EXTENSIONS": s.env.get("EXECNET_NO_EXTENSIONS"),
                                           "PYTHONDONTWRITEBYTECODE": "unset"},
                           **meta_side[s.name]} for s in sides},
        "rows": rows,
        "workloads": results,
        "failures": failures,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    log("wrote %s" % args.json)

    if md_path is not None:
        md = ["<!-- generated by testing/bench/run.py; do not edit by hand -->",
              "",
              "Benchmark: ours vs stock execnet %s, %s." % (STOCK_VERSION, now.strftime("%Y-%m-%d")),
              "Machine: %d CPUs, %s, Python %s. Ours: backend `%s`." % (
                  machine["nproc"], machine["cpu"], machine["python"], ours_backend),
              "Median of %d interleaved runs per side, each in a fresh process; "
              "`PYTHONDONTWRITEBYTECODE` unset for the benchmark children; "
              "`python -c pass` takes %.0f ms (stock venv) / %.0f ms (ours' interpreter%s) here; "
              "the \"bare venv\" rows run ours from a package-less venv of the same interpreter." % (
                  reps, meta_side["stock"]["interp_floor_ms"], meta_side["ours"]["interp_floor_ms"],
                  (", %.0f ms from the bare venv" % meta_side["ours"]["bare_venv_interp_floor_ms"])
                  if "bare_venv_interp_floor_ms" in meta_side["ours"] else ""),
              "Command: `%s`; 1-min load average %.1f at start, %.1f at end (shared machine)." % (
                  cmd, machine["loadavg_start"][0], machine["loadavg_end"][0]),
              "",
              md_table(rows),
              ""]
        if failures:
            md.append("Problems: " + "; ".join(
                "%s/%s rep %d %s" % (f["workload"], f["side"], f["rep"], f["note"] or f["status"])
                for f in failures))
            md.append("")
        Path(md_path).write_text("\n".join(md))
        log("wrote %s" % md_path)
    return 1 if any(f["status"] != "ok" for f in failures) else 0


if __name__ == "__main__":
    sys.exit(main())
