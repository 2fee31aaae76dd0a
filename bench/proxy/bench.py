#!/usr/bin/env python3
"""Side-by-side sidecar benchmark: direct-to-app, drainproxy, nginx and HAProxy.

The app (nginx serving static files, one worker) and the proxy under test share CPU 1, as in
a one-core pod; the load generator (wrk or h2load) runs alone on CPU 0. Every proxy is an
equivalent sidecar: one worker/thread, HTTP/1.1 keep-alive to the app (up to 1024 idle
connections for drainproxy and nginx; HAProxy with http-reuse always), and the forwarding
fields drainproxy adds to every request (X-Forwarded-For with the client's address appended,
X-Forwarded-Proto and X-Forwarded-Host), which the app parses too. Runs are interleaved
(target by target within each repetition) and medians reported, with ratios to the better of
nginx and HAProxy. Two byte relays that parse no HTTP (HAProxy in `mode tcp`, and
bench/proxy/relay.rs on drainproxy's own runtime) run the small keep-alive workloads too: the
floor no HTTP proxy on this topology can pass. Only loopback addresses are used.

Figures: closed-loop throughput (wrk, h2load); open-loop latency with coordinated-omission
correction (oha, installed with `cargo install` when missing) at 1k and 5k req/s and at 80% of
the slowest peer's maximum; CPU per request split into user and kernel time; RSS idle, at peak,
after the load, with 1k and 10k idle connections; and the global allocators drainproxy can be
built with (cargo features), side by side.

  bench/proxy/bench.py             # the full run (about 30 minutes), writes bench/RESULTS.md
  bench/proxy/bench.py --quick     # one short repetition, for CI: checks it runs, prints the table
"""
import argparse
import json
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
ADMIN = 18101  # drainproxy's admin port in the stack
PORTS = {  # target -> (http/1.1 port, h2c port, TLS port: HTTP/2 or HTTP/1.1 by ALPN)
    "direct": (APP, APP_H2, None),
    "drainproxy": (18100, 18100, 18102),
    "nginx": (18200, 18201, 18202),
    "haproxy": (18300, 18301, 18302),
}
# drainproxy has one listen port: TLS is served by a second process with `tls` set.
DP_TLS_ADMIN = 18103
PEERS = ("nginx", "haproxy")
# The floor: a byte relay (one app connection per client connection) parses no HTTP and makes
# the same four socket calls per request as an HTTP proxy. What it reaches on small keep-alive
# responses bounds what any proxy can reach on this topology. Two of them, so the floor is not
# one program's: HAProxy in `mode tcp`, and the leanest relay on drainproxy's own runtime
# (tokio, one thread; `cargo build --release --example relay`).
RELAYS = {"relay": 18310, "tokio relay": 18320}
RELAY_NAMES = {"relay": "HAProxy `mode tcp`", "tokio relay": "tokio (`bench/proxy/relay.rs`)"}
RELAY_BIN = ROOT / "target" / "release" / "examples" / "relay"
RELAY_WORKLOADS = ("h1 0 B", "h1 1 KiB")
WORKLOADS = {
    # name: (tool, path, extra)
    "h1 0 B": ("wrk", "/0", []),
    "h1 1 KiB": ("wrk", "/1k", []),
    "h1 16 KiB": ("wrk", "/16k", []),
    "h1 1 MiB": ("wrk", "/1m", []),
    "POST 16 KiB": ("wrk-post", "/post", []),
    "h2 1 KiB": ("h2load", "/1k", []),
    "new connection per request": ("wrk", "/1k", ["-H", "Connection: close"]),
    # TLS termination (ECDSA P-256, TLS 1.3), not among the workloads: no direct
    # figure (the app speaks cleartext) and no target.
    "TLS h1 1 KiB": ("wrk-tls", "/1k", []),
    "TLS h2 1 KiB": ("h2load-tls", "/1k", []),
    "TLS new connection per request": ("wrk-tls", "/1k", ["-H", "Connection: close"]),
}
TLS_WORKLOADS = [w for w, (tool, _, _) in WORKLOADS.items() if tool.endswith("-tls")]


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def need(tool):
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if not path:
        sys.exit(f"{tool} is not installed (bash .ci/run installs it)")
    return path


def refuse_taken(*ports):
    """Exits when something already listens on one of these ports: the run would measure it
    (a proxy or app left over from an earlier run) instead of what it starts."""
    taken = [port for port in dict.fromkeys(ports) if listening(port)]
    if taken:
        sys.exit(f"127.0.0.1 ports already in use: {', '.join(map(str, taken))}; stop what listens there and run again")


def listening(port):
    """Whether something accepts connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if listening(port):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def pids_of(proc):
    """The process and its children (nginx workers)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [proc.pid] + [int(p) for p in out]


