#!/usr/bin/env python3
"""Side-by-side sidecar benchmark: direct-to-app, drainproxy, nginx and HAProxy.

The app (nginx serving static files, one worker) and the proxy under test share CPU 1, as in
a one-core pod; the load generator (wrk or h2load) runs alone on CPU 0. Every proxy is an
equivalent sidecar: one worker/thread, HTTP/1.1 keep-alive to the app (up to 1024 idle
connections for drainproxy and nginx; HAProxy with http-reuse always). Runs are interleaved
(target by target within each repetition) and medians reported, with ratios to the better of
nginx and HAProxy. Only loopback addresses are used.

  bench/proxy/bench.py             # the full run (about 15 minutes), writes bench/RESULTS.md
  bench/proxy/bench.py --quick     # one short repetition, for CI: checks it runs, prints the table
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
APP, APP_H2 = 18080, 18081
PORTS = {  # target -> (http/1.1 port, h2c port)
    "direct": (APP, APP_H2),
    "drainproxy": (18100, 18100),
    "nginx": (18200, 18201),
    "haproxy": (18300, 18301),
}
PEERS = ("nginx", "haproxy")
WORKLOADS = {
    # name: (tool, path, extra)
    "h1 0 B": ("wrk", "/0", []),
    "h1 1 KiB": ("wrk", "/1k", []),
    "h1 16 KiB": ("wrk", "/16k", []),
    "h1 1 MiB": ("wrk", "/1m", []),
    "POST 16 KiB": ("wrk-post", "/post", []),
    "h2 1 KiB": ("h2load", "/1k", []),
    "new connection per request": ("wrk", "/1k", ["-H", "Connection: close"]),
}


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def need(tool):
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if not path:
        sys.exit(f"{tool} is not installed (bash .ci/run installs it)")
    return path


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def pids_of(proc):
    """The process and its children (nginx workers)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [proc.pid] + [int(p) for p in out]


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (FileNotFoundError, IndexError):
            pass
    return total


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


class Stack:
    """The app and the three proxies, each started pinned to CPU 1."""

    def __init__(self, tmp: Path, drainproxy: Path):
        self.tmp = tmp
        self.procs = {}
        # nginx workers run as an unprivileged user: they must be able to read and write here.
        os.chmod(tmp, 0o755)
        www = tmp / "www"
        www.mkdir()
        for name, size in (("0", 0), ("1k", 1024), ("16k", 16384), ("1m", 1 << 20)):
            (www / name).write_bytes(b"x" * size)
        common = (f"pid {{d}}/nginx.pid; error_log {{d}}/error.log; worker_processes 1; daemon off;\n"
                  "events {{ worker_connections 16384; }}\n")
        temp = " ".join(f"{k}_temp_path {{d}};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        app = tmp / "app"
        app.mkdir(mode=0o777)
        (app / "nginx.conf").write_text((common + "http {{ access_log off; keepalive_requests 1000000; " + temp +
            " server {{ listen 127.0.0.1:{a}; listen 127.0.0.1:{h} http2; root {w};"
            " location = /post {{ return 200; }} }} }}\n").format(d=app, a=APP, h=APP_H2, w=www))
        side = tmp / "nginx"
        side.mkdir(mode=0o777)
        (side / "nginx.conf").write_text((common + "http {{ access_log off; keepalive_requests 1000000; " + temp +
            " client_body_buffer_size 64k; upstream app {{ server 127.0.0.1:{a}; keepalive 1024; }}"
            " server {{ listen 127.0.0.1:{p}; listen 127.0.0.1:{h} http2;"
            " location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n")
            .format(d=side, a=APP, p=PORTS["nginx"][0], h=PORTS["nginx"][1]))
        (tmp / "haproxy.cfg").write_text(
            "global\n  nbthread 1\n  maxconn 9000\n"
            "defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n"
            "  option http-keep-alive\n"
            f"frontend fe\n  bind 127.0.0.1:{PORTS['haproxy'][0]}\n  bind 127.0.0.1:{PORTS['haproxy'][1]} proto h2\n"
            "  default_backend app\n"
            f"backend app\n  http-reuse always\n  server app 127.0.0.1:{APP}\n")
        (tmp / "drainproxy.yaml").write_text(
            f"listen: 127.0.0.1:{PORTS['drainproxy'][0]}\nadmin: 127.0.0.1:18101\n"
            f"upstream:\n  address: 127.0.0.1:{APP}\nruntime:\n  threads: 1\nlog:\n  level: warn\n")
        nginx = need("nginx")
        self.start("app", ["taskset", "-c", "1", nginx, "-c", str(app / "nginx.conf"), "-p", str(app)], APP)
        self.start("nginx", ["taskset", "-c", "1", nginx, "-c", str(side / "nginx.conf"), "-p", str(side)], PORTS["nginx"][0])
        self.start("haproxy", ["taskset", "-c", "1", need("haproxy"), "-f", str(tmp / "haproxy.cfg")], PORTS["haproxy"][0])
        self.start("drainproxy", ["taskset", "-c", "1", str(drainproxy), "--config", str(tmp / "drainproxy.yaml")],
                   PORTS["drainproxy"][0])

    def start(self, name, cmd, port):
        self.procs[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)

    def pids(self, target):
        return pids_of(self.procs[target]) if target in self.procs else []

    def stop(self):
        for p in self.procs.values():
            p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def run_load(workload, target, seconds, tmp):
    tool, path, extra = WORKLOADS[workload]
    h1, h2 = PORTS[target]
    if tool == "h2load":
        out = sh("taskset", "-c", "0", need("h2load"), "-c", "32", "-m", "10", "-D", str(seconds),
                 f"http://127.0.0.1:{h2}{path}").stdout
        m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded", out)
        total, ok = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        rps = float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out).group(1))
        return rps, ok, total - ok
    cmd = ["taskset", "-c", "0", need("wrk"), "-t1", "-c32", f"-d{seconds}s", *extra]
    if tool == "wrk-post":
        script = tmp / "post.lua"
        script.write_text('wrk.method = "POST"\nwrk.body = string.rep("x", 16384)\n'
                          'wrk.headers["Content-Type"] = "application/octet-stream"\n')
        cmd += ["-s", str(script)]
    out = sh(*cmd, f"http://127.0.0.1:{h1}{path}").stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    n = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, n, errors + (int(non2xx.group(1)) if non2xx else 0)


