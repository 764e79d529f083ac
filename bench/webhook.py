"""Webhook throughput and latency, in one run, on the same gunicorn settings and the same load
generator for every server:

  hello   a trivial WSGI app (the ceiling of server + generator on this machine)
  a       a bare WeRoBot echo robot (one text handler returning the content, no sessions)
  b       ``newsbot serve`` answering 本周 on SQLite
  c       the same on PostgreSQL

Every request is a signed text message with its own MsgId (and one of 1,000 openids), so
newsbot's de-duplication claims a new row each time, and its own nonce and signature, as
WeChat sends them: newsbot refuses a signed (timestamp, nonce) reused with another body.

    python bench/webhook.py                      # full size: 20 s per server, 16 connections
    python bench/webhook.py --quick              # a few seconds, for CI
    python bench/webhook.py --generator python   # force the pure-Python load generator
    python bench/webhook.py --baseline ../old    # rows b0/c0: another checkout, interleaved
    python bench/webhook.py --baseline ../old --side-by-side   # both at once, b/b0 per round
    python bench/webhook.py --replay-cost --rounds 20   # the replay check on/off, in process
    python bench/webhook.py --events-cost --rounds 20   # event recording on/off, in process

Targets: b/a ≥ 0.70 with b's p99 ≤ 10 ms at 16 connections; c/a ≥ 0.55.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import resource
import secrets
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common
from _common import TOKEN, Table, child_env, note, verdict

USERS = 1000
WEBHOOK_PATH = "/wechat"
COMMAND = "本周"
TARGET_B_RATIO = 0.70
TARGET_B_P99_MS = 10.0
TARGET_C_RATIO = 0.55
BODY_TEMPLATE = (
    "<xml><ToUserName><![CDATA[gh_bench]]></ToUserName>"
    "<FromUserName><![CDATA[{openid}]]></FromUserName>"
    "<CreateTime>{ts}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
    "<Content><![CDATA[" + COMMAND + "]]></Content><MsgId>{msgid}</MsgId></xml>"
)


def openid_for(n: int) -> str:
    return f"obench{n % USERS:022d}"


def signed_target(ts: int | None = None, nonce: str | None = None) -> str:
    """A webhook path with a fresh signed query (WeChat's signature: SHA-1 of the sorted token,
    timestamp and nonce; written out here so the generator needs nothing from newsbot)."""
    stamp = str(int(time.time()) if ts is None else ts)
    nonce = nonce or secrets.token_hex(5)
    sig = hashlib.sha1("".join(sorted([TOKEN, stamp, nonce])).encode()).hexdigest()
    return f"{WEBHOOK_PATH}?signature={sig}&timestamp={stamp}&nonce={nonce}"


# =========================================================================== servers
#
# hello and echo run under a subclass of newsbot's own gunicorn application, so they get the
# exact configuration `newsbot serve` gets (worker class, workers, threads, timeouts, logger);
# only the WSGI app differs.


def _hello_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    stream = environ["wsgi.input"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        stream.read(length)
    body = b"ok"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def _echo_app() -> Any:
    import werobot

    robot = werobot.WeRoBot(token=TOKEN, SESSION_STORAGE=False)

    @robot.text  # type: ignore[untyped-decorator]
    def echo(message: Any) -> str:
        return str(message.content)

    return robot.wsgi


def serve(kind: str, port: int, workers: int, threads: int, worker_class: str) -> None:
    from bot.server import NewsbotServer, ServerOptions
    from bot.settings import Settings

    class PlainServer(NewsbotServer):
        def gunicorn_config(self) -> dict[str, Any]:
            config = dict(super().gunicorn_config())
            if worker_class != "newsbot":  # "newsbot": the worker `newsbot serve` uses
                config["worker_class"] = worker_class
            config["proc_name"] = f"bench-{kind}"
            return config

        def load(self) -> Any:
            return _hello_app if kind == "hello" else _echo_app()

    settings = Settings.model_validate({"broadcast": {"scheduler": False}})
    options = ServerOptions(host="127.0.0.1", port=port, workers=workers, threads=threads,
                            log_level="warning")
    PlainServer(settings, options).run()


@dataclass
class Target:
    key: str
    label: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    db_url: str | None = None
    expect: str = ""
    checks: dict[str, Any] = field(default_factory=dict)


@contextmanager
def plain_server(kind: str, label: str, key: str, args: argparse.Namespace, workdir: Path,
                 worker_class: str = "newsbot") -> Iterator[Target]:
    port = _common.free_port()
    log = workdir / f"{key}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--port", str(port),
             "--workers", str(args.workers), "--threads", str(args.threads),
             "--worker-class", worker_class],
            stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=workdir)
    target = Target(key, label, proc, port, log, expect="ok" if kind == "hello" else COMMAND)
    try:
        _wait_ready(target)
        yield target
    finally:
        _common.stop_process(proc)
        target.checks = post_checks(target)


@contextmanager
def newsbot_server(label: str, key: str, db_url: str, args: argparse.Namespace,
                   workdir: Path, root: Path | None = None) -> Iterator[Target]:
    if root is None:
        _common.prepare_database(db_url, workdir)
        number = _common.seed_sample_issue(db_url)
    else:
        number = _prepare_with(root, db_url, workdir)
    port = _common.free_port()
    config = _common.write_config(workdir / f"{key}.toml",
                                  _common.base_sections(db_url, port=port))
    log = workdir / f"{key}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "serve", "--config", str(config),
             "--workers", str(args.workers), "--threads", str(args.threads)],
            stdout=out, stderr=subprocess.STDOUT, env=_server_env(root), cwd=workdir)
    from storage.db import make_engine, transaction
    from storage.issues import get_issue

    engine = make_engine(db_url)
    with transaction(engine) as s:
        title = get_issue(s, number=number, default_free_percent=10).title
    engine.dispose()
    target = Target(key, label, proc, port, log, db_url=db_url, expect=title)
    try:
        _wait_ready(target)
        yield target
    finally:
        # Stopped (in-flight requests finished) before the inbox is counted.
        _common.stop_process(proc)
        target.checks = post_checks(target)


def _server_env(root: Path | None) -> dict[str, str]:
    """The server's environment: this checkout, or ``root`` (another checkout) first."""
    env = child_env()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(root.resolve()), env["PYTHONPATH"]])
    return env


def _prepare_with(root: Path, db_url: str, workdir: Path) -> int:
    """Schema and sample issue made by the code in ``root`` (its own migrations). Run from
    ``workdir``: ``python -m``/``-c`` put the current directory first on the path."""
    env = _server_env(root)
    config = _common.write_config(workdir / f"schema-{secrets.token_hex(3)}.toml",
                                  _common.base_sections(db_url))
    subprocess.run([sys.executable, "-m", "bot.cli", "--config", str(config), "db", "upgrade"],
                   env=env, cwd=workdir, check=True, capture_output=True, timeout=300)
    env["PYTHONPATH"] += os.pathsep + str(Path(__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, "-c", "import sys, _common; print(_common.seed_sample_issue(sys.argv[1]))",
         db_url], env=env, cwd=workdir, check=True, capture_output=True, text=True, timeout=300)
    return int(done.stdout.strip().splitlines()[-1])


