"""Benchmark workload child: runs ONE workload and prints one JSON line.

Usage (driven by run.py, not meant to be run by hand):

    python workloads.py WORKLOAD 'PARAMS_JSON'

It runs unchanged under stock execnet (the stock venv's interpreter, isolated)
and under ours (PYTHONPATH pointing at the checkout).  Only execnet's public
API and the standard library are used.  The result line starts with
``BENCH-RESULT `` followed by a JSON object; it is printed (and flushed)
*before* teardown, so a teardown that hangs still leaves the measurement.
A faulthandler watchdog dumps every thread's stack to stderr and exits when
the child runs past its deadline, which makes hangs diagnosable.
"""
import faulthandler
import json
import os
import resource
import sys
import threading
import time

import execnet

perf = time.perf_counter
WORKLOADS = {}


def workload(fn):
    WORKLOADS[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------- helpers

def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if not n:
        return None
    if n % 2:
        return xs[n // 2]
    return (xs[n // 2 - 1] + xs[n // 2]) / 2.0


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]


def os_threads():
    """Threads of this process as the kernel counts them (incl. native)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def backend():
    try:
        import execnet.gateway_base as gb
        return getattr(gb, "backend", None)
    except Exception as e:  # pragma: no cover
        return "error: %r" % (e,)


def calibrated(run_once, params, n0_key="n0"):
    """Size a run to ``params["target"]`` seconds and return (n, seconds).

    ``run_once(n)`` moves n items and returns the elapsed seconds.  The first
    run (n0 items) is a warm-up used only to estimate the rate; runs are then
    rescaled until one lasts at least half the target (or hits nmax)."""
    n0, nmax, target = params[n0_key], params["nmax"], params["target"]
    t = run_once(n0)
    n = n0
    for _ in range(3):
        rate = n / t if t > 0 else float("inf")
        n = int(min(nmax, max(n0, rate * target)))
        t = run_once(n)
        if t >= 0.5 * target or n >= nmax:
            break
    return n, t


# ------------------------------------------------------------- workloads

@workload
def startup(params):
    """makegateway() -> first completed remote_exec('channel.send(1)')."""
    times, terms = [], []
    for _ in range(params["n"]):
        g = execnet.Group()
        t0 = perf()
        gw = g.makegateway("popen")
        gw.remote_exec("channel.send(1)").receive()
        t1 = perf()
        g.terminate(timeout=10)
        t2 = perf()
        times.append(t1 - t0)
        terms.append(t2 - t1)
    return {
        "startup_ms": median(times) * 1e3,
        "startup_min_ms": min(times) * 1e3,
        "terminate1_ms": median(terms) * 1e3,
        "samples": len(times),
    }, None


@workload
def remote_exec(params):
    gw = execnet.makegateway("popen")
    for _ in range(params["warmup"]):
        gw.remote_exec("channel.send(1)").receive()
    lat = []
    deadline = perf() + params["budget"]
    while len(lat) < params["n"] and (perf() < deadline or len(lat) < 20):
        t0 = perf()
        ch = gw.remote_exec("channel.send(1)")
        ch.receive()
        lat.append(perf() - t0)
    return {
        "remote_exec_us": median(lat) * 1e6,
        "remote_exec_p99_us": pct(lat, 99) * 1e6,
        "samples": len(lat),
    }, gw.exit


PINGPONG_REMOTE = """
while True:
    x = channel.receive()
    if x is None:
        break
    channel.send(x)
"""

THREADS_REMOTE = """
import threading, resource
n = None
try:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                n = int(line.split()[1])
except OSError:
    pass
channel.send((threading.active_count(), n,
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


@workload
def pingpong(params):
    py0, os0 = threading.active_count(), os_threads()
    gw = execnet.makegateway("popen")
    # give lazily-started helper threads a moment, then count
    gw.remote_exec("channel.send(1)").receive()
    py1, os1 = threading.active_count(), os_threads()
    ch = gw.remote_exec(PINGPONG_REMOTE)
    for i in range(params["warmup"]):
        ch.send(i)
        ch.receive()
    rts = []
    pc = time.perf_counter_ns
    send, receive = ch.send, ch.receive
    t_all = perf()
    for i in range(params["n"]):
        t0 = pc()
        send(7)
        receive()
        rts.append(pc() - t0)
    t_all = perf() - t_all
    ch.send(None)
    ch.waitclose(10)
    r_py, r_os, r_rss = gw.remote_exec(THREADS_REMOTE).receive()
    return {
        "rt_median_us": median(rts) / 1e3,
        "rt_p99_us": pct(rts, 99) / 1e3,
        "rt_mean_us": t_all / len(rts) * 1e6,
        "samples": len(rts),
        "maxrss_mib": maxrss_mib(),
        "local_py_threads_per_gw": py1 - py0,
        "local_os_threads_per_gw": (os1 - os0) if os0 is not None else None,
        "remote_py_threads": r_py,
        "remote_os_threads": r_os,
        "remote_maxrss_mib": r_rss / 1024.0,
    }, gw.exit


# ---- one-way small-message streams

R2L_REMOTE = """
n, kind = channel.receive()
send = channel.send
if kind == "int":
    for i in range(n):
        send(i)
else:
    for i in range(n):
        send((i, "abc", 1.5))
"""

L2R_RECV_REMOTE = """
c = 0
receive = channel.receive
while True:
    x = receive()
    if x is None:
        break
    c += 1
channel.send(c)
"""

L2R_CB_REMOTE = """
import threading
ev = threading.Event()
c = [0]
def cb(x):
    if x is None:
        ev.set()
    else:
        c[0] += 1
channel.setcallback(cb)
ev.wait()
channel.send(c[0])
"""


def _item_maker(kind):
    if kind == "int":
        return lambda i: i
    return lambda i: (i, "abc", 1.5)


def _stream(params):
    direction, mode, kind = params["direction"], params["mode"], params["kind"]
    gw = execnet.makegateway("popen")
    gw.remote_exec("channel.send(1)").receive()
    timeout = params["recv_timeout"]

    if direction == "r2l" and mode == "recv":
        def run_once(n):
            ch = gw.remote_exec(R2L_REMOTE)
            receive = ch.receive
            t0 = perf()
            ch.send((n, kind))
            for _ in range(n):
                receive(timeout)
            t = perf() - t0
            ch.waitclose(timeout)
            return t
    elif direction == "r2l" and mode == "callback":
        def run_once(n):
            ch = gw.remote_exec(R2L_REMOTE)
            END = object()
            cnt = [0]
            ev = threading.Event()

            def cb(x):
                if x is END:
                    ev.set()
                else:
                    cnt[0] += 1
            ch.setcallback(cb, endmarker=END)
            t0 = perf()
            ch.send((n, kind))
            if not ev.wait(timeout):
                raise RuntimeError("endmarker not seen, got %d of %d" % (cnt[0], n))
            t = perf() - t0
            if cnt[0] != n:
                raise RuntimeError("callback count %d != %d" % (cnt[0], n))
            return t
    else:  # l2r
        src = L2R_RECV_REMOTE if mode == "recv" else L2R_CB_REMOTE
        make = _item_maker(kind)

        def run_once(n):
            ch = gw.remote_exec(src)
            send = ch.send
            t0 = perf()
            if kind == "int":
                for i in range(n):
                    send(i)
            else:
                for i in range(n):
                    send((i, "abc", 1.5))
            send(None)
            got = ch.receive(timeout)
            t = perf() - t0
            if got != n:
                raise RuntimeError("remote counted %r, sent %d" % (got, n))
            ch.waitclose(timeout)
            return t

    n, t = calibrated(run_once, params)
    return {"msgs_per_s": n / t, "n": n, "seconds": t}, gw.exit


@workload
def stream(params):
    return _stream(params)


# ---- bulk bytes

BULK_R2L_REMOTE = """
import os
size = channel.receive()
blob = os.urandom(size)
channel.send(None)
n = channel.receive()
send = channel.send
for i in range(n):
    send(blob)
"""

BULK_L2R_REMOTE = """
total = 0
receive = channel.receive
while True:
    x = receive()
    if x is None:
        break
    total += len(x)
channel.send(total)
"""


@workload
def bulk(params):
    size = params["size"]
    timeout = params["recv_timeout"]
    gw = execnet.makegateway("popen")
    gw.remote_exec("channel.send(1)").receive()
    if params["direction"] == "r2l":
        def run_once(n):
            ch = gw.remote_exec(BULK_R2L_REMOTE)
            # The blob is made before the clock starts: os.urandom(1 MiB)
            # takes milliseconds, which is not transfer time.
            ch.send(size)
            ch.receive(timeout)
            t0 = perf()
            ch.send(n)
            for _ in range(n):
                b = ch.receive(timeout)
                if len(b) != size:
                    raise RuntimeError("got %d bytes" % len(b))
            t = perf() - t0
            ch.waitclose(timeout)
            return t
    else:
        blob = os.urandom(size)

        def run_once(n):
            ch = gw.remote_exec(BULK_L2R_REMOTE)
            t0 = perf()
            for _ in range(n):
                ch.send(blob)
            ch.send(None)
            got = ch.receive(timeout)
            t = perf() - t0
            if got != n * size:
                raise RuntimeError("remote got %r bytes" % (got,))
            ch.waitclose(timeout)
            return t
    n, t = calibrated(run_once, params)
    return {"MB_per_s": n * size / t / 1e6, "n": n, "MiB_total": n * size / 2**20,
            "seconds": t}, gw.exit


# ---- pytest-xdist-like report payloads

def build_report(pad, rich):
    """A dict shaped like a pytest-xdist serialized TestReport.  ``pad`` is
    the length of the longrepr text; ``rich`` adds captured-output sections
    (a failing test's report), otherwise it looks like a passing one."""
    return {
        "nodeid": "tests/test_mod.py::TestCls::test_case[p-42]",
        "location": ("tests/test_mod.py", 118, "TestCls.test_case[p-42]"),
        "keywords": {"test_case[p-42]": 1, "parametrize": 1, "TestCls": 1,
                     "test_mod.py": 1},
        "outcome": "failed" if rich else "passed",
        "longrepr": "x" * pad if rich else ("-" * pad if pad else None),
        "sections": ([("Captured stdout call", "collecting data...\nsetup done\n" * 8),
                      ("Captured log call", "INFO     root:test_mod.py:120 ok\n" * 8)]
                     if rich else []),
        "duration": 0.0123456789,
        "when": "call",
        "user_properties": [("ticket", "ABC-123")] if rich else [],
        "$report_type": "TestReport",
        "item_index": 4711,
        "worker_id": "gw3",
        "testrun_uid": "6c0b9a61d2e34f2c8b7f1b0f8e2b9d41",
    }


def sized_report(target):
    """Build a report dict whose ``execnet.dumps`` is ``target`` bytes long
    (or as close as the fixed fields allow)."""
    rich = target > 2000
    pad = 0
    for _ in range(6):
        size = len(execnet.dumps(build_report(pad, rich)))
        if size == target:
            break
        pad = max(0, pad + target - size)
    d = build_report(pad, rich)
    return d, len(execnet.dumps(d))


REPORT_REMOTE = """
n, d = channel.receive()
send = channel.send
for i in range(n):
    send(d)
"""


@workload
def reports(params):
    d, size = sized_report(params["target_bytes"])
    timeout = params["recv_timeout"]
    gw = execnet.makegateway("popen")
    gw.remote_exec("channel.send(1)").receive()

    def run_once(n):
        ch = gw.remote_exec(REPORT_REMOTE)
        t0 = perf()
        ch.send((n, d))
        for _ in range(n):
            ch.receive(timeout)
        t = perf() - t0
        ch.waitclose(timeout)
        return t
    got = gw.remote_exec(REPORT_REMOTE)
    got.send((1, d))
    echo = got.receive(timeout)
    got.waitclose(timeout)
    if echo != d:
        raise RuntimeError("report did not round-trip unchanged")
    n, t = calibrated(run_once, params)
    return {"msgs_per_s": n / t, "MB_per_s": n * size / t / 1e6, "n": n,
            "dumps_len": size, "seconds": t}, gw.exit


# ---- Group of 8

@workload
def group8(params):
    k = params["k"]
    t0 = perf()
    g = execnet.Group()
    gws = [g.makegateway("popen") for _ in range(k)]
    chans = [gw.remote_exec("channel.send(1)") for gw in gws]
    for c in chans:
        c.receive()
    t1 = perf()
    g.terminate(timeout=10)
    t2 = perf()
    return {"create_ms": (t1 - t0) * 1e3, "terminate_ms": (t2 - t1) * 1e3,
            "gateways": k}, None


# ---- probe (sanity / interpreter info)

@workload
def probe(params):
    gw = execnet.makegateway("popen")
    r = gw.remote_exec("import sys; channel.send((sys.version, sys.executable))").receive()
    d1, s1 = sized_report(640)
    d2, s2 = sized_report(4700)
    return {"remote_version": r[0], "remote_executable": r[1],
            "report_sizes": [s1, s2]}, gw.exit


def main():
    name = sys.argv[1]
    params = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    deadline = params.get("deadline", 60)
    faulthandler.dump_traceback_later(deadline, exit=True)
    info = {
        "workload": name,
        "backend": backend(),
        "execnet_version": getattr(execnet, "__version__", None),
        "execnet_file": execnet.__file__,
        "python": sys.version.split()[0],
        "executable": sys.executable,
    }
    result, teardown = WORKLOADS[name](params)
    info["result"] = result
    sys.stdout.write("BENCH-RESULT " + json.dumps(info) + "\n")
    sys.stdout.flush()
    # teardown gets its own short watchdog; a hang here is reported, not fatal
    faulthandler.cancel_dump_traceback_later()
    faulthandler.dump_traceback_later(params.get("teardown_deadline", 15), exit=True)
    if teardown is not None:
        teardown()
    t0 = perf()
    try:
        execnet.default_group.terminate(timeout=10)
    except Exception:
        pass
    sys.stderr.write("teardown-done %.3f\n" % (perf() - t0))
    sys.stderr.flush()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
