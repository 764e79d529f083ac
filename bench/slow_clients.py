"""Slow clients against `newsbot serve`: are real deliveries still answered while many
connections send part of a request and wait?

For each worker (gunicorn's gthread, the worker newsbot used before bot.serving, and newsbot's
buffering worker) and each attack size (0, 1× and 10× the server's threads by default), the
same app on a fresh SQLite database is started with the same gunicorn settings, and an
attacker holds that many connections open for the whole run, in three equal kinds:

- "head": a request line and a header (~80 bytes), then one more header line every second,
  never the blank line (slowloris: a per-byte inactivity timeout never fires);
- "idle": connected, sends nothing;
- "body": a complete head with Content-Length: 1000 and 20 bytes of body, then nothing.

A connection the server closes is opened again at once, so the attack stays at full size.
Meanwhile signed `本周` deliveries arrive at a fixed rate, each on a new connection with
WeChat's 5 s timeout, and /healthz is asked once a second. The table gives how many were
answered within 1 s and within 5 s, their latency percentiles, and how many attack connections
the server closed (what its deadlines did)."""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common
from _common import Table, child_env, note, percentile

WECHAT_TIMEOUT_S = 5.0
ANSWER_WITHIN_S = 1.0
WORKERS = {
    "gthread": "gunicorn gthread (before)",
    "newsbot": "newsbot buffering worker (after)",
}
KINDS = ("head", "idle", "body")


# --------------------------------------------------------------------------- the server


def serve(config: str, worker: str, max_connections: int) -> None:
    """``--serve``: newsbot's gunicorn application, optionally on the gthread worker."""
    from bot.logs import setup_logging
    from bot.server import NewsbotServer, ServerOptions
    from bot.settings import load_settings

    settings = load_settings(config)
    setup_logging("INFO", settings.server.log_format)

    class BenchServer(NewsbotServer):
        def gunicorn_config(self) -> dict[str, Any]:
            cfg = dict(super().gunicorn_config())
            if worker == "gthread":
                cfg["worker_class"] = "gthread"
            if max_connections:
                cfg["worker_connections"] = max_connections
            return cfg

    srv = settings.server
    BenchServer(settings, ServerOptions(host=srv.host, port=srv.port, workers=srv.workers,
                                        threads=srv.threads)).run()


@contextlib.contextmanager
def server(worker: str, db_url: str, workdir: Path, workers: int, threads: int,
           max_connections: int = 0) -> Iterator[tuple[int, subprocess.Popen[bytes], Path]]:
    port = _common.free_port()
    sections = _common.base_sections(db_url, port=port)
    sections["server"].update(workers=workers, threads=threads)
    config = _common.write_config(workdir / f"{worker}-{port}.toml", sections)
    log = workdir / f"{worker}-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", "--config", str(config),
             "--worker", worker, "--max-connections", str(max_connections)],
            stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=workdir)
    try:
        wait_healthy(port, proc, log, workers)
        yield port, proc, log
    finally:
        _common.stop_process(proc)


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path, workers: int) -> None:
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            ok = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            if ok and log.read_text(errors="replace").count("worker ready") >= workers:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server not healthy within 30 s:\n{log.read_text()}")


# --------------------------------------------------------------------------- the attacker