def _wait_ready(target: Target) -> None:
    try:
        _common.wait_for_port(target.port, target.proc, what=target.label)
    except RuntimeError as exc:
        tail = target.log.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"{exc}; its log ends with:\n{tail}") from None


def sanity_check(target: Target) -> None:
    """One signed request before the load: the answer must be the expected reply."""
    import httpx

    body = BODY_TEMPLATE.format(openid=openid_for(0), ts=int(time.time()),
                                msgid=secrets.randbelow(10**15))
    deadline = time.monotonic() + 30
    while True:
        try:
            resp = httpx.post(f"http://127.0.0.1:{target.port}{signed_target()}",
                              content=body.encode(), headers={"Content-Type": "text/xml"},
                              timeout=10)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    if resp.status_code != 200 or target.expect not in resp.text:
        raise RuntimeError(f"{target.label}: unexpected answer {resp.status_code}: "
                           f"{resp.text[:300]!r}")


# =========================================================================== load generators


@dataclass
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    generator_cpu_s: float
    error_detail: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class GenSpec:
    port: int
    target: str
    msgid_base: int
    start_at: float
    measure_at: float
    end_at: float


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- wrk ---

_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "text/xml"
local template = [==[@TEMPLATE@]==]
local base = @BASE@
local users = @USERS@
local now = "@TS@"
local counter = 0
local threads = 0
local targets = {}

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