def cpu_ticks(pids):
    """(user, system) clock ticks of the processes."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except (FileNotFoundError, IndexError):
            pass
    return user, system


def status_total(pids, field):
    """One numeric field of `/proc/<pid>/status`, summed over the processes (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def preemptions(pids):
    """Involuntary context switches so far: how often the scheduler took the CPU from the
    processes, on this core mostly to run the app they woke."""
    return status_total(pids, "nonvoluntary_ctxt_switches")


def sleeps(pids):
    """Voluntary context switches so far: for the app, how often it ran out of requests and slept."""
    return status_total(pids, "voluntary_ctxt_switches")


def rss_kib(pids, field="VmRSS"):
    """Summed RSS (or, with field="VmHWM", the peak RSS) of the processes."""
    return status_total(pids, field)


def oha_path():
    """oha from PATH, or built once into target/tools with cargo install."""
    found = shutil.which("oha") or (ROOT / "target/tools/bin/oha")
    if Path(found).exists():
        return str(found)
    print("installing oha (cargo install, a few minutes, once)", flush=True)
    subprocess.run(["cargo", "install", "oha", "--locked", "--root", str(ROOT / "target/tools")], check=True)
    return str(ROOT / "target/tools/bin/oha")


def open_loop(oha, port, rate, seconds):
    """Latency percentiles (ms) at a fixed request rate, corrected for coordinated omission."""
    out = sh("taskset", "-c", "0", oha, "-z", f"{seconds}s", "-w", "-q", str(rate), "-c", "32",
             "--latency-correction", "--no-tui", "--output-format", "json", "--worker-threads", "1",
             f"http://127.0.0.1:{port}/0").stdout
    d = json.loads(out)
    pct = d["latencyPercentiles"]
    codes = d.get("statusCodeDistribution", {})
    bad = sum(n for c, n in codes.items() if not c.startswith("2")) + sum(d.get("errorDistribution", {}).values())
    return {k: pct[k] * 1000 for k in ("p50", "p99", "p99.9")}, bad


def drainproxy_config(port, admin):
    """drainproxy as the bench runs it: a sidecar of the app on one worker thread."""
    return (f"listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\nupstream:\n  address: 127.0.0.1:{APP}\n"
            "runtime:\n  threads: 1\nlog:\n  level: warn\n")


class Stack:
    """The app and the three proxies, each started pinned to CPU 1."""

    def __init__(self, tmp: Path, drainproxy: Path):
        self.tmp = tmp
        self.procs = {}
        # nginx workers run as an unprivileged user: they must be able to read and write here.
        os.chmod(tmp, 0o755)
        # One certificate for every proxy's TLS port; HAProxy wants it and its key in one file.
        sh(need("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-keyout", str(tmp / "tls.key"), "-out", str(tmp / "tls.crt"), "-days", "2", "-subj", "/CN=localhost")
        (tmp / "tls.pem").write_text((tmp / "tls.crt").read_text() + (tmp / "tls.key").read_text())
        os.chmod(tmp / "tls.key", 0o644)  # nginx reads it as root, HAProxy too; a throwaway key
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
            " server {{ listen 127.0.0.1:{p}; listen 127.0.0.1:{h} http2; listen 127.0.0.1:{t} ssl http2;"
            " ssl_certificate {c}; ssl_certificate_key {k};"
            " location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";"
            " proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme;"
            " proxy_set_header X-Forwarded-Host $http_host; }} }} }}\n")
            .format(d=side, a=APP, p=PORTS["nginx"][0], h=PORTS["nginx"][1], t=PORTS["nginx"][2],
                    c=tmp / "tls.crt", k=tmp / "tls.key"))
        (tmp / "haproxy.cfg").write_text(
            "global\n  nbthread 1\n  maxconn 9000\n"
            "defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n"
            "  option http-keep-alive\n"
            f"frontend fe\n  bind 127.0.0.1:{PORTS['haproxy'][0]}\n  bind 127.0.0.1:{PORTS['haproxy'][1]} proto h2\n"
            f"  bind 127.0.0.1:{PORTS['haproxy'][2]} ssl crt {tmp / 'tls.pem'} alpn h2,http/1.1\n"
            "  option forwardfor\n"
            # The cheapest rules that give the app the same fields as drainproxy for the bench's
            # clients (which send none of them): add, not set (which deletes first).
            "  http-request add-header X-Forwarded-Proto https if { ssl_fc }\n"
            "  http-request add-header X-Forwarded-Proto http if !{ ssl_fc }\n"
            "  http-request add-header X-Forwarded-Host %[req.hdr(host)]\n"
            "  default_backend app\n"
            f"backend app\n  http-reuse always\n  server app 127.0.0.1:{APP}\n")
        (tmp / "drainproxy.yaml").write_text(drainproxy_config(PORTS["drainproxy"][0], ADMIN))
        (tmp / "drainproxy-tls.yaml").write_text(drainproxy_config(PORTS["drainproxy"][2], DP_TLS_ADMIN) +
                                                 f"tls:\n  cert: {tmp}/tls.crt\n  key: {tmp}/tls.key\n")
        (tmp / "relay.cfg").write_text(
            "global\n  nbthread 1\n  maxconn 9000\n"
            "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n"
            f"listen relay\n  bind 127.0.0.1:{RELAYS['relay']}\n  server app 127.0.0.1:{APP}\n")
        refuse_taken(*RELAYS.values(), APP, APP_H2, ADMIN, DP_TLS_ADMIN, *{port for ports in PORTS.values() for port in ports if port})
        nginx = need("nginx")
        self.start("app", ["taskset", "-c", "1", nginx, "-c", str(app / "nginx.conf"), "-p", str(app)], APP)
        self.start("nginx", ["taskset", "-c", "1", nginx, "-c", str(side / "nginx.conf"), "-p", str(side)], PORTS["nginx"][0])
        self.start("haproxy", ["taskset", "-c", "1", need("haproxy"), "-f", str(tmp / "haproxy.cfg")], PORTS["haproxy"][0])
        self.start("relay", ["taskset", "-c", "1", need("haproxy"), "-f", str(tmp / "relay.cfg")], RELAYS["relay"])
        self.start("tokio relay", ["taskset", "-c", "1", str(RELAY_BIN), f"127.0.0.1:{RELAYS['tokio relay']}",
                                   f"127.0.0.1:{APP}"], RELAYS["tokio relay"])
        self.start("drainproxy", ["taskset", "-c", "1", str(drainproxy), "--config", str(tmp / "drainproxy.yaml")],
                   PORTS["drainproxy"][0])
        self.start("drainproxy-tls", ["taskset", "-c", "1", str(drainproxy), "--config", str(tmp / "drainproxy-tls.yaml")],
                   PORTS["drainproxy"][2])

    def start(self, name, cmd, port):
        self.procs[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)

    def pids(self, target, workload=None):
        """The processes serving `target` for `workload` (drainproxy's TLS rows: the TLS one)."""
        if workload in TLS_WORKLOADS and f"{target}-tls" in self.procs:
            target = f"{target}-tls"
        return pids_of(self.procs[target]) if target in self.procs else []

    def stop(self):
        for p in self.procs.values():
            p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def run_load(workload, ports, seconds, tmp):
    """(req/s, requests, errors) of one closed-loop run; ports: (HTTP/1.1, h2c, TLS)."""
    tool, path, extra = WORKLOADS[workload]
    h1, h2, tls = ports
    base = f"https://127.0.0.1:{tls}" if tool.endswith("-tls") else f"http://127.0.0.1:{h1}"
    if tool.startswith("h2load"):
        url = f"https://127.0.0.1:{tls}{path}" if tool.endswith("-tls") else f"http://127.0.0.1:{h2}{path}"
        out = sh("taskset", "-c", "0", need("h2load"), "-c", "32", "-m", "10", "-D", str(seconds), url).stdout
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
    out = sh(*cmd, f"{base}{path}").stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    n = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, n, errors + (int(non2xx.group(1)) if non2xx else 0)