class Attacker:
    """Holds ``count`` slow connections open, reopening any the server closes."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.socks: list[tuple[str, socket.socket]] = []
        self.closed_by_server = 0
        self.got_408 = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, kind: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        if kind == "head":
            sock.sendall(b"POST /wechat?signature=0&timestamp=0&nonce=0 HTTP/1.1\r\n"
                         b"Host: 127.0.0.1\r\n")
        elif kind == "body":
            sock.sendall(b"POST /wechat?signature=0&timestamp=0&nonce=0 HTTP/1.1\r\n"
                         b"Host: 127.0.0.1\r\nContent-Type: text/xml\r\n"
                         b"Content-Length: 1000\r\n\r\n<xml><ToUserName><![")
        sock.setblocking(False)
        return sock

    def __enter__(self) -> Attacker:
        for i in range(self.count):
            kind = KINDS[i % len(KINDS)]
            self.socks.append((kind, self._open(kind)))
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for _, sock in self.socks:
            sock.close()

    def _run(self) -> None:
        tick = 0
        while not self.stop.wait(1.0):
            tick += 1
            for i, (kind, sock) in enumerate(self.socks):
                if self._closed(sock) or (kind == "head" and not self._trickle(sock, tick)):
                    sock.close()
                    self.closed_by_server += 1
                    with contextlib.suppress(OSError):
                        self.socks[i] = (kind, self._open(kind))

    def _closed(self, sock: socket.socket) -> bool:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if data.startswith(b"HTTP/1.1 408"):
            self.got_408 += 1
        return True  # an answer (the server gave up on us) or EOF

    @staticmethod
    def _trickle(sock: socket.socket, tick: int) -> bool:
        try:
            sock.send(b"X-Slow-%d: y\r\n" % tick)
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------- the deliveries


def delivery_request(port: int, n: int) -> tuple[str, bytes]:
    from bot.wechat.webhook import sign

    ts = str(int(time.time()))
    nonce = uuid.uuid4().hex[:12]
    query = f"signature={sign(_common.TOKEN, ts, nonce)}&timestamp={ts}&nonce={nonce}"
    body = (f"<xml><ToUserName><![CDATA[gh_bench]]></ToUserName>"
            f"<FromUserName><![CDATA[o_bench_{n % 50:03d}]]></FromUserName>"
            f"<CreateTime>{ts}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[本周]]></Content>"
            f"<MsgId>{secrets.randbelow(10**15)}</MsgId></xml>")
    return f"http://127.0.0.1:{port}/wechat?{query}", body.encode()


@dataclass
class Probe:
    ok: bool
    seconds: float


def deliver(http: Any, port: int, n: int, expect: str) -> Probe:
    import httpx

    url, body = delivery_request(port, n)
    started = time.perf_counter()
    try:
        resp = http.post(url, content=body, headers={"Content-Type": "text/xml"})
        ok = resp.status_code == 200 and expect in resp.text
    except httpx.HTTPError:
        ok = False
    return Probe(ok, time.perf_counter() - started)


def health(http: Any, port: int) -> Probe:
    import httpx

    started = time.perf_counter()
    try:
        ok = http.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    except httpx.HTTPError:
        ok = False
    return Probe(ok, time.perf_counter() - started)


@dataclass
class Row:
    worker: str
    slow: int
    sent: int
    within_1s: int
    within_5s: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    health_sent: int
    health_within_1s: int
    closed_by_server: int
    got_408: int
    latencies_ms: list[float] = field(default_factory=list, repr=False)


def measure(worker: str, port: int, slow: int, duration: float, rate: float,
            expect: str) -> Row:
    import httpx

    # One client (thread-safe), no connection reuse: every request opens a new connection, as
    # a WeChat delivery may, and the client's own setup stays out of the timings.
    http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0),
                        timeout=WECHAT_TIMEOUT_S)
    with http, Attacker(port, slow) as attacker:
        time.sleep(0.5)  # every slow connection accepted and stalled
        futures = []
        health_futures = []
        with ThreadPoolExecutor(max_workers=64) as pool:
            started = time.monotonic()
            n = 0
            next_health = started
            while (now := time.monotonic()) < started + duration:
                futures.append(pool.submit(deliver, http, port, n, expect))
                n += 1
                if now >= next_health:
                    health_futures.append(pool.submit(health, http, port))
                    next_health += 1.0
                time.sleep(max(0.0, started + n / rate - time.monotonic()))
            probes = [f.result() for f in futures]
            healths = [f.result() for f in health_futures]
        closed, got_408 = attacker.closed_by_server, attacker.got_408
    answered = sorted(p.seconds * 1000 for p in probes if p.ok)
    return Row(
        worker=worker, slow=slow, sent=len(probes),
        within_1s=sum(1 for p in probes if p.ok and p.seconds < ANSWER_WITHIN_S),
        within_5s=len(answered),
        p50_ms=percentile(answered, 50), p99_ms=percentile(answered, 99),
        max_ms=answered[-1] if answered else 0.0,
        health_sent=len(healths),
        health_within_1s=sum(1 for p in healths if p.ok and p.seconds < ANSWER_WITHIN_S),
        closed_by_server=closed, got_408=got_408, latencies_ms=answered)


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    print(_common.machine_line())
    threads_total = args.workers * args.threads
    sizes = [int(m * threads_total) for m in args.multiples]
    print(f"server: `newsbot serve` app, {args.workers} workers × {args.threads} threads, "
          f"SQLite; slow connections held: {', '.join(map(str, sizes))} "
          f"(× {', '.join(f'{m:g}' for m in args.multiples)} the threads), a third each "
          "head/idle/body, reopened when closed")
    print(f"deliveries: signed 本周 at {args.rate:g}/s for {args.duration:g} s per row, a new "
          f"connection each, {WECHAT_TIMEOUT_S:g} s timeout; /healthz once a second")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="newsbot-slow-") as tmp:
        workdir = Path(tmp)
        for worker in args.worker:
            db_url = f"sqlite:///{workdir}/slow-{worker}.db"
            _common.prepare_database(db_url, workdir)
            _common.seed_sample_issue(db_url)
            expect = sample_title()
            with server(worker, db_url, workdir, args.workers, args.threads) as (port, _, log):
                for slow in sizes:
                    _common.wait_until_quiet(args.quiet_wait)
                    rows.append(measure(worker, port, slow, args.duration, args.rate, expect))
                errors = [line for line in log.read_text(errors="replace").splitlines()
                          if " ERROR " in line or "Traceback" in line]
            if errors:
                note(f"{worker}: {len(errors)} error lines in the server log, first: "
                     f"{errors[0][:200]}")
    table = Table(["worker", "slow conns", "deliveries", "≤ 1 s", "≤ 5 s", "p50 ms", "p99 ms",
                   "max ms", "/healthz ≤ 1 s", "closed by server (408)"], [])
    for r in rows:
        table.rows.append([
            WORKERS[r.worker], str(r.slow), str(r.sent), f"{r.within_1s}",
            f"{r.within_5s}", f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.max_ms:.1f}",
            f"{r.health_within_1s} of {r.health_sent}",
            f"{r.closed_by_server} ({r.got_408})"])
    print()
    print(table.render())
    print()
    for r in rows:
        if r.slow == max(sizes):
            print(f"verdict {r.worker}: {r.within_1s} of {r.sent} deliveries answered within "
                  f"1 s with {r.slow} slow connections held: "
                  f"{'OK' if r.within_1s == r.sent else 'STALLED'}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


def throughput(args: argparse.Namespace) -> int:
    """``--throughput N``: what buffering costs when nobody attacks. The webhook benchmark's
    load (bench/webhook.py: 16 keep-alive connections of signed 本周, a unique MsgId each) on
    both workers, N interleaved rounds, a fresh database each."""
    import shutil

    import webhook

    print(_common.machine_line())
    generator = "wrk" if shutil.which("wrk") else "python"
    print(f"throughput: `newsbot serve` app, {args.workers} workers × {args.threads} threads, "
          f"SQLite; {generator}, 16 connections, {args.duration:g} s after a 3 s warm-up; "
          f"{args.throughput} rounds, the workers interleaved")
    rows: list[list[str]] = []
    rates: dict[str, list[float]] = {w: [] for w in args.worker}
    cpus: dict[str, list[float]] = {w: [] for w in args.worker}
    with tempfile.TemporaryDirectory(prefix="newsbot-slow-") as tmp:
        workdir = Path(tmp)
        for rnd in range(1, args.throughput + 1):
            for worker in args.worker:
                db_url = f"sqlite:///{workdir}/tp-{worker}-{rnd}.db"
                _common.prepare_database(db_url, workdir)
                _common.seed_sample_issue(db_url)
                with server(worker, db_url, workdir, args.workers, args.threads) as (
                        port, proc, _log):
                    _common.wait_until_quiet(args.quiet_wait)
                    target = webhook.signed_target()
                    base = secrets.randbelow(10**6) * 10**9
                    if generator == "wrk":
                        webhook._wrk_run(port, target, 3, 16, base + 5 * 10**14, workdir)
                        cpu0 = _common.process_tree_cpu(proc.pid)
                        load = webhook._wrk_run(port, target, args.duration, 16, base, workdir)
                        cpu = _common.process_tree_cpu(proc.pid) - cpu0
                    else:
                        cpu0 = _common.process_tree_cpu(proc.pid)
                        load = webhook.python_load(port, target, warmup=3,
                                                   seconds=args.duration, connections=16,
                                                   procs=2)
                        cpu = (_common.process_tree_cpu(proc.pid) - cpu0) * (
                            args.duration / (args.duration + 3.5))
                per_req = cpu / load.requests * 1e6 if load.requests else 0.0
                rates[worker].append(load.rps)
                cpus[worker].append(per_req)
                rows.append([WORKERS[worker], str(rnd), f"{load.rps:,.0f}",
                             f"{load.p50_ms:.2f}", f"{load.p99_ms:.2f}", f"{per_req:,.0f}",
                             str(load.errors)])
    table = Table(["worker", "round", "req/s", "p50 ms", "p99 ms", "server CPU µs/req",
                   "errors"], rows)
    print()
    print(table.render())
    print()
    for worker in args.worker:
        print(f"median {worker}: {statistics.median(rates[worker]):,.0f} req/s, "
              f"{statistics.median(cpus[worker]):,.0f} µs server CPU per request")
    return 0


def sample_title() -> str:
    from storage.content import parse_issue_file

    return parse_issue_file(_common.SAMPLE_ISSUE, default_free_percent=10).title


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=4,
                        help="threads per worker (default 4)")
    parser.add_argument("--multiples", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0, 1, 10], help="attack sizes as multiples of the server's "
                        "threads, comma-separated (default 0,1,10)")
    parser.add_argument("--duration", type=float, default=15.0,
                        help="seconds of deliveries per row (default 15; past the 10 s "
                        "request deadline, so its effect shows)")
    parser.add_argument("--rate", type=float, default=4.0,
                        help="deliveries per second (default 4)")
    parser.add_argument("--worker", action="append", choices=sorted(WORKERS),
                        help="measure only this worker (repeatable; default both)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny run for CI: 2 × 2 server, 10× only, 2 s per row")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--throughput", type=int, default=0, metavar="ROUNDS",
                        help="instead: the webhook benchmark's load on both workers, no "
                        "attack, ROUNDS interleaved rounds (what buffering costs)")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="wait up to this many seconds for other load on the machine to "
                        "stop before each row (default 120; 0 with --quick)")
    # A server for the rows above (and for tests/test_slow_clients.py's connection-cap test).
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--max-connections", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.config, (args.worker or ["newsbot"])[0], args.max_connections)
        return 0
    args.worker = args.worker or ["gthread", "newsbot"]
    if args.quick:
        args.workers, args.threads = 2, 2
        args.multiples = [10]
        args.duration = min(args.duration, 2.0)
        args.quiet_wait = 0.0
    args.multiples = [int(m) if float(m).is_integer() else m for m in args.multiples]
    if args.throughput:
        return throughput(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