def idle_rss(stack, target, count):
    """RSS of the proxy holding `count` idle keep-alive connections (each served one request)."""
    port = PORTS[target][0]
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /0 HTTP/1.1\r\nHost: bench\r\n\r\n")
            socks.append(s)
        for s in socks:
            s.settimeout(5)
            s.recv(4096)
        time.sleep(0.5)
        return rss_kib(stack.pids(target))
    finally:
        for s in socks:
            s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one repetition of 2 s per workload, no idle-connection memory runs")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    args = ap.parse_args()
    if args.quick:
        args.reps, args.seconds = 1, 2
    if os.cpu_count() < 2:
        sys.exit("needs 2 CPUs: the load generator and the pod must not share one")
    drainproxy = ROOT / "target" / "release" / "drainproxy"
    if not drainproxy.exists():
        subprocess.run(["cargo", "build", "--release", "--bin", "drainproxy"], cwd=ROOT, check=True)
    tmp = Path(tempfile.mkdtemp(prefix="drainproxy-bench-"))
    stack = Stack(tmp, drainproxy)
    time.sleep(0.5)
    idle_at_start = {t: rss_kib(stack.pids(t)) for t in ("drainproxy", "nginx", "haproxy")}
    results = {}  # (workload, target) -> list of (rps, cpu_us_per_req)
    errors = {}
    try:
        targets = list(PORTS)
        for rep in range(args.reps):
            for workload in WORKLOADS:
                for target in targets:
                    pids = stack.pids(target) if target != "direct" else []
                    before = cpu_ticks(pids)
                    rps, n, errs = run_load(workload, target, args.seconds, tmp)
                    ticks = cpu_ticks(pids) - before
                    us = ticks / CLK_TCK * 1e6 / n if n and pids else None
                    results.setdefault((workload, target), []).append((rps, us))
                    errors[(workload, target)] = errors.get((workload, target), 0) + errs
                    print(f"rep {rep + 1} {workload:<28} {target:<10} {rps:>10.0f} req/s"
                          + (f" {us:6.1f} us/req" if us else "") + (f"  {errs} errors" if errs else ""), flush=True)
        memory = {}
        for target in ("drainproxy", "nginx", "haproxy"):
            row = {"idle (at start)": idle_at_start[target], "after the load runs": rss_kib(stack.pids(target))}
            if not args.quick:
                row["1k idle conns"] = idle_rss(stack, target, 1000)
                row["10k idle conns"] = idle_rss(stack, target, 8000 if target == "haproxy" else 10000)
            memory[target] = row
    finally:
        stack.stop()
    report = render(results, errors, memory, args)
    print(report)
    if not args.quick:
        Path(args.out).write_text(report)
        (Path(args.out).parent / "results.svg").write_text(chart(results))
    bad = [k for k, v in errors.items() if v]
    if bad:
        sys.exit(f"errors during load: {bad}")


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def render(results, errors, memory, args):
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    versions = {
        "nginx": subprocess.run([need("nginx"), "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1],
        "haproxy": sh(need("haproxy"), "-v").stdout.split()[2],
        "wrk": "4.x", "drainproxy": sh(str(ROOT / "target/release/drainproxy"), "--version").stdout.split()[-1],
    }
    lines = [
        "# Sidecar benchmark",
        "",
        f"{time.strftime('%Y-%m-%d', time.gmtime())}; {os.cpu_count()} CPUs ({cpu}); nginx {versions['nginx']}, "
        f"HAProxy {versions['haproxy']}, drainproxy {versions['drainproxy']}. App (nginx, static files) and proxy share CPU 1; "
        f"the load generator runs alone on CPU 0 (wrk -t1 -c32; h2load -c32 -m10). {args.reps} interleaved repetitions "
        f"of {args.seconds} s; medians. Command: `bench/proxy/bench.py`.",
        "",
        "| workload | direct req/s | drainproxy req/s | nginx req/s | HAProxy req/s | drainproxy / best peer | CPU µs/req drainproxy | nginx | HAProxy | CPU ratio to best peer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in WORKLOADS:
        rps = {t: med([r for r, _ in results.get((w, t), [])]) for t in PORTS}
        us = {t: med([u for _, u in results.get((w, t), [])]) for t in PORTS}
        best = max(rps[p] for p in PEERS)
        peer_cpu = [us[p] for p in PEERS if us[p] is not None]
        best_cpu = min(peer_cpu) if peer_cpu else None
        fmt = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}"
        lines.append(f"| {w} | {fmt(rps['direct'])} | {fmt(rps['drainproxy'])} | {fmt(rps['nginx'])} | {fmt(rps['haproxy'])} | "
                     f"**{rps['drainproxy'] / best:.2f}×** | {fmt(us['drainproxy'], 1)} | {fmt(us['nginx'], 1)} | {fmt(us['haproxy'], 1)} | "
                     f"{fmt(us['drainproxy'] / best_cpu if best_cpu and us['drainproxy'] else None, 2)} |")
    lines += ["", "Memory (RSS, KiB):", "", "| proxy | " + " | ".join(next(iter(memory.values())).keys()) + " |",
              "|---|" + "---|" * len(next(iter(memory.values()))) ]
    for t, row in memory.items():
        lines.append(f"| {t} | " + " | ".join(f"{v:,}" for v in row.values()) + " |")
    lines.append("")
    lines.append("HAProxy's 10k figure is for 8,000 connections: with a 20,000 file-descriptor limit it cannot hold 10,000 "
                 "(it reserves two descriptors per connection).")
    return "\n".join(lines) + "\n"


def chart(results):
    """Horizontal bars: throughput relative to the better peer, per workload."""
    rows = []
    for w in WORKLOADS:
        rps = {t: med([r for r, _ in results.get((w, t), [])]) for t in PORTS}
        best = max(rps[p] for p in PEERS)
        rows.append((w, {t: rps[t] / best for t in ("drainproxy", "nginx", "haproxy")}))
    colors = {"drainproxy": "#1a7f37", "nginx": "#999", "haproxy": "#555"}
    w, bar, left = 860, 10, 220
    h = 40 + len(rows) * 44
    scale = (w - left - 160) / max(max(v.values()) for _, v in rows)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="10" y="18" font-size="14">Throughput relative to the better of nginx and HAProxy (1.0 = the better peer)</text>']
    for i, (name, vals) in enumerate(rows):
        y = 34 + i * 44
        out.append(f'<text x="10" y="{y + 18}">{name}</text>')
        for j, (t, v) in enumerate(vals.items()):
            out.append(f'<rect x="{left}" y="{y + j * (bar + 2)}" width="{v * scale:.1f}" height="{bar}" fill="{colors[t]}"/>')
            out.append(f'<text x="{left + v * scale + 4:.1f}" y="{y + j * (bar + 2) + 9}" font-size="10">{t} {v:.2f}</text>')
    x1 = left + scale
    out.append(f'<line x1="{x1:.1f}" y1="28" x2="{x1:.1f}" y2="{h - 4}" stroke="#cf222e" stroke-dasharray="3,3"/>')
    out.append("</svg>\n")
    return "\n".join(out)


if __name__ == "__main__":
    main()