-- Lua has no SHA-1: each thread reads its own file of signed paths, one nonce per request.
function init(args)
  for line in io.lines(string.format("@TARGETS@-%d.txt", tid)) do
    targets[#targets + 1] = line
  end
end

function request()
  counter = counter + 1
  local n = base + tid * 1000000000 + counter
  local openid = string.format("obench%022d", (tid * 7919 + counter) % users)
  local body = string.format(template, openid, now, string.format("%.0f", n))
  return wrk.format(nil, targets[(counter - 1) % #targets + 1], nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\": %d, \"duration_us\": %d, \"p50_us\": %d, \"p90_us\": %d, " ..
    "\"p99_us\": %d, \"max_us\": %d, \"connect\": %d, \"read\": %d, \"write\": %d, " ..
    "\"status\": %d, \"timeout\": %d}\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _wrk_run(port: int, target: str, seconds: float, connections: int, msgid_base: int,
             workdir: Path) -> LoadResult:
    template = (BODY_TEMPLATE.replace("{openid}", "%s").replace("{ts}", "%s")
                .replace("{msgid}", "%s"))
    ts = int(time.time())
    threads = max(1, min(2, connections))
    # Enough signed paths per thread for ~16,000 req/s; past that they repeat, which only the
    # hello and echo servers (that remember no nonces) would reach.
    per_thread = max(1000, int(seconds * 16_000 / threads) + 1000)
    salt = secrets.token_hex(3)
    prefix = workdir / "targets"
    for tid in range(threads):
        lines = (signed_target(ts, f"{salt}{tid}x{i}") for i in range(per_thread))
        Path(f"{prefix}-{tid}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    script = (_LUA.replace("@TEMPLATE@", template).replace("@BASE@", str(msgid_base))
              .replace("@USERS@", str(USERS)).replace("@TS@", str(ts))
              .replace("@TARGETS@", str(prefix)))
    path = workdir / "bench.lua"
    path.write_text(script, encoding="utf-8")
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
           "--timeout", "10s", "-s", str(path), f"http://127.0.0.1:{port}{target}"]
    cpu0 = _children_cpu()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    cpu = _children_cpu() - cpu0
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    data = json.loads(line[len("WRKJSON "):])
    errors = sum(int(data[k]) for k in ("connect", "read", "write", "status", "timeout"))
    detail = ", ".join(f"{k} {data[k]}" for k in ("connect", "read", "write", "status",
                                                  "timeout") if data[k])
    return LoadResult(requests=int(data["requests"]), seconds=data["duration_us"] / 1e6,
                      p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000,
                      p99_ms=data["p99_us"] / 1000, max_ms=data["max_us"] / 1000,
                      errors=errors, generator_cpu_s=cpu, error_detail=detail)


# --- pure Python: processes, each driving its connections with a selector over raw sockets ---


class _Conn:
    __slots__ = ("buf", "cid", "count", "sent_at", "sock")

    def __init__(self, sock: socket.socket, cid: int) -> None:
        self.sock = sock
        self.cid = cid
        self.buf = b""
        self.count = 0
        self.sent_at = 0.0


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def _gen_worker(spec: GenSpec, cids: list[int], out: Any) -> None:
    """One generator process: closed loop, one request in flight per connection."""
    # Each request is signed afresh (its own nonce): a reused nonce would be refused.
    head = (f" HTTP/1.1\r\nHost: 127.0.0.1:{spec.port}\r\n"
            "Content-Type: text/xml\r\nContent-Length: ").encode()
    ts = int(time.time())
    salt = secrets.token_hex(3)
    template = BODY_TEMPLATE.replace("{ts}", str(ts))
    sel = selectors.DefaultSelector()
    latencies = array("d")
    errors = 0
    completed = 0
    now = time.monotonic

    def send(conn: _Conn) -> None:
        conn.count += 1
        n = spec.msgid_base + conn.cid * 1_000_000_000 + conn.count
        body = template.format(openid=openid_for(conn.cid * 7919 + conn.count),
                               msgid=n).encode()
        target = signed_target(ts, f"{salt}{conn.cid}x{conn.count}").encode()
        conn.sent_at = now()
        conn.sock.sendall(b"POST " + target + head + str(len(body)).encode() + b"\r\n\r\n"
                          + body)

    def reopen(conn: _Conn) -> None:
        sel.unregister(conn.sock)
        conn.sock.close()
        conn.sock = _connect(spec.port)
        conn.buf = b""
        sel.register(conn.sock, selectors.EVENT_READ, conn)

    conns = []
    for cid in cids:
        conn = _Conn(_connect(spec.port), cid)
        sel.register(conn.sock, selectors.EVENT_READ, conn)
        conns.append(conn)
    while now() < spec.start_at:
        time.sleep(min(0.01, max(0.0, spec.start_at - now())))
    for conn in conns:
        send(conn)
    while True:
        t = now()
        if t >= spec.end_at:
            break
        for key, _ in sel.select(timeout=min(0.1, spec.end_at - t)):
            conn = key.data
            try:
                data = conn.sock.recv(65536)
            except OSError:
                data = b""
            if not data:  # closed by the server: count it if measured, reconnect, resend
                if conn.sent_at >= spec.measure_at:
                    errors += 1
                reopen(conn)
                send(conn)
                continue
            conn.buf += data
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                continue
            header = conn.buf[:end].decode("latin-1")
            length = 0
            close = False
            for line in header.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                lname = name.strip().lower()
                if lname == "content-length":
                    length = int(value.strip())
                elif lname == "connection" and value.strip().lower() == "close":
                    close = True
            if len(conn.buf) < end + 4 + length:
                continue
            done_at = now()
            ok = header.startswith(("HTTP/1.1 200", "HTTP/1.0 200"))
            if conn.sent_at >= spec.measure_at and done_at <= spec.end_at:
                if ok:
                    completed += 1
                    latencies.append(done_at - conn.sent_at)
                else:
                    errors += 1
            conn.buf = conn.buf[end + 4 + length:]
            if close:
                reopen(conn)
            send(conn)
    for conn in conns:
        conn.sock.close()
    out.put((completed, errors, latencies.tobytes()))


def python_load(port: int, target: str, *, warmup: float, seconds: float, connections: int,
                procs: int) -> LoadResult:
    procs = max(1, min(procs, connections))
    ctx = mp.get_context("fork")
    queue: Any = ctx.Queue()
    start = time.monotonic() + 0.5
    spec = GenSpec(port=port, target=target, msgid_base=secrets.randbelow(10**6) * 10**9,
                   start_at=start, measure_at=start + warmup, end_at=start + warmup + seconds)
    groups = [list(range(i, connections, procs)) for i in range(procs)]
    cpu0 = _children_cpu()
    workers = [ctx.Process(target=_gen_worker, args=(spec, g, queue)) for g in groups]
    for w in workers:
        w.start()
    results = [queue.get(timeout=warmup + seconds + 60) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    cpu = _children_cpu() - cpu0
    latencies: list[float] = []
    completed = errors = 0
    for count, errs, raw in results:
        completed += count
        errors += errs
        values = array("d")
        values.frombytes(raw)
        latencies.extend(values)
    latencies.sort()
    pct = _common.percentile
    return LoadResult(requests=completed, seconds=seconds,
                      p50_ms=pct(latencies, 50) * 1000, p90_ms=pct(latencies, 90) * 1000,
                      p99_ms=pct(latencies, 99) * 1000,
                      max_ms=(latencies[-1] * 1000 if latencies else 0.0), errors=errors,
                      generator_cpu_s=cpu, error_detail=f"{errors} failed" if errors else "")


# =========================================================================== the run


@dataclass
class Row:
    key: str
    label: str
    load: LoadResult
    server_cpu_s: float
    checks: dict[str, Any] = field(default_factory=dict)
    db_cpu_s: float | None = None
    machine_busy_pct: float = 0.0
    other_cpu_pct: float = 0.0
    spy: dict[str, dict[str, float]] = field(default_factory=dict)
    round: int = 1

    @property
    def server_cpu_us_per_req(self) -> float:
        return self.server_cpu_s / self.load.requests * 1e6 if self.load.requests else 0.0

    @property
    def db_cpu_us_per_req(self) -> float | None:
        if self.db_cpu_s is None or not self.load.requests:
            return None
        return self.db_cpu_s / self.load.requests * 1e6


# --- optional: where request wall time goes under load (py-spy on the workers) ---

# First match wins, so nested stages come before the stages that contain them.
_SPY_CATEGORIES = [
    ("_WriteGate.hold", "SQLite write gate: queued behind other writers"),
    ("FastPath.store_reply", "fast path: claim + reply INSERT"),
    ("Reads.", "fast path: current issue and standing reads"),
    ("FastPath.reading", "fast path: read connection checkout/return"),
    ("Webhook._handle", "write path: claim, handler, reply in one transaction"),
    ("RequestLog.emit", "request log line"),
    ("parse_delivery", "XML parse (WeRoBot) and delivery"),
    ("dispatch (handlers/", "handlers: routing, card text"),
    ("render_reply", "reply XML"),
]
_OUTSIDE = "gunicorn + Bottle outside the webhook (HTTP, sockets)"


def _spy_category(stack: str, *, gil: bool) -> str | None:
    if "Webhook.receive" not in stack:
        # Idle threads wait here too; only the GIL holder's time outside the webhook is CPU.
        return _OUTSIDE if gil else None
    for needle, label in _SPY_CATEGORIES:
        if needle in stack:
            return label
    return "webhook: signature, body, safe mode, the rest"


def _py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_spies(target: Target, seconds: float, delay: float,
                workdir: Path) -> list[tuple[str, Path, subprocess.Popen[bytes]]]:
    """py-spy on every worker: one sampler of all threads (--idle: where the wall time of a
    request goes, waits included) and one of the GIL holder only (where the CPU goes)."""
    spy = _py_spy()
    if spy is None:
        note("--spy needs py-spy (pip install py-spy); skipped")
        return []
    time.sleep(delay)
    spies = []
    for pid in _common.child_pids(target.proc.pid):
        for mode in ("--idle", "--gil"):
            out = workdir / f"spy-{target.key}-{pid}-{mode.strip('-')}.txt"
            proc = subprocess.Popen(
                [spy, "record", "--nonblocking", mode, "--format", "raw", "-r", "100",
                 "-d", str(max(1, int(seconds))), "-p", str(pid), "-o", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            spies.append((mode.strip("-"), out, proc))
    return spies


def collect_spies(spies: list[tuple[str, Path, subprocess.Popen[bytes]]]
                  ) -> dict[str, dict[str, float]]:
    counts: dict[str, dict[str, int]] = {"idle": {}, "gil": {}}
    for mode, out, proc in spies:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            _common.stop_process(proc)
        if not out.exists():
            continue
        for line in out.read_text(encoding="utf-8", errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            category = _spy_category(stack, gil=mode == "gil")
            if category is not None and n.isdigit():
                counts[mode][category] = counts[mode].get(category, 0) + int(n)
    shares: dict[str, dict[str, float]] = {}
    for mode, by in counts.items():
        total = sum(by.values())
        shares[mode] = {k: v / total * 100 for k, v in by.items()} if total else {}
    return shares


_Spies = list[tuple[str, Path, subprocess.Popen[bytes]]]


def _spy_thread(target: Target, args: argparse.Namespace, delay: float,
                workdir: Path) -> tuple[threading.Thread, _Spies] | None:
    if not args.spy or target.db_url is None:
        return None
    started: _Spies = []
    seconds = max(1.0, args.duration - 2)

    def run() -> None:
        started.extend(start_spies(target, seconds, delay, workdir))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, started


def measure(target: Target, args: argparse.Namespace, generator: str,
            workdir: Path) -> Row:
    sanity_check(target)
    query = signed_target()
    print(f"  {target.label}: warm-up {args.warmup:g} s, measuring {args.duration:g} s …",
          flush=True)

    def snapshot() -> tuple[float, float, tuple[float, float]]:
        return (_common.process_tree_cpu(target.proc.pid),
                _common.named_processes_cpu("postgres"), _common.machine_busy())

    if generator == "wrk":
        # The warm-up is its own wrk run; CPU is read around the measured run only.
        base = secrets.randbelow(10**6) * 10**9
        if args.warmup > 0:
            _wrk_run(target.port, query, args.warmup, args.connections, base + 5 * 10**14,
                     workdir)
        spies = _spy_thread(target, args, 1.0, workdir)
        before = snapshot()
        load = _wrk_run(target.port, query, args.duration, args.connections, base, workdir)
        after = snapshot()
        share = 1.0
    else:
        spies = _spy_thread(target, args, args.warmup + 1.5, workdir)
        before = snapshot()
        load = python_load(target.port, query, warmup=args.warmup, seconds=args.duration,
                           connections=args.connections, procs=args.gen_procs)
        after = snapshot()
        # The readings include the warm-up: scale to the measured share.
        share = args.duration / (args.duration + args.warmup + 0.5)
    row = Row(target.key, target.label, load, (after[0] - before[0]) * share)
    if spies is not None:
        spies[0].join()
        row.spy = collect_spies(spies[1])
    if target.db_url and target.db_url.startswith("postgresql"):
        row.db_cpu_s = (after[1] - before[1]) * share
    busy = after[2][0] - before[2][0]
    total = after[2][1] - before[2][1]
    row.machine_busy_pct = busy / total * 100 if total else 0.0
    # CPU the machine spent on anything but server, database and generator: other work on a
    # shared machine (and kernel time not charged to a process). High values spoil the run.
    tick = os.sysconf("SC_CLK_TCK")
    cores = os.cpu_count() or 1
    ours = row.server_cpu_s / share + (row.db_cpu_s or 0.0) / share + load.generator_cpu_s
    wall = total / tick / cores
    row.other_cpu_pct = max(0.0, (busy / tick - ours) / wall * 100) if wall else 0.0
    return row


def post_checks(target: Target) -> dict[str, Any]:
    """Errors in the server's log and, for newsbot, what the inbox recorded."""
    checks: dict[str, Any] = {}
    text = target.log.read_text(encoding="utf-8", errors="replace")
    checks["log_errors"] = sum(1 for ln in text.splitlines()
                               if " ERROR " in ln or "Traceback" in ln)
    if target.db_url:
        from sqlalchemy import func
        from sqlmodel import select

        from storage.db import make_engine, transaction
        from storage.models import InboundMessage

        engine = make_engine(target.db_url)
        with transaction(engine) as s:
            rows = s.exec(select(InboundMessage.status, func.count())
                          .group_by(InboundMessage.status)).all()
        engine.dispose()
        checks["inbox"] = {str(status): int(n) for status, n in rows}
    return checks


def run(args: argparse.Namespace) -> int:
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    elif generator == "wrk" and not shutil.which("wrk"):
        print("wrk is not installed (apt-get install -y wrk), use --generator python",
              file=sys.stderr)
        return 2
    pg_admin, pg_note = _common.pg_admin_url(quick=args.quick)
    if args.no_pg:
        pg_admin, pg_note = None, "PostgreSQL skipped: --no-pg"
    print(_common.machine_line(pg_admin))
    gen_desc = (f"wrk {min(2, args.connections)} threads + Lua (unique MsgId and nonce per "
                "request)"
                if generator == "wrk" else
                f"pure Python, {min(args.gen_procs, args.connections)} processes × raw "
                "keep-alive sockets (unique MsgId and nonce per request)")
    print(f"server: gunicorn, {args.workers} workers × {args.threads} threads (newsbot's "
          f"buffering worker, as `newsbot serve` runs); newsbot log level info")
    print(f"load: {gen_desc}; {args.connections} connections; warm-up {args.warmup:g} s, "
          f"{args.duration:g} s measured per server")
    if pg_note:
        note(pg_note)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="newsbot-bench-") as tmp:
        workdir = Path(tmp)
        plans: list[tuple[str, Callable[[ExitStack], Target]]] = []
        if not args.skip_hello:
            plans.append(("hello", lambda st: st.enter_context(plain_server(
                "hello", "hello-world WSGI", "hello", args, workdir))))
        if args.reference_sync:
            plans.append(("a-sync", lambda st: st.enter_context(plain_server(
                "echo", "WeRoBot echo, sync workers", "a-sync", args, workdir,
                worker_class="sync"))))
        plans.append(("a", lambda st: st.enter_context(plain_server(
            "echo", "a: WeRoBot echo", "a", args, workdir))))
        # A fresh database for every round (a file of its own; PostgreSQL: a new database).
        if args.baseline:
            plans.append(("b0", lambda st: st.enter_context(newsbot_server(
                "b0: baseline 本周, SQLite", "b0",
                f"sqlite:///{workdir}/bench-{secrets.token_hex(4)}.db", args, workdir,
                root=Path(args.baseline)))))
        plans.append(("b", lambda st: st.enter_context(newsbot_server(
            "b: newsbot 本周, SQLite", "b",
            f"sqlite:///{workdir}/bench-{secrets.token_hex(4)}.db", args, workdir))))
        if pg_admin and args.baseline:
            def pg_baseline(st: ExitStack) -> Target:
                url = st.enter_context(_common.temp_pg_database(pg_admin))
                return st.enter_context(newsbot_server(
                    "c0: baseline 本周, PostgreSQL", "c0", url, args, workdir,
                    root=Path(args.baseline)))
            plans.append(("c0", pg_baseline))
        if pg_admin:
            def pg_target(st: ExitStack) -> Target:
                url = st.enter_context(_common.temp_pg_database(pg_admin))
                return st.enter_context(newsbot_server(
                    "c: newsbot 本周, PostgreSQL", "c", url, args, workdir))
            plans.append(("c", pg_target))
        # Rounds interleave the servers (a, b, c, a, b, c, …), so a drift in the machine's
        # state, or a lopsided split of the connections between the workers, hits one
        # round's rows, and the medians over rounds are what the verdict uses.
        for rnd in range(1, args.rounds + 1):
            for _key, start in plans:
                with ExitStack() as stack:
                    target = start(stack)
                    _common.wait_until_quiet(0 if args.quick else args.quiet_wait)
                    row = measure(target, args, generator, workdir)
                row.checks = target.checks
                row.round = rnd
                if args.rounds > 1:
                    row.label += f" #{rnd}"
                rows.append(row)

    report(rows, args, generator, gen_desc)
    return 0


def replay_cost(args: argparse.Namespace) -> int:
    """What the replay check costs (see ``_on_off``)."""
    return _on_off(args, "the replay check", "check", "newsbot-replay-",
                   lambda hook, on: setattr(hook, "remember_pairs", on))


def events_cost(args: argparse.Namespace) -> int:
    """What recording the card view (storage.events, in the fast path's claim statement)
    costs a 本周 from a known reader (see ``_on_off``)."""
    return _on_off(args, "event recording", "events", "newsbot-events-",
                   lambda hook, on: setattr(hook, "record_events", on))


def _on_off(args: argparse.Namespace, what: str, short: str, prefix: str,
            switch: Callable[[Any, bool], None]) -> int:
    """What one feature costs, measured in one process on one database: the webhook answers
    blocks of signed 本周 requests with it on and off in turn (ABBA order), so other work on a
    shared machine falls on both alike. CPU is this process's (SQLite runs in it; PostgreSQL's
    own work is not counted, its round trips are in the wall time)."""
    import logging

    import bottle

    from bot.logs import setup_logging
    from bot.settings import Settings
    from bot.wechat.webhook import Webhook

    blocks, size = (4, 100) if args.quick else (args.rounds, 500)
    pg_admin, pg_note = _common.pg_admin_url(quick=args.quick)
    if args.no_pg:
        pg_admin, pg_note = None, "PostgreSQL skipped: --no-pg"
    print(_common.machine_line(pg_admin))
    print(f"in-process, one thread: {blocks} blocks of {size} signed 本周 requests from known "
          f"readers with {what} on, as many with it off, interleaved")
    if pg_note:
        note(pg_note)
    devnull = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    setup_logging("INFO", stream=devnull)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        dbs: list[tuple[str, Callable[[ExitStack], str]]] = [
            ("SQLite", lambda st: f"sqlite:///{workdir}/bench.db")]
        if pg_admin:
            dbs.append(("PostgreSQL", lambda st: st.enter_context(
                _common.temp_pg_database(pg_admin, prefix="newsbot_onoff"))))
        for name, make_url in dbs:
            with ExitStack() as stack:
                url = make_url(stack)
                _common.prepare_database(url, workdir)
                _common.seed_sample_issue(url)
                from storage.db import make_engine

                engine = make_engine(url)
                app = bottle.Bottle()
                hook = Webhook(Settings.model_validate(_common.base_sections(url)), engine)
                hook.install(app)
                _time_app(app, 200, USERS)  # every reader known: the fast path from here on
                cpu: dict[bool, list[float]] = {True: [], False: []}
                wall: dict[bool, list[float]] = {True: [], False: []}
                for i in range(blocks):
                    for on in ((True, False) if i % 2 else (False, True)):
                        switch(hook, on)
                        wall[on].append(_time_app(app, size, 0, cpu[on]))
                engine.dispose()
            per_block = [a / b for a, b in zip(cpu[True], cpu[False], strict=True)]
            med = statistics.median
            print(f"{name}: {short} on {med(cpu[True]):,.0f} µs CPU / {med(wall[True]):,.0f} µs "
                  f"wall per request ({1e6 / med(wall[True]):,.0f} msgs/s), off "
                  f"{med(cpu[False]):,.0f} / {med(wall[False]):,.0f} "
                  f"({1e6 / med(wall[False]):,.0f} msgs/s): "
                  f"CPU on/off {med(cpu[True]) / med(cpu[False]):.3f}, wall on/off "
                  f"{med(wall[True]) / med(wall[False]):.3f} (per-block CPU ratio median "
                  f"{med(per_block):.3f})")
    logging.getLogger().handlers.clear()
    devnull.close()
    return 0


def side_by_side(args: argparse.Namespace) -> int:
    """Both checkouts served and loaded at the same time: on a shared, busy machine the
    sequential rounds of ``run`` drift with the other work; here both sides see the same."""
    print(_common.machine_line(None))
    half = max(1, args.connections // 2)
    print(f"side by side on SQLite: this checkout (b) and {args.baseline} (b0), each gunicorn "
          f"{args.workers} workers × {args.threads} threads, loaded at once with {half} "
          f"connections each (pure-Python generator), warm-up {args.warmup:g} s, "
          f"{args.duration:g} s measured")
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="newsbot-bench-") as tmp:
        workdir = Path(tmp)
        for rnd in range(1, args.rounds + 1):
            with ExitStack() as stack:
                targets = [stack.enter_context(newsbot_server(
                    label, key, f"sqlite:///{workdir}/{key}-{secrets.token_hex(4)}.db", args,
                    workdir, root=root)) for label, key, root in
                    (("b0: baseline", "b0", Path(args.baseline)), ("b: this checkout", "b",
                                                                    None))]
                for target in targets:
                    sanity_check(target)
                results: dict[str, LoadResult] = {}

                def load(target: Target, out: dict[str, LoadResult] = results) -> None:
                    out[target.key] = python_load(
                        target.port, "", warmup=args.warmup, seconds=args.duration,
                        connections=half, procs=max(1, args.gen_procs // 2))

                threads = [threading.Thread(target=load, args=(t,)) for t in targets]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            b0, b = results["b0"], results["b"]
            ratios.append(b.rps / b0.rps if b0.rps else 0.0)
            print(f"round {rnd}: b0 {b0.rps:,.0f} req/s (p99 {b0.p99_ms:.1f} ms, errors "
                  f"{b0.errors}), b {b.rps:,.0f} req/s (p99 {b.p99_ms:.1f} ms, errors "
                  f"{b.errors}): b/b0 {ratios[-1]:.3f}", flush=True)
    print(f"b/b0 = {statistics.median(ratios):.3f} (median of {len(ratios)} rounds; "
          f"range {min(ratios):.3f}–{max(ratios):.3f})")
    return 0


def report(rows: list[Row], args: argparse.Namespace, generator: str, gen_desc: str) -> None:
    by = {r.key: r for r in rows}
    table = Table(["server", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors",
                   "server CPU µs/req", "postgres CPU µs/req", "generator CPU %",
                   "machine busy %", "other CPU %"], [])
    for r in rows:
        gen_pct = r.load.generator_cpu_s / r.load.seconds * 100 if r.load.seconds else 0.0
        db = r.db_cpu_us_per_req
        table.rows.append([r.label, f"{r.load.rps:,.0f}", f"{r.load.p50_ms:.2f}",
                           f"{r.load.p90_ms:.2f}", f"{r.load.p99_ms:.2f}",
                           f"{r.load.max_ms:.1f}", str(r.load.errors),
                           f"{r.server_cpu_us_per_req:,.0f}",
                           "-" if db is None else f"{db:,.0f}", f"{gen_pct:.0f}",
                           f"{r.machine_busy_pct:.0f}", f"{r.other_cpu_pct:.0f}"])
    print()
    print(table.render())
    for r in rows:
        extra = [f"log errors {r.checks.get('log_errors', 0)}"]
        if "inbox" in r.checks:
            extra.append(f"inbox rows {r.checks['inbox']}")
        if r.load.error_detail:
            extra.append(f"load errors: {r.load.error_detail}")
        print(f"  {r.key}: " + "; ".join(extra))
    for r in rows:
        if not r.spy:
            continue
        cats = sorted(set(r.spy.get("idle", {})) | set(r.spy.get("gil", {})),
                      key=lambda cat: -r.spy.get("idle", {}).get(cat, 0.0))
        spy_table = Table([f"{r.key}: py-spy on the workers", "% of request wall time",
                           "% of GIL-holding samples"], [])
        for cat in cats:
            spy_table.rows.append([cat, f"{r.spy.get('idle', {}).get(cat, 0.0):.1f}",
                                   f"{r.spy.get('gil', {}).get(cat, 0.0):.1f}"])
        print()
        print(spy_table.render())
    if any(r.spy for r in rows):
        note("sampling costs CPU: with --spy the req/s and latencies above are lower than "
             "without it; use the shares, not those figures")
    print()
    summary: dict[str, Any] = {"generator": generator, "generator_desc": gen_desc,
                               "connections": args.connections, "workers": args.workers,
                               "threads": args.threads, "duration_s": args.duration,
                               "rounds": args.rounds,
                               "rows": [{"key": r.key, "label": r.label, "round": r.round,
                                         **asdict(r.load),
                                         "rps": r.load.rps, "server_cpu_s": r.server_cpu_s,
                                         "db_cpu_s": r.db_cpu_s,
                                         "machine_busy_pct": r.machine_busy_pct,
                                         "other_cpu_pct": r.other_cpu_pct,
                                         "spy": r.spy,
                                         "checks": r.checks} for r in rows]}
    # Per round: b and c against the same round's echo robot.
    b_ratios: list[float] = []
    b_p99s: list[float] = []
    c_ratios: list[float] = []
    c_p99s: list[float] = []
    versus: dict[str, list[float]] = {}  # this checkout against --baseline, per round
    for rnd in sorted({r.round for r in rows}):
        by = {r.key: r for r in rows if r.round == rnd}
        a = by.get("a")
        if a is None or not a.load.rps:
            continue
        parts = []
        if (b := by.get("b")) is not None:
            b_ratios.append(b.load.rps / a.load.rps)
            b_p99s.append(b.load.p99_ms)
            parts.append(f"b/a {b_ratios[-1]:.2f}")
        if (c := by.get("c")) is not None:
            c_ratios.append(c.load.rps / a.load.rps)
            c_p99s.append(c.load.p99_ms)
            parts.append(f"c/a {c_ratios[-1]:.2f}")
        for new, old in (("b", "b0"), ("c", "c0")):
            if new in by and old in by and by[old].load.rps:
                versus.setdefault(new, []).append(by[new].load.rps / by[old].load.rps)
                parts.append(f"{new}/{old} {versus[new][-1]:.2f}")
        if args.rounds > 1 and parts:
            print(f"round {rnd}: " + ", ".join(parts))
    of = " (medians over rounds)" if args.rounds > 1 else ""
    if b_ratios:
        ratio, p99 = statistics.median(b_ratios), statistics.median(b_p99s)
        ok = ratio >= TARGET_B_RATIO and p99 <= TARGET_B_P99_MS
        print(f"b/a = {ratio:.2f} (target ≥ {TARGET_B_RATIO:.2f}), b p99 = {p99:.2f} ms "
              f"(target ≤ {TARGET_B_P99_MS:g} ms){of}: {verdict(ok)}")
        summary["b_over_a"] = ratio
        summary["b_target_met"] = ok
    if c_ratios:
        ratio, p99 = statistics.median(c_ratios), statistics.median(c_p99s)
        ok = ratio >= TARGET_C_RATIO
        print(f"c/a = {ratio:.2f} (target ≥ {TARGET_C_RATIO:.2f}), c p99 = {p99:.2f} ms{of}: "
              f"{verdict(ok)}")
        summary["c_over_a"] = ratio
        summary["c_target_met"] = ok
    elif b_ratios:
        print("c/a = n/a (PostgreSQL skipped)")
    for new, ratios in versus.items():
        print(f"{new}/{new}0 = {statistics.median(ratios):.2f} (this checkout's req/s over "
              f"--baseline's{of})")
        summary[f"{new}_over_{new}0"] = statistics.median(ratios)
    if args.connections != 16:
        note("the targets are defined at 16 connections; this run used "
             f"{args.connections}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
        print(f"figures written to {args.json}")


# =========================================================================== --profile
#
# Where newsbot's request time goes, measured in-process (no HTTP, one thread, so no lock
# waits): the real WSGI app is called with a signed request; chosen functions on the request
# path are wrapped with timers (inclusive wall time, nested), and SQL statements are timed at
# the driver through SQLAlchemy's cursor events.

_STAGES: list[tuple[str, str, str]] = [
    # (module, attribute — "Class.method" for methods, label)
    ("bot.wechat.webhook", "Webhook._check_signature", "signature check"),
    ("bot.wechat.webhook", "parse_delivery", "XML parse (WeRoBot) + delivery"),
    # The fast path (handlers marked @reads_only, known readers): reads, then one INSERT.
    ("bot.wechat.webhook", "Webhook._answer_reading", "fast path"),
    ("storage.fastpath", "Reads.current_issue", "current issue (SELECT; preview cached)"),
    ("storage.fastpath", "Reads.standing", "balance, unlock, notice (one SELECT)"),
    ("storage.fastpath", "FastPath.store_reply", "claim + reply (one INSERT, autocommit)"),
    # The write path (everything else): claim, side effects and reply in one transaction.
    ("bot.wechat.webhook", "run_in_transaction", "transaction"),
    ("bot.wechat.webhook", "Webhook._handle", "handler"),
    ("storage.inbox", "claim", "dedupe claim (INSERT … ON CONFLICT)"),
    ("storage.subscribers", "ensure_subscriber", "ensure_subscriber (INSERT … ON CONFLICT)"),
    ("handlers", "dispatch", "dispatch"),
    ("handlers.issue", "card_for", "card_for"),
    ("storage.issues", "current_issue", "current_issue (SELECT issue)"),
    ("storage.ledger", "has_entitlement", "has_entitlement (SELECT)"),
    ("storage.ledger", "get_balance", "get_balance (SELECT subscriber)"),
    ("handlers.issue", "issue_card", "issue_card (format)"),
    ("handlers.broadcast_events", "with_new_issue_note", "new-issue note"),
    ("storage.broadcasts", "mark_notified", "mark_notified (INSERT … ON CONFLICT)"),
    ("storage.inbox", "finish", "store reply (UPDATE inbound_message)"),
    ("sqlalchemy.orm", "Session.commit", "COMMIT"),
    ("bot.wechat.webhook", "render_reply", "render reply XML"),
    ("bot.wechat.webhook", "RequestLog.emit", "request log line"),
]


class _StageTimer:
    def __init__(self) -> None:
        self.stack: list[str] = []
        self.totals: dict[tuple[str, ...], float] = {}
        self.calls: dict[tuple[str, ...], int] = {}
        self.order: list[tuple[str, ...]] = []
        self._restore: list[tuple[Any, str, Any]] = []

    def add(self, path: tuple[str, ...], seconds: float) -> None:
        if path not in self.totals:
            self.totals[path] = 0.0
            self.calls[path] = 0
            self.order.append(path)
        self.totals[path] += seconds
        self.calls[path] += 1

    def wrap(self, module_name: str, attr: str, label: str) -> None:
        import functools
        import importlib

        try:
            owner: Any = importlib.import_module(module_name)
            *parents, name = attr.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = getattr(owner, name)
        except (ImportError, AttributeError):
            return  # the request path changed; time what is still there
        timer = self

        @functools.wraps(original)
        def timed(*a: Any, **kw: Any) -> Any:
            timer.stack.append(label)
            path = tuple(timer.stack)
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                timer.add(path, time.perf_counter() - start)
                timer.stack.pop()

        setattr(owner, name, timed)
        self._restore.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()
        self.order.clear()


def _wsgi_call(app: Any, target: str, body: bytes) -> bytes:
    import io

    path, _, query = target.partition("?")
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": query,
               "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "text/xml",
               "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
               "wsgi.url_scheme": "http", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80",
               "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1"}
    status: list[str] = []

    def start_response(s: str, headers: list[tuple[str, str]], exc: Any = None) -> None:
        status.append(s)

    out = b"".join(app(environ, start_response))
    if not status or not status[0].startswith("200"):
        raise RuntimeError(f"in-process request failed: {status} {out[:200]!r}")
    return out


def _request_body(n: int, base: int) -> bytes:
    return BODY_TEMPLATE.format(openid=openid_for(n), ts=int(time.time()),
                                msgid=base + n).encode()


def _time_app(app: Any, requests: int, warm: int, cpu: list[float] | None = None) -> float:
    """Mean wall µs per in-process request after a warm-up (and, into ``cpu``, this process's
    CPU µs per request, which other work on a shared machine disturbs far less). The signed
    paths are made beforehand, so neither figure includes signing them."""
    base = secrets.randbelow(10**6) * 10**9
    targets = [signed_target() for _ in range(warm + requests)]
    for i in range(warm):
        _wsgi_call(app, targets[i], _request_body(i, base))
    start, cpu0 = time.perf_counter(), time.process_time()
    for i in range(warm, warm + requests):
        _wsgi_call(app, targets[i], _request_body(i, base))
    if cpu is not None:
        cpu.append((time.process_time() - cpu0) / requests * 1e6)
    return (time.perf_counter() - start) / requests * 1e6


def _profile_newsbot(db_url: str, requests: int, workdir: Path) -> dict[str, Any]:
    import logging

    from sqlalchemy import event

    from bot.app import create_app
    from bot.logs import setup_logging
    from bot.settings import Settings
    from storage.db import make_engine

    _common.prepare_database(db_url, workdir)
    _common.seed_sample_issue(db_url)
    settings = Settings.model_validate(_common.base_sections(db_url))
    engine = make_engine(db_url)
    # The server logs one INFO line per request; keep that cost, send it nowhere.
    devnull = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    setup_logging("INFO", stream=devnull)
    app = create_app(settings, engine)
    # Every openid once first: a reader's first message creates the subscriber on the write
    # path; what is measured is the steady state of known readers.
    warm = max(USERS, requests // 5)
    cpu: list[float] = []
    plain_us = _time_app(app, requests, warm, cpu)

    timer = _StageTimer()
    sql: dict[str, list[float]] = {}

    def before(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        conn.info.setdefault("bench_t0", []).append(time.perf_counter())

    def after(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        started = conn.info["bench_t0"].pop()
        verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
        if verb == "INSERT" and "CONFLICT" in statement.upper():
            verb = "INSERT … ON CONFLICT"
        sql.setdefault(verb, []).append(time.perf_counter() - started)

    for module, attr, label in _STAGES:
        timer.wrap(module, attr, label)
    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        _time_app(app, max(20, requests // 10), 0)  # warm the wrappers
        timer.reset()
        sql.clear()
        timed_us = _time_app(app, requests, 0)
    finally:
        timer.restore()
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)
        engine.dispose()
        logging.getLogger().handlers.clear()
        devnull.close()
    return {"plain_us": plain_us, "plain_cpu_us": cpu[0], "timed_us": timed_us,
            "timer": timer, "sql": sql, "requests": requests}


def _floors(db_url: str, rounds: int) -> list[tuple[str, float]]:
    """The cost of the smallest write transaction (one INSERT into inbound_message) through
    the raw driver, SQLAlchemy Core and the ORM session newsbot uses: what any design that
    writes once per message pays at least."""
    from sqlalchemy import insert

    from storage.db import make_engine, transaction
    from storage.models import InboundMessage, utcnow

    out: list[tuple[str, float]] = []
    base = secrets.token_hex(4)
    engine = make_engine(db_url)
    backend = engine.dialect.name

    def row(i: int, tag: str) -> dict[str, Any]:
        return {"dedupe_key": f"floor:{base}:{tag}:{i}", "openid": "ofloor", "status": "done",
                "created_at": utcnow()}

    # Raw driver.
    if backend == "sqlite":
        import sqlite3

        lite = sqlite3.connect(engine.url.database or "", isolation_level=None)
        lite.execute("PRAGMA journal_mode=WAL")
        lite.execute("PRAGMA synchronous=NORMAL")
        start = time.perf_counter()
        for i in range(rounds):
            lite.execute("BEGIN IMMEDIATE")
            lite.execute("INSERT INTO inbound_message (dedupe_key, openid, status, created_at) "
                         "VALUES (?, ?, 'done', ?) ON CONFLICT DO NOTHING",
                         (f"floor:{base}:raw:{i}", "ofloor", "2026-01-01 00:00:00"))
            lite.execute("COMMIT")
        out.append(("raw sqlite3: BEGIN IMMEDIATE; INSERT; COMMIT",
                    (time.perf_counter() - start) / rounds * 1e6))
        lite.close()
    else:
        import psycopg

        with psycopg.connect(_common.libpq_url(
                engine.url.render_as_string(hide_password=False))) as raw:
            start = time.perf_counter()
            for i in range(rounds):
                with raw.transaction():
                    raw.execute("INSERT INTO inbound_message (dedupe_key, openid, status, "
                                "created_at) VALUES (%s, %s, 'done', now()) "
                                "ON CONFLICT DO NOTHING", (f"floor:{base}:raw:{i}", "ofloor"))
            out.append(("raw psycopg: BEGIN; INSERT; COMMIT",
                        (time.perf_counter() - start) / rounds * 1e6))
    # SQLAlchemy Core.
    stmt = insert(InboundMessage)
    start = time.perf_counter()
    for i in range(rounds):
        with engine.begin() as conn:
            conn.execute(stmt, row(i, "core"))
    out.append(("SQLAlchemy Core: engine.begin() + INSERT (newsbot's engine)",
                (time.perf_counter() - start) / rounds * 1e6))
    # ORM session, as storage.db.transaction runs it.
    start = time.perf_counter()
    for i in range(rounds):
        with transaction(engine) as s:
            s.execute(stmt, row(i, "orm"))
    out.append(("ORM Session: storage.db.transaction + INSERT",
                (time.perf_counter() - start) / rounds * 1e6))
    engine.dispose()
    return out


def profile(args: argparse.Namespace) -> int:
    requests = 200 if args.quick else args.profile_requests
    pg_admin, pg_note = _common.pg_admin_url(quick=args.quick)
    if args.no_pg:
        pg_admin, pg_note = None, "PostgreSQL skipped: --no-pg"
    print(_common.machine_line(pg_admin))
    print(f"in-process, one thread, {requests:,} signed 本周 requests per database (no HTTP, "
          "no lock waits); inclusive wall time per request")
    if pg_note:
        note(pg_note)
    _common.wait_until_quiet(0 if args.quick else args.quiet_wait)
    echo_us = _time_app(_echo_app(), requests, max(50, requests // 5))
    print(f"\nWeRoBot echo, same request in-process: {echo_us:,.0f} µs/request")
    with tempfile.TemporaryDirectory(prefix="newsbot-profile-") as tmp:
        workdir = Path(tmp)
        dbs: list[tuple[str, Callable[[ExitStack], str]]] = [
            ("SQLite", lambda st: f"sqlite:///{workdir}/profile.db")]
        if pg_admin:
            dbs.append(("PostgreSQL", lambda st: st.enter_context(
                _common.temp_pg_database(pg_admin, prefix="newsbot_profile"))))
        for name, make_url in dbs:
            with ExitStack() as stack:
                url = make_url(stack)
                result = _profile_newsbot(url, requests, workdir)
                floors = _floors(url, max(100, requests // 2))
            _print_profile(name, result, floors, echo_us)
    return 0


def _print_profile(name: str, result: dict[str, Any], floors: list[tuple[str, float]],
                   echo_us: float) -> None:
    timer: _StageTimer = result["timer"]
    n = result["requests"]
    total = result["timed_us"]
    print(f"\n== newsbot 本周 on {name}: {result['plain_us']:,.0f} µs/request "
          f"({result['plain_us'] / echo_us:.1f}× the echo robot), "
          f"{result['plain_cpu_us']:,.0f} µs CPU in this process; {total:,.0f} µs with the "
          "timers in")
    table = Table(["stage (nested)", "µs/req", "% of request", "calls/req"], [])
    for path in timer.order:
        us = timer.totals[path] / n * 1e6
        table.rows.append(["  " * (len(path) - 1) + path[-1], f"{us:,.0f}",
                           f"{us / total * 100:.0f}", f"{timer.calls[path] / n:.1f}"])
    covered = sum(timer.totals[p] for p in timer.order if len(p) == 1) / n * 1e6
    table.rows.append(["rest (Bottle, WSGI, body read, ids)", f"{total - covered:,.0f}",
                       f"{(total - covered) / total * 100:.0f}", ""])
    print(table.render())
    sql: dict[str, list[float]] = result["sql"]
    count = sum(len(v) for v in sql.values())
    driver = sum(sum(v) for v in sql.values()) / n * 1e6
    parts = ", ".join(f"{verb} {len(v) / n:.1f}" for verb, v in sorted(sql.items()))
    print("(the fast path runs its statements on the driver directly: the next line counts "
          "only those made through SQLAlchemy)")
    print(f"SQL statements per request: {count / n:.1f} ({parts}); time inside the driver "
          f"(cursor.execute, incl. BEGIN for SQLite): {driver:,.0f} µs/request = "
          f"{driver / total * 100:.0f}%; the rest is Python")
    print("smallest write transaction (one INSERT):")
    for label, us in floors:
        print(f"  {label}: {us:,.0f} µs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per "
                        "server (default 20)")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds per server "
                        "(default 5)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every server this many times, interleaved; the ratios "
                        "are then medians over rounds (default 1)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent keep-alive "
                        "connections (default 16)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="gunicorn workers for every server (default: CPU count)")
    parser.add_argument("--threads", type=int, default=8,
                        help="threads per worker (default 8, newsbot's default)")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto",
                        help="load generator: wrk when installed, else pure Python")
    parser.add_argument("--gen-procs", type=int, default=os.cpu_count() or 2,
                        help="processes of the Python generator (default: CPU count)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny run for CI: 1 s per server, 4 connections, no hello-world")
    parser.add_argument("--skip-hello", action="store_true", help="skip the hello-world row")
    parser.add_argument("--reference-sync", action="store_true",
                        help="also measure the echo robot on sync workers (platform notes §10)")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--replay-cost", action="store_true",
                        help="in process: the replay check on and off in interleaved blocks "
                        "(--rounds blocks each), CPU and wall time per request")
    parser.add_argument("--events-cost", action="store_true",
                        help="in process: recording events (the card view of each 本周) on "
                        "and off in interleaved blocks (--rounds blocks each), CPU and wall "
                        "time per request")
    parser.add_argument("--side-by-side", action="store_true",
                        help="with --baseline: serve both checkouts at once (SQLite) and load "
                        "them together, half the connections each, so other work on the "
                        "machine hits both alike; prints this checkout's req/s over the "
                        "baseline's per round")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also serve newsbot from another checkout (rows b0/c0, "
                        "interleaved with b/c in every round) for before/after figures")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="wait up to this many seconds for other load on the machine to "
                        "stop before each server is measured (default 120)")
    parser.add_argument("--spy", action="store_true",
                        help="also sample newsbot's workers with py-spy during the measured "
                        "run and show where request wall time and CPU go (perturbs the run)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the load test: where newsbot's request time goes "
                        "(in-process stage timings, SQL counts, transaction floors)")
    parser.add_argument("--profile-requests", type=int, default=2000,
                        help="requests per database for --profile (default 2000)")
    parser.add_argument("--serve", choices=["hello", "echo"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-class", default="newsbot", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.workers, args.threads, args.worker_class)
        return 0
    if args.profile:
        return profile(args)
    if args.replay_cost:
        return replay_cost(args)
    if args.events_cost:
        return events_cost(args)
    if args.side_by_side:
        if not args.baseline:
            parser.error("--side-by-side needs --baseline DIR")
        return side_by_side(args)
    if args.quick:
        args.duration = min(args.duration, 1.0)
        args.warmup = min(args.warmup, 0.5)
        args.connections = min(args.connections, 4)
        args.skip_hello = True
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
