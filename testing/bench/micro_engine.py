#!/usr/bin/env python
"""Micro benchmark of the engine hot path over a real popen gateway.

    python testing/bench/micro_engine.py [--reps N] [--quick]

Measures, per engine, in a fresh process each:

* ping-pong round trip of a small int (local send -> remote echo ->
  local receive), median and p99 in microseconds;
* one-way small int throughput, local->remote and remote->local
  (msg/s, from the first send until the receiver has all of them);
* bulk bytes throughput, remote->local and local->remote, 8 MiB objects.

Engines: ``c`` (this checkout, native core), ``python`` (this checkout,
``EXECNET_NO_EXTENSIONS=1``) and ``stock`` (stock execnet from the venv
that testing/make_golden.py and testing/bench/run.py use, black box through
its public API; skipped when that venv does not exist).  The table shows the
median over ``--reps`` runs (interleaved).
"""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STOCK = os.path.expanduser("~/.cache/execnet-stock-venv/bin/python")

ECHO = """
for x in channel:
    channel.send(x)
"""

SINK = """
n = channel.receive()
for i in range(n):
    channel.receive()
channel.send(n)
"""

SOURCE = """
n = channel.receive()
send = channel.send
for i in range(n):
    send(i)
"""

BULK_SOURCE = """
n, size = channel.receive()
blob = bytes(size)
for i in range(n):
    channel.send(blob)
"""

BULK_SINK = """
n = channel.receive()
total = 0
for i in range(n):
    total += len(channel.receive())
channel.send(total)
"""


def child(quick):
    import execnet

    perf = time.perf_counter
    res = {}
    gw = execnet.makegateway("popen")
    try:
        from execnet import gateway_base
        res["backend"] = getattr(gateway_base, "backend", "stock")
    except ImportError:
        res["backend"] = "stock"

    # ping-pong
    ch = gw.remote_exec(ECHO)
    n = 2000 if quick else 10000
    for i in range(500):
        ch.send(i)
        ch.receive()
    times = []
    for i in range(n):
        t0 = perf()
        ch.send(i)
        ch.receive()
        times.append(perf() - t0)
    times.sort()
    res["rtt_median_us"] = times[len(times) // 2] * 1e6
    res["rtt_p99_us"] = times[int(len(times) * 0.99)] * 1e6
    ch.close()
    ch.waitclose()

    # one-way small ints, local -> remote
    n = 50000 if quick else 200000
    ch = gw.remote_exec(SINK)
    t0 = perf()
    ch.send(n)
    for i in range(n):
        ch.send(i)
    assert ch.receive() == n
    res["l2r_msg_s"] = n / (perf() - t0)
    ch.waitclose()

    # one-way small ints, remote -> local
    ch = gw.remote_exec(SOURCE)
    t0 = perf()
    ch.send(n)
    for i in range(n):
        ch.receive()
    res["r2l_msg_s"] = n / (perf() - t0)
    ch.waitclose()

    # bulk, remote -> local and local -> remote
    size = 8 << 20
    nb = 16 if quick else 64
    ch = gw.remote_exec(BULK_SOURCE)
    ch.send((2, size))   # warm-up: page in both sides' buffers
    ch.receive()
    ch.receive()
    ch.waitclose()
    ch = gw.remote_exec(BULK_SOURCE)
    t0 = perf()
    ch.send((nb, size))
    for i in range(nb):
        ch.receive()
    res["bulk_r2l_GBs"] = nb * size / (perf() - t0) / 1e9
    ch.waitclose()
    blob = bytes(size)
    ch = gw.remote_exec(BULK_SINK)
    t0 = perf()
    ch.send(nb)
    for i in range(nb):
        ch.send(blob)
    assert ch.receive() == nb * size
    res["bulk_l2r_GBs"] = nb * size / (perf() - t0) / 1e9
    ch.waitclose()
    gw.exit()
    gw.join()
    print("RESULT " + json.dumps(res), flush=True)


def run_one(engine, quick):
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    args = [sys.executable, os.path.abspath(__file__), "--child"]
    cwd = ROOT
    if engine == "stock":
        args = [STOCK, "-I", os.path.abspath(__file__), "--child"]
        cwd = "/tmp"
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = ROOT
        env["EXECNET_NO_EXTENSIONS"] = "1" if engine == "python" else ""
    if quick:
        args.append("--quick")
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError("%s failed:\n%s" % (engine, out.stderr[-3000:]))


def main(argv):
    quick = "--quick" in argv
    if "--child" in argv:
        child(quick)
        return 0
    reps = 3
    if "--reps" in argv:
        reps = int(argv[argv.index("--reps") + 1])
    engines = ["c", "python"] + (["stock"] if os.path.exists(STOCK) else [])
    results = {e: [] for e in engines}
    for rep in range(reps):
        for e in engines:
            sys.stderr.write("rep %d: %s\n" % (rep + 1, e))
            results[e].append(run_one(e, quick))
    keys = [("rtt_median_us", "ping-pong round trip, median (us)"),
            ("rtt_p99_us", "ping-pong round trip, p99 (us)"),
            ("l2r_msg_s", "small int local->remote (msg/s)"),
            ("r2l_msg_s", "small int remote->local (msg/s)"),
            ("bulk_r2l_GBs", "bulk 8 MiB bytes remote->local (GB/s)"),
            ("bulk_l2r_GBs", "bulk 8 MiB bytes local->remote (GB/s)")]
    print("| measure | " + " | ".join(engines) + " |")
    print("| --- |" + " ---: |" * len(engines))
    for key, label in keys:
        cells = []
        for e in engines:
            v = statistics.median(r[key] for r in results[e])
            cells.append("%.3g" % v if v < 1000 else "{:,.0f}".format(v))
        print("| %s | %s |" % (label, " | ".join(cells)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
