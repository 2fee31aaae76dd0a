#!/usr/bin/env python3
"""What per-request work costs a proxy that shares one core with its app.

The tokio relay (`bench/proxy/relay.rs`) forwards bytes and parses nothing. Started with
WORK_NS, it also spins that many nanoseconds after each read it forwards, two per request,
standing in for an HTTP proxy's parsing and rewriting. This runs relays with several amounts
of such work side by side with drainproxy, nginx and HAProxy on HTTP/1.1 0 B (the bench's
setup: wrk on CPU 0, the app and every proxy on CPU 1), interleaved, and prints the medians:
req/s and the ratio to the better of nginx and HAProxy, the proxy's CPU per request and its
ratio to the better peer's, how often per 1,000 requests the
scheduler took the core from the proxy (mostly to run the app it had just woken), and how
often the app ran out of requests and slept.

The question it answers: how much of a 1.25x throughput target is left to a proxy that does
any HTTP work at all on this kernel and machine. Loopback only; every run is bounded.

    python3 bench/proxy/work_sweep.py [--reps 4] [--seconds 5] [--work 0,150,350,700]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the bench's stack, load and counters)

FIRST_PORT = 18330


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=4, help="interleaved rounds (default 4)")
    ap.add_argument("--seconds", type=int, default=5, help="seconds of load per target and round (default 5)")
    ap.add_argument("--work", default="0,150,350,700",
                    help="busy nanoseconds per forwarded read, one relay each (default 0,150,350,700)")
    args = ap.parse_args()
    work = [int(w) for w in args.work.split(",")]
    if os.cpu_count() < 2:
        sys.exit("needs 2 CPUs: the load generator and the pod must not share one")
    subprocess.run(["cargo", "build", "--release", "--bin", "drainproxy", "--example", "relay"],
                   cwd=bench.ROOT, check=True)
    tmp = Path(tempfile.mkdtemp(prefix="drainproxy-sweep-"))
    stack = bench.Stack(tmp, bench.ROOT / "target" / "release" / "drainproxy")
    ports = {t: bench.PORTS[t] for t in ("drainproxy", *bench.PEERS)}
    try:
        for i, ns in enumerate(work):
            name, port = f"relay + {ns} ns", FIRST_PORT + i
            stack.start(name, ["taskset", "-c", "1", str(bench.RELAY_BIN), f"127.0.0.1:{port}",
                               f"127.0.0.1:{bench.APP}", str(ns)], port)
            ports[name] = (port, None, None)
        app = stack.pids("app")
        time.sleep(0.5)
        rows = {t: [] for t in ports}
        for t in ports:  # warm every target once
            bench.run_load("h1 0 B", ports[t], 1, tmp)
        for rep in range(args.reps):
            for t in ports:
                rps, errors, user, system, pre, slept = bench.measure("h1 0 B", ports[t], args.seconds, tmp,
                                                                      stack.pids(t), app)
                if errors:
                    sys.exit(f"{t}: {errors} errors")
                us = user + system
                rows[t].append((rps, us, pre, slept))
                print(f"round {rep + 1} {t}: {rps:,.0f} req/s, {us:.1f} µs/req", file=sys.stderr, flush=True)
    finally:
        stack.stop()
    med = {t: [statistics.median(r[k] for r in rows[t]) for k in range(4)] for t in rows}
    best = max(med[p][0] for p in bench.PEERS)
    best_cpu = min(med[p][1] for p in bench.PEERS)
    print(f"h1 0 B, {args.reps} interleaved rounds of {args.seconds} s, medians; `nproc` {os.cpu_count()}")
    print()
    print("| target | req/s | / better peer | CPU µs/req | / better peer | proxy preempted /1k req | app slept /1k req |")
    print("|---|---|---|---|---|---|---|")
    for t, (rps, us, pre, slept) in med.items():
        print(f"| {t} | {rps:,.0f} | {rps / best:.2f}× | {us:.1f} | {us / best_cpu:.2f}× | {pre:.0f} | {slept:.0f} |")


if __name__ == "__main__":
    main()
