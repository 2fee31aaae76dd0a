#!/usr/bin/env python3
"""Instructions per request: what a drainproxy build's own work costs, counted, not timed.

Throughput and CPU time on a shared two-core machine move by several percent from run to
run, more than most single changes to the hot path are worth. The count of instructions a
build executes per request moves by about 1% on HTTP/1.1 and 2% on HTTP/2 (how h2 batches
frames varies): run builds in turn, more than once, and compare medians. This runs each build under callgrind behind
the bench's app (nginx, as `bench.py` starts it), sends a first and then a second number of
requests with oha (32 connections; HTTP/2 with 10 streams each), and reports the difference
per request, which leaves out start-up and shutdown. Run it on the builds before and after
a change. Loopback only; every run is bounded by its request count.

    python3 bench/proxy/instructions.py [--requests 4000,24000] [BUILD ...]

BUILD defaults to target/release/drainproxy (cargo build --release first). Needs valgrind
(apt-get install valgrind) and oha (installed as bench.py installs it).
"""

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the bench's app, ports and tools)

PORT, ADMIN = 18390, 18391
# name -> (path, oha arguments)
WORKLOADS = {"h1 0 B": ("/0", []), "h2 1 KiB": ("/1k", ["--http2", "-p", "10"])}


def count(build, config, tmp, oha, path, extra, n):
    """Instructions callgrind counted in `build` serving `n` requests, start to stop."""
    out = tmp / f"callgrind.{n}"
    proxy = subprocess.Popen(["taskset", "-c", "1", "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                              str(build), "--config", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bench.wait_port(PORT, timeout=60)
        load = bench.sh("taskset", "-c", "0", oha, "-n", str(n), "-c", "32", "--no-tui", *extra,
                        f"http://127.0.0.1:{PORT}{path}").stdout
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(timeout=120)
    ok = re.search(r"\[200\] (\d+) responses", load)
    if not ok or int(ok.group(1)) != n:
        sys.exit(f"{build}: {n} requests were not all answered 200:\n{load[-600:]}")
    total = re.search(r"^(?:summary|totals): (\d+)", out.read_text(errors="replace"), re.M)
    return int(total.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="*", type=Path, help="drainproxy binaries (default: target/release/drainproxy)")
    ap.add_argument("--requests", default="4000,24000", help="the two request counts (default 4000,24000)")
    args = ap.parse_args()
    n1, n2 = (int(x) for x in args.requests.split(","))
    if not 0 < n1 < n2:
        sys.exit("--requests: two counts, the first smaller and above 0")
    if not shutil.which("valgrind"):
        sys.exit("valgrind not found: apt-get install valgrind")
    builds = args.builds or [bench.ROOT / "target/release/drainproxy"]
    for b in builds:
        if not b.exists():
            sys.exit(f"{b}: no such build (cargo build --release)")
    oha = bench.oha_path()
    tmp = Path(tempfile.mkdtemp(prefix="drainproxy-instructions-"))
    bench.refuse_taken(PORT, ADMIN)
    stack = bench.Stack(tmp, builds[0])
    config = tmp / "callgrind.yaml"
    config.write_text(bench.drainproxy_config(PORT, ADMIN))
    try:
        print(f"| build | {' | '.join(WORKLOADS)} |\n|---|{'---|' * len(WORKLOADS)}")
        for b in builds:
            cells = []
            for path, extra in WORKLOADS.values():
                first, second = (count(b, config, tmp, oha, path, extra, n) for n in (n1, n2))
                cells.append(f"{(second - first) / (n2 - n1):,.0f}")
            print(f"| `{b}` | {' | '.join(cells)} |", flush=True)
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ninstructions per request: (count at {n2} requests - count at {n1}) / {n2 - n1}, callgrind")


if __name__ == "__main__":
    main()