def measure(workload, ports, seconds, tmp, pids, app):
    """One closed-loop run and what it cost: (req/s, errors, the proxy's user and system µs per
    request, its preemptions and the app's sleeps per 1,000 requests). `pids`: the proxy's
    processes (none for direct, whose proxy figures are then None); `app`: the app's."""
    before, pre_before, app_before = cpu_ticks(pids), preemptions(pids), sleeps(app)
    rps, n, errs = run_load(workload, ports, seconds, tmp)
    after, pre_after, app_after = cpu_ticks(pids), preemptions(pids), sleeps(app)
    user, system = ((a - b) / CLK_TCK * 1e6 / n if n and pids else None for a, b in zip(after, before))
    pre = (pre_after - pre_before) * 1000 / n if n and pids else None
    app_sleeps = (app_after - app_before) * 1000 / n if n else None
    return rps, errs, user, system, pre, app_sleeps


IDLE_SETTLE = 5.0


def idle_rss(pids, port, count):
    """RSS of a proxy holding `count` idle keep-alive connections, each of which served one
    request, measured IDLE_SETTLE seconds after the last response (idle connections are
    long-lived; what counts is what they hold once settled)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /0 HTTP/1.1\r\nHost: bench\r\n\r\n")
            socks.append(s)
        for s in socks:
            s.settimeout(5)
            s.recv(4096)
        time.sleep(IDLE_SETTLE)
        return rss_kib(pids)
    finally:
        for s in socks:
            s.close()


ALLOCATORS = ("system", "jemalloc", "mimalloc")
ALLOC_PORT = 18400  # variant k listens on ALLOC_PORT + 10k, its admin port one above


def build_allocator_variants():
    """drainproxy built once per allocator feature, copied aside; returns name -> path."""
    out = ROOT / "target" / "bench-alloc"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ALLOCATORS:
        features = {"system": ["--no-default-features"], "jemalloc": [], "mimalloc": ["--features", "mimalloc"]}[name]
        subprocess.run(["cargo", "build", "--release", "--bin", "drainproxy", *features], cwd=ROOT, check=True)
        dest = out / f"drainproxy-{name}"
        shutil.copyfile(ROOT / "target/release/drainproxy", dest)
        dest.chmod(0o755)
        paths[name] = dest
    # Leave the default build in place for the rest of the bench.
    subprocess.run(["cargo", "build", "--release", "--bin", "drainproxy"], cwd=ROOT, check=True)
    return paths


def run_allocators(paths, tmp, args):
    """The allocator variants side by side: throughput and CPU on h1 0 B and h2, RSS idle,
    after a burst, 60 s after it, and with 10k idle connections."""
    procs = {}
    try:
        for k, (name, path) in enumerate(paths.items()):
            port = ALLOC_PORT + 10 * k
            refuse_taken(port, port + 1)
            cfg = tmp / f"alloc-{name}.yaml"
            cfg.write_text(drainproxy_config(port, port + 1))
            procs[name] = (subprocess.Popen(["taskset", "-c", "1", str(path), "--config", str(cfg)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port)
            wait_port(port)
        time.sleep(0.5)
        rows = {name: {"idle": rss_kib([p.pid])} for name, (p, _) in procs.items()}
        runs = {}
        for _ in range(args.reps):
            for workload in ("h1 0 B", "h2 1 KiB"):
                for name, (p, port) in procs.items():
                    before = cpu_ticks([p.pid])
                    rps, n, _ = run_load(workload, (port, port, None), args.seconds, tmp)
                    after = cpu_ticks([p.pid])
                    us = sum(after) - sum(before)
                    runs.setdefault((workload, name), []).append((rps, us / CLK_TCK * 1e6 / n if n else None))
        for name, (p, _) in procs.items():
            rows[name]["peak"] = rss_kib([p.pid], "VmHWM")
            rows[name]["after the load"] = rss_kib([p.pid])
        time.sleep(60)
        for name, (p, port) in procs.items():
            rows[name]["60 s later"] = rss_kib([p.pid])
        for name, (p, port) in procs.items():
            rows[name]["10k idle conns"] = idle_rss([p.pid], port, 10000)
        return rows, runs
    finally:
        for p, _ in procs.values():
            p.kill()
            p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="one repetition of 2 s per workload and rate, no idle-connection or allocator runs")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--no-allocators", action="store_true", help="skip the allocator comparison")
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--render", metavar="JSON", help="only render the report from a run's raw figures (bench/results.json)")
    args = ap.parse_args()
    if args.render:
        raw = json.loads(Path(args.render).read_text())
        args.reps, args.seconds, args.quick = raw["reps"], raw["seconds"], raw["quick"]
        results = {tuple(k.split("|")): v for k, v in raw["results"].items()}
        latency = {tuple(k.split("|")): v for k, v in raw["latency"].items()}
        allocators = raw["allocators"] and (raw["allocators"][0], {tuple(k.split("|")): v for k, v in raw["allocators"][1].items()})
        report = render(results, latency, {}, raw["memory"], allocators, args)
        Path(args.out).write_text(report)
        (Path(args.out).parent / "results.svg").write_text(chart(results))
        print(report)
        return
    if args.quick:
        args.reps, args.seconds, args.no_allocators = 1, 2, True
    if os.cpu_count() < 2:
        sys.exit("needs 2 CPUs: the load generator and the pod must not share one")
    oha = oha_path()
    # Builds first: nothing may compile while something is measured.
    variants = None if args.no_allocators else build_allocator_variants()
    drainproxy = ROOT / "target" / "release" / "drainproxy"
    if not drainproxy.exists():
        subprocess.run(["cargo", "build", "--release", "--bin", "drainproxy"], cwd=ROOT, check=True)
    if not RELAY_BIN.exists():
        subprocess.run(["cargo", "build", "--release", "--example", "relay"], cwd=ROOT, check=True)
    tmp = Path(tempfile.mkdtemp(prefix="drainproxy-bench-"))
    stack = Stack(tmp, drainproxy)
    time.sleep(0.5)
    idle_at_start = {t: rss_kib(stack.pids(t)) for t in PROXIES}
    app = stack.pids("app")  # the app's sleeps are counted behind every target
    # (workload, target) -> list of (rps, user µs/req, system µs/req, the proxy's preemptions and the app's
    # sleeps per 1k requests)
    results = {}
    latency = {}  # (rate label, target) -> list of percentile dicts
    errors = {}
    memory = {}
    allocators = None
    try:
        for rep in range(args.reps):
            for workload in WORKLOADS:
                for target in [*PORTS, *(RELAYS if workload in RELAY_WORKLOADS else [])]:
                    ports = PORTS.get(target) or (RELAYS[target], None, None)
                    if workload in TLS_WORKLOADS and ports[2] is None:
                        continue
                    pids = stack.pids(target, workload) if target != "direct" else []
                    rps, errs, user, system, pre, app_sleeps = measure(workload, ports, args.seconds, tmp, pids, app)
                    results.setdefault((workload, target), []).append((rps, user, system, pre, app_sleeps))
                    errors[(workload, target)] = errors.get((workload, target), 0) + errs
                    print(f"rep {rep + 1} {workload:<28} {target:<11} {rps:>10.0f} req/s"
                          + (f" {user + system:6.1f} us/req ({user:.1f} user)" if user is not None else "")
                          + (f"  {errs} errors" if errs else ""), flush=True)
        slowest = min(med([r[0] for r in results[("h1 0 B", p)]]) for p in PROXIES)
        rates = {"1k req/s": 1000, "5k req/s": 5000, f"80% of the slowest peer ({int(slowest * 0.8):,} req/s)": int(slowest * 0.8)}
        for rep in range(args.reps):
            for label, rate in rates.items():
                for target in PORTS:
                    pct, bad = open_loop(oha, PORTS[target][0], rate, args.seconds)
                    latency.setdefault((label, target), []).append(pct)
                    errors[(f"latency {label}", target)] = errors.get((f"latency {label}", target), 0) + bad
                    print(f"rep {rep + 1} latency at {label:<40} {target:<10} p50 {pct['p50']:.3f} p99 {pct['p99']:.3f} "
                          f"p99.9 {pct['p99.9']:.3f} ms" + (f"  {bad} errors" if bad else ""), flush=True)
        for target in PROXIES:
            pids = stack.pids(target)
            row = {"idle (at start)": idle_at_start[target], "peak (under load)": rss_kib(pids, "VmHWM"),
                   "after the load runs": rss_kib(pids)}
            if not args.quick:
                row["1k idle conns"] = idle_rss(pids, PORTS[target][0], 1000)
                row["10k idle conns"] = idle_rss(pids, PORTS[target][0], 8000 if target == "haproxy" else 10000)
            memory[target] = row
        if variants:
            allocators = run_allocators(variants, tmp, args)
    finally:
        stack.stop()
    if not args.quick:
        # The raw figures first: the report can be rendered again from them (--render).
        raw = {"reps": args.reps, "seconds": args.seconds, "quick": args.quick,
               "results": {"|".join(k): v for k, v in results.items()},
               "latency": {"|".join(k): v for k, v in latency.items()}, "memory": memory,
               "allocators": allocators and [allocators[0], {"|".join(k): v for k, v in allocators[1].items()}]}
        (Path(args.out).parent / "results.json").write_text(json.dumps(raw, indent=1))
    report = render(results, latency, errors, memory, allocators, args)
    print(report)
    if not args.quick:
        Path(args.out).write_text(report)
        (Path(args.out).parent / "results.svg").write_text(chart(results))
    bad = [k for k, v in errors.items() if v]
    if bad:
        sys.exit(f"errors during load: {bad}")


PROXIES = ("drainproxy", "nginx", "haproxy")
TARGETS = {  # issue: performance
    "throughput h1 0 B and 1 KiB": 1.25, "throughput elsewhere": 1.0, "CPU": 0.8,
    "idle KiB": 8 * 1024, "1k KiB": 24 * 1024, "10k KiB": 128 * 1024,
}


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values, unit, signed=False):
    """The lowest and highest of per-repetition figures, as `low – high` with a unit."""
    f = "{:+.3f}" if signed else "{:.2f}"
    lo, hi = min(values), max(values)
    return f.format(lo) + unit if len(values) == 1 else f"{f.format(lo)} – {f.format(hi)}{unit}"


def fmt(v, d=0):
    return "-" if v is None else f"{v:,.{d}f}"


def floor_verdict(floor):
    """What the byte relays' figures leave of the 1.25× throughput and 0.8× CPU targets."""
    through = max(v[2] for relays in floor.values() for v in relays.values())
    said = [f"the 1.25× throughput target lies beyond it ({through:.2f}× at best)" if through < 1.25
            else f"a relay reaches the 1.25× throughput target ({through:.2f}×), so it is not beyond the floor in this run"]
    fw, (_, us, _, c) = min(((w, v) for w, relays in floor.items() for v in relays.values()), key=lambda wv: wv[1][3])
    if c > 0.8:
        said.append(f"so does the 0.8× CPU target ({c:.2f}× at best)")
    else:
        room = 0.8 * us / c - us
        said.append(f"a relay meets the 0.8× CPU target on {fw} ({c:.2f}×), which leaves an HTTP proxy "
                    f"{room:.1f} µs per request for all of its HTTP work (parsing, headers, pooling)")
    return "; ".join(said)


def render(results, latency, errors, memory, allocators, args):
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    versions = {
        "nginx": subprocess.run([need("nginx"), "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1],
        "haproxy": sh(need("haproxy"), "-v").stdout.split()[2],
        "oha": sh(oha_path(), "--version").stdout.split()[-1],
        "drainproxy": sh(str(ROOT / "target/release/drainproxy"), "--version").stdout.split()[-1],
    }
    kernel = os.uname().release
    lines = [
        "# Sidecar benchmark",
        "",
        f"{time.strftime('%Y-%m-%d', time.gmtime())}; {os.cpu_count()} CPUs ({cpu}), Linux {kernel}; nginx {versions['nginx']}, "
        f"HAProxy {versions['haproxy']}, oha {versions['oha']}, drainproxy {versions['drainproxy']} (default build: jemalloc, "
        f"`runtime.threads: 1`). App (nginx, static files, one worker) and proxy share CPU 1; the load generator runs alone "
        f"on CPU 0 (wrk -t1 -c32; h2load -c32 -m10; oha -c32, one worker thread). {args.reps} interleaved repetitions of "
        f"{args.seconds} s; medians. Command: `bench/proxy/bench.py`{' --quick' if args.quick else ''}.",
        "",
        "## Throughput and CPU per request",
        "",
        "CPU is the proxy's time over the requests it served, in µs per request: user + kernel = total. "
        "Per repetition: the lowest and highest of the ratios each repetition gave on its own (its targets ran back to "
        "back), for throughput and for CPU; a throughput range that spans 1.00 is parity within this machine's noise.",
        "",
        "| workload | direct req/s | drainproxy req/s | nginx req/s | HAProxy req/s | drainproxy / best peer | per repetition | CPU drainproxy | CPU nginx | CPU HAProxy | CPU ratio to best peer | CPU per repetition |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios, cpu_ratios = {}, {}
    floor = {}  # workload -> relay -> (req/s, µs/req, ratio to the better peer's req/s, to its CPU)
    for w in WORKLOADS:
        if not results.get((w, "drainproxy")):
            continue  # a run from before this workload existed (--render)
        targets = (*PORTS, *RELAYS)
        rps = {t: med([r[0] for r in results.get((w, t), [])]) for t in targets}
        user = {t: med([r[1] for r in results.get((w, t), [])]) for t in targets}
        system = {t: med([r[2] for r in results.get((w, t), [])]) for t in targets}
        us = {t: (user[t] + system[t]) if user[t] is not None else None for t in targets}
        best = max(rps[p] for p in PEERS)
        best_cpu = min(us[p] for p in PEERS if us[p] is not None)
        ratios[w] = rps["drainproxy"] / best
        cpu_ratios[w] = us["drainproxy"] / best_cpu
        for relay in RELAYS:
            if rps[relay] is not None and us[relay] is not None:
                floor.setdefault(w, {})[relay] = (rps[relay], us[relay], rps[relay] / best, us[relay] / best_cpu)
        # Each repetition's (drainproxy, nginx, HAProxy) figures, which ran back to back.
        reps = list(zip(*(results[(w, t)] for t in ("drainproxy", *PEERS))))
        per_rep = spread([d[0] / max(a[0], b[0]) for d, a, b in reps], "×")
        cpu_per_rep = spread([(d[1] + d[2]) / min(a[1] + a[2], b[1] + b[2]) for d, a, b in reps], "")
        split = lambda t: f"{user[t]:.1f} + {system[t]:.1f} = **{us[t]:.1f}**"
        lines.append(f"| {w} | {fmt(rps['direct'])} | {fmt(rps['drainproxy'])} | {fmt(rps['nginx'])} | {fmt(rps['haproxy'])} | "
                     f"**{ratios[w]:.2f}×** | {per_rep} | {split('drainproxy')} | {split('nginx')} | {split('haproxy')} | "
                     f"{cpu_ratios[w]:.2f} | {cpu_per_rep} |")
    lines += ["", "## Open-loop latency", "",
              "oha at a fixed rate with `--latency-correction` (coordinated omission corrected), HTTP/1.1 keep-alive, "
              "0 B responses. Direct: the app's own latency; for each proxy, what it adds over direct (ms).", "",
              "| rate | direct p50 / p99 / p99.9 | drainproxy added | nginx added | HAProxy added | drainproxy p99 added vs best peer | per repetition |",
              "|---|---|---|---|---|---|---|"]
    p99_5k = None
    for label in dict.fromkeys(k[0] for k in latency):
        pct = {t: {q: med([d[q] for d in latency[(label, t)]]) for q in ("p50", "p99", "p99.9")} for t in PORTS}
        add = {t: {q: pct[t][q] - pct["direct"][q] for q in pct[t]} for t in PROXIES}
        cell = lambda d: f"{d['p50']:.3f} / {d['p99']:.3f} / {d['p99.9']:.3f}"
        best_peer = min(add[p]["p99"] for p in PEERS)
        verdict = f"{add['drainproxy']['p99'] - best_peer:+.3f} ms"
        per_rep = spread([d["p99"] - min(a["p99"], b["p99"]) for d, a, b in
                          zip(*(latency[(label, t)] for t in ("drainproxy", *PEERS)))], " ms", signed=True)
        if label.startswith("5k"):
            p99_5k = (add["drainproxy"]["p99"], best_peer)
        lines.append(f"| {label} | {cell(pct['direct'])} | {cell(add['drainproxy'])} | {cell(add['nginx'])} | "
                     f"{cell(add['haproxy'])} | {verdict} | {per_rep} |")
    cols = list(next(iter(memory.values())).keys())
    lines += ["", "## Memory (RSS, KiB)", "",
              f"Idle connections each served one request and are measured {IDLE_SETTLE:.0f} s after the last response. "
              "HAProxy's 10k figure is for 8,000 connections: with a 20,000 file-descriptor limit it cannot hold 10,000 "
              "(it reserves two descriptors per connection).", "",
              "| proxy | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for t, row in memory.items():
        lines.append(f"| {t} | " + " | ".join(fmt(v) for v in row.values()) + " |")
    if allocators:
        rows, runs = allocators
        acols = list(next(iter(rows.values())).keys())
        lines += ["", "## Allocators", "",
                  "drainproxy built with each global allocator (`cargo build --release` for jemalloc, the default; "
                  "`--no-default-features` for the system's; `--features mimalloc`), "
                  "run side by side against the same app; RSS in KiB.", "",
                  "| allocator | h1 0 B req/s | CPU µs/req | h2 1 KiB req/s | CPU µs/req | " + " | ".join(f"RSS {c}" for c in acols) + " |",
                  "|---|---|---|---|---|" + "---|" * len(acols)]
        for name, row in rows.items():
            h1 = runs[("h1 0 B", name)]
            h2 = runs[("h2 1 KiB", name)]
            lines.append(f"| {name} | {fmt(med([r for r, _ in h1]))} | {fmt(med([u for _, u in h1]), 1)} | "
                         f"{fmt(med([r for r, _ in h2]))} | {fmt(med([u for _, u in h2]), 1)} | "
                         + " | ".join(fmt(v) for v in row.values()) + " |")
    lines += ["", "## Commands", "", "Each run, as the bench issues it (`S` seconds, `PORT` the target's port, `R` the rate):", "", "```",
              "taskset -c 0 wrk -t1 -c32 -dSs http://127.0.0.1:PORT/0            # and /1k, /16k, /1m",
              "taskset -c 0 wrk -t1 -c32 -dSs -s post.lua http://127.0.0.1:PORT/post   # 16 KiB POST bodies",
              "taskset -c 0 wrk -t1 -c32 -dSs -H 'Connection: close' http://127.0.0.1:PORT/1k",
              "taskset -c 0 h2load -c32 -m10 -D S http://127.0.0.1:PORT/1k",
              "taskset -c 0 wrk -t1 -c32 -dSs https://127.0.0.1:PORT/1k      # TLS; also with -H 'Connection: close'",
              "taskset -c 0 h2load -c32 -m10 -D S https://127.0.0.1:PORT/1k  # TLS, h2 by ALPN",
              "taskset -c 0 oha -z Ss -w -q R -c 32 --latency-correction --no-tui --output-format json --worker-threads 1 http://127.0.0.1:PORT/0",
              "```",
              "",
              "The TLS rows use one ECDSA P-256 certificate (`openssl req -x509 -newkey ec`) for all three proxies, each "
              "offering h2 and http/1.1 by ALPN (nginx `listen ssl http2`, HAProxy `bind ssl crt alpn h2,http/1.1`, "
              "drainproxy `tls:` in a second process on its own port); clients negotiate TLS 1.3. They are not among "
              "the issue's workloads and have no target.",
              "",
              "The app, nginx, HAProxy, the two byte relays and drainproxy are started with `taskset -c 1`; their configurations are written by "
              "`bench/proxy/bench.py` (class `Stack`). Each proxy adds the forwarding fields drainproxy adds to every request "
              "(`X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`: nginx with `proxy_set_header`, HAProxy with "
              "`option forwardfor` and `http-request add-header`), so the app parses the same request behind each. CPU time is read from `/proc/<pid>/stat` (utime, stime) before and "
              "after each run, RSS from `/proc/<pid>/status` (VmRSS; VmHWM for the peak)."]
    # What bounds the small-response figures, computed from this run.
    w = "h1 0 B"

    def medians(i, targets):
        """Each target's median of field `i` on `w`, when every repetition recorded it (older files
        have no fields past the CPU times)."""
        if all(len(x) > i for t in targets for x in results[(w, t)]):
            return {t: med([x[i] for x in results[(w, t)]]) for t in targets}
        return None

    u, k, r = medians(1, PROXIES), medians(2, PROXIES), medians(0, PORTS)
    best = max(PEERS, key=lambda t: r[t])
    app_us = 1e6 / r[best] - (u[best] + k[best])  # the app's share of the core per request
    bound = 1e6 / (app_us + k["drainproxy"])
    lines += ["", "## What limits the small-response figures", ""]
    if floor:
        def cells(relay):
            return "; ".join(f"{fw}: {v[relay][0]:,.0f} req/s at {v[relay][1]:.1f} µs per request, {v[relay][2]:.2f}× the "
                             f"better peer's throughput at {v[relay][3]:.2f}× its CPU" for fw, v in floor.items() if relay in v)
        reached = "; ".join(f"{RELAY_NAMES[relay]} reaches {cells(relay)}" for relay in RELAYS
                            if any(relay in v for v in floor.values()))
        lines += [f"The floor, measured in the same run: byte relays that parse no HTTP at all (one app connection per "
                  f"client connection, pinned like the others; they pass each request as it came, so the app behind them "
                  f"parses no forwarding fields and does a little less work than behind the proxies). {reached}. Every proxy here makes the same socket calls "
                  f"per request as those relays, so none can pass them on this topology: {floor_verdict(floor)}.", ""]
        tokio = results.get((w, "tokio relay"))
        if tokio:
            tu, tk = med([x[1] for x in tokio]), med([x[2] for x in tokio])
            lines += [f"On {w}, the relay on drainproxy's own runtime takes {tu:.1f} µs of user and {tk:.1f} µs of kernel "
                      f"time per request; drainproxy takes {u['drainproxy'] - tu:+.1f} µs of user time more (its HTTP work: "
                      f"parsing, header rewriting, pooling) and {k['drainproxy'] - tk:+.1f} µs of "
                      "kernel time.", ""]
    lines += [f"On {w}, kernel time per request is {k['drainproxy']:.1f} µs for drainproxy, {k['nginx']:.1f} for nginx and "
              f"{k['haproxy']:.1f} for HAProxy: each makes the same four socket calls per request (`strace -c`). User time is "
              f"{u['drainproxy']:.1f}, {u['nginx']:.1f} and {u['haproxy']:.1f} µs. The app takes about {app_us:.1f} µs of the "
              f"shared core per request, so drainproxy with no user time at all would reach about {bound:,.0f} req/s, "
              f"{bound / r[best]:.2f}× the better peer, at {k['drainproxy'] / (u[best] + k[best]):.2f}× its CPU."]
    pre = medians(3, PROXIES)
    if pre:
        lines[-1] += (f" The scheduler also takes the core from each proxy to run the app it woke: per 1,000 requests, "
                      f"{pre['drainproxy']:.0f} involuntary context switches for drainproxy, {pre['nginx']:.0f} for nginx and "
                      f"{pre['haproxy']:.0f} for HAProxy (`nonvoluntary_ctxt_switches` in `/proc/<pid>/status`); each is "
                      "a switch to the app and back, part of the kernel time above.")
    naps = medians(4, PORTS)
    if naps:
        lines[-1] += (f" The app, for its part, ran out of requests and slept {naps['direct']:.0f} times per 1,000 requests "
                      f"when the load generator on the other core sent to it directly, {naps['drainproxy']:.0f} times "
                      f"behind drainproxy, {naps['nginx']:.0f} behind nginx and {naps['haproxy']:.0f} behind HAProxy "
                      "(`voluntary_ctxt_switches`): the fewer, the more requests it found waiting each time it woke, and "
                      "the fewer switches between it and the proxy.")
    # The targets, each with its verdict.
    mem = memory["drainproxy"]
    check = lambda ok: "met" if ok else "**missed**"
    lines += ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    for w in ("h1 0 B", "h1 1 KiB"):
        relay = f" (byte-relay floor {max(v[2] for v in floor[w].values()):.2f}×)" if w in floor else ""
        lines.append(f"| throughput ≥ 1.25× the better peer, {w} | {ratios[w]:.2f}×{relay} | {check(ratios[w] >= 1.25)} |")
    others = {w: r for w, r in ratios.items() if w not in ("h1 0 B", "h1 1 KiB") and w not in TLS_WORKLOADS}
    worst = min(others, key=others.get)
    lines.append(f"| throughput ≥ 1.0× elsewhere | lowest {others[worst]:.2f}× ({worst}) | {check(others[worst] >= 1.0)} |")
    cpu_ratios = {w: r for w, r in cpu_ratios.items() if w not in TLS_WORKLOADS}
    worst_cpu = max(cpu_ratios, key=cpu_ratios.get)
    relay = f" (byte-relay floor {min(v[3] for v in floor['h1 0 B'].values()):.2f}×)" if "h1 0 B" in floor else ""
    lines.append(f"| CPU per request ≤ 0.8× the better peer | {cpu_ratios['h1 0 B']:.2f}× on h1 0 B{relay}; highest {cpu_ratios[worst_cpu]:.2f}× ({worst_cpu}) | "
                 f"{check(all(r <= 0.8 for r in cpu_ratios.values()))} |")
    if p99_5k:
        lines.append(f"| p99 added latency at 5k req/s ≤ the better peer's | {p99_5k[0]:.3f} ms vs {p99_5k[1]:.3f} ms | {check(p99_5k[0] <= p99_5k[1])} |")
    lines.append(f"| RSS ≤ 8 MB idle | {mem['idle (at start)'] / 1024:.1f} MB | {check(mem['idle (at start)'] <= TARGETS['idle KiB'])} |")
    if "1k idle conns" in mem:
        lines.append(f"| RSS ≤ 24 MB with 1k idle connections | {mem['1k idle conns'] / 1024:.1f} MB | {check(mem['1k idle conns'] <= TARGETS['1k KiB'])} |")
        lines.append(f"| RSS ≤ 128 MB with 10k idle connections | {mem['10k idle conns'] / 1024:.1f} MB | {check(mem['10k idle conns'] <= TARGETS['10k KiB'])} |")
    return "\n".join(lines) + "\n"


def chart(results):
    """Horizontal bars: throughput relative to the better peer, per workload."""
    rows = []
    for w in WORKLOADS:
        if not results.get((w, "drainproxy")):
            continue
        rps = {t: med([r[0] for r in results.get((w, t), [])]) for t in PORTS}
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
