"""Several processes against one database, as in production: two ``newsbot serve`` on one
PostgreSQL database, one ``newsbot serve --workers 2`` on SQLite, and a scheduler in every
process with exactly one of them running the weekly job.

Every server is a real subprocess; requests are signed WeChat XML over HTTP, the setup goes
through the CLI, and the books are checked through the CLI and by reading the database."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner, Result

from bot.cli import app
from bot.wechat.fake import FakeWeChat
from handlers.errors import BUSY
from storage.db import make_engine, read_only
from storage.models import Broadcast, Entitlement, Issue, LedgerEntry, Subscriber, WeeklyRun
from tests.conftest import (
    OPERATOR,
    SAMPLE_DRAFT,
    SAMPLE_ISSUE,
    TOKEN,
    WeChatUser,
    child_env,
    free_port,
    parse_reply,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gunicorn needs fork")

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 20.0
BARRIER_TIMEOUT_S = 15.0
THREADS = 32
READER_SECRET = "multiprocess-reader-secret-0123456789"
TZ = "Asia/Shanghai"
APP_ID = "wx_mp"
APP_SECRET = "mp-secret"

USERS = [f"o_mp_user_{i:02d}" for i in range(20)]
CLI_CREDIT = 100
CHAT_TOPUP = 5
SMALL_PRICE = 30
SAMPLE_PRICE = 99  # bot/sample/issue-001.md
EXTRA_ISSUES = range(2, 12)  # ten small issues next to the sample one


# --------------------------------------------------------------------------- processes


def newsbot(*args: str) -> list[str]:
    return [sys.executable, "-m", "bot.cli", *args]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


class Processes:
    """Every server a test starts. ``stop_all`` (always reached through ``running()``) sends
    SIGTERM to each process group, waits, then SIGKILLs whatever is left."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[Server] = []

    def serve(self, name: str, config: Path, port: int, *extra: str) -> Server:
        log = self.tmp_path / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                newsbot("serve", "--config", str(config), *extra), cwd=self.tmp_path,
                env=child_env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(name, proc, port, log)
        self.servers.append(server)
        return server

    def stop_all(self) -> dict[str, int | None]:
        for s in self.servers:
            if s.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(s.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        codes: dict[str, int | None] = {}
        for s in self.servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            codes[s.name] = s.proc.returncode
        for s in self.servers:
            # Also reaches a worker left behind by a master that has already exited.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait(timeout=STOP_TIMEOUT_S)
        return codes


@contextlib.contextmanager
def running(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def wait_healthy(server: Server, *, workers: int = 1) -> None:
    """/healthz answers and, with several workers, every worker has built its app."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"{server.name} exited with {server.proc.returncode}:\n"
                        f"{server.log_text()}")
        try:
            healthy = httpx.get(f"{server.base_url}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy and server.log_text().count("worker ready") >= workers:
            return
        time.sleep(0.1)
    pytest.fail(f"{server.name}: not ready within {STARTUP_TIMEOUT_S} s:\n{server.log_text()}")


# --------------------------------------------------------------------------- config and CLI


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def write_config(path: Path, *, db_url: str, port: int, workers: int = 1, threads: int = 8,
                 broadcast: dict[str, Any] | None = None,
                 wechat: dict[str, Any] | None = None,
                 extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """A server's config file; ``extra`` adds whole sections (``{"codes": {...}}``)."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}",
                   "workers": workers, "threads": threads},
        "wechat": {"token": TOKEN, **(wechat or {})},
        "database": {"url": db_url},
        "reader": {"secret": READER_SECRET},
        "operators": {"openids": [OPERATOR]},
        # The weekly job stays out of the ledger tests; the scheduler test turns it on.
        "broadcast": {"scheduler": False, **(broadcast or {})},
        **(extra or {}),
    }
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def cli(config: Path, *args: str) -> Result:
    """The operator CLI in process; the developer's NEWSBOT_* variables are hidden from it."""
    hidden: dict[str, str | None] = {k: None for k in os.environ if k.startswith("NEWSBOT_")}
    return CliRunner().invoke(app, ["--config", str(config), *args], env=hidden)


def cli_ok(config: Path, *args: str) -> Result:
    result = cli(config, *args)
    assert result.exit_code == 0, (args, result.output)
    return result


@functools.cache
def has_db_command() -> bool:
    done = subprocess.run(newsbot("--help"), capture_output=True, text=True, env=child_env(),
                          timeout=60, check=False)
    return re.search(r"(?m)^\W*db\s", done.stdout) is not None


def prepare_database(config: Path) -> None:
    """Bring the schema up to date the way an operator would; without a `db` command the CLI
    commands below create it."""
    if not has_db_command():
        return
    done = subprocess.run(newsbot("db", "upgrade", "--config", str(config)),
                          capture_output=True, text=True, env=child_env(), timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@contextlib.contextmanager
def database(url: str) -> Iterator[Engine]:
    engine = make_engine(url, pooled=False)
    try:
        yield engine
    finally:
        engine.dispose()


@contextlib.contextmanager
def reading(engine: Engine) -> Iterator[Session]:
    """A read-only session whose loaded rows stay usable after it ends (tests may read the
    database)."""
    with read_only(engine) as s:
        yield s
        s.expunge_all()  # the closing rollback would expire them otherwise


# --------------------------------------------------------------------------- content


def write_issue(folder: Path, number: int) -> Path:
    path = folder / f"issue-{number:03d}.md"
    path.write_text(f"""+++
number = {number}
title = "并发测试第{number}期"
summary = "多进程测试用的一期小刊。"
price = {SMALL_PRICE}

[[topics]]
title = "第{number}期的话题"
questions = ["两个进程同时扣费会怎样？"]
+++

这是第{number}期的开头，任何人都可以读到这一段免费的内容，用来确认试读部分正常。

## 第{number}期的话题

付费正文从这里开始：两个进程、同一个数据库、同一条消息，只能扣一次费。

再写一段，让正文长一些，免费比例才有东西可切。
""", encoding="utf-8")
    return path


def publish_issues(config: Path, folder: Path) -> dict[int, int]:
    """The sample issue plus ten small ones, imported and published through the CLI."""
    files = [str(SAMPLE_ISSUE)] + [str(write_issue(folder, n)) for n in EXTRA_ISSUES]
    cli_ok(config, "issue", "import", *files)
    for number in (1, *EXTRA_ISSUES):
        cli_ok(config, "issue", "publish", str(number))
    return {1: SAMPLE_PRICE} | {n: SMALL_PRICE for n in EXTRA_ISSUES}


# --------------------------------------------------------------------------- the workload


Kind = Literal["hello", "redeem", "topup", "balance"]


@dataclass(frozen=True)
class Delivery:
    kind: Kind
    sender: str
    msg_id: int
    content: str
    server: int
    create_time: int
    issue: int | None = None
    target: str | None = None  # whose balance a top-up is for
    group: str | None = None  # "dup" (same MsgId twice) or "race" (same unlock, two MsgIds)


@dataclass(frozen=True)
class Outcome:
    delivery: Delivery
    status: int
    body: str
    reply: dict[str, str]

    @property
    def text(self) -> str:
        return self.reply.get("content", "") + self.reply.get("description", "")


class Workload:
    """Random but reproducible traffic; ``tasks`` holds groups that are released together."""

    def __init__(self, *, seed: int, servers: int, cross_server_pairs: bool,
                 prices: dict[int, int]) -> None:
        self.rng = random.Random(seed)
        self.servers = servers
        self.cross = cross_server_pairs
        self.prices = prices
        self.ids = itertools.count(seed * 10**6 + 1)
        self.now = int(time.time())

    def one(self, kind: Kind, sender: str, content: str, *, server: int | None = None,
            issue: int | None = None, target: str | None = None,
            group: str | None = None) -> Delivery:
        return Delivery(kind, sender, next(self.ids), content,
                        self.rng.randrange(self.servers) if server is None else server,
                        self.now, issue, target, group)

    def redeem(self, user: str, issue: int, **kw: Any) -> Delivery:
        return self.one("redeem", user, f"兑换 {issue}", issue=issue, **kw)

    def pair_servers(self) -> tuple[int, int]:
        return (0, 1) if self.cross else (0, 0)

    def tasks(self, *, redeems: int, races: int, topups: int, balances: int,
              dups: int) -> list[list[Delivery]]:
        rng = self.rng
        issues = sorted(self.prices)
        out: list[list[Delivery]] = []
        out += [[self.redeem(rng.choice(USERS), rng.choice(issues))] for _ in range(redeems)]
        out += [[self.one("topup", OPERATOR, f"#topup {u} {CHAT_TOPUP} r", target=u)]
                for u in (rng.choice(USERS) for _ in range(topups))]
        out += [[self.one("balance", rng.choice(USERS), "余额")] for _ in range(balances)]
        first, second = self.pair_servers()
        for _ in range(races):  # one unlock asked for twice at once, two different MsgIds
            user, issue = rng.choice(USERS), rng.choice(issues[1:])  # affordable ones
            out.append([self.redeem(user, issue, server=first, group="race"),
                        self.redeem(user, issue, server=second, group="race")])
        for _ in range(dups):  # WeChat delivering the very same message twice at once
            d = self.redeem(rng.choice(USERS), rng.choice(issues), server=first, group="dup")
            out.append([d, dataclasses.replace(d, server=second)])
        rng.shuffle(out)
        return out


def post(http: httpx.Client, d: Delivery, barrier: threading.Barrier | None) -> Outcome:
    user = WeChatUser(http, d.sender)
    xml = user.text_xml(d.content, msg_id=d.msg_id, create_time=d.create_time)
    if barrier is not None:
        barrier.wait()
    resp = user.post_xml(xml)
    reply = parse_reply(resp.text) if resp.status_code == 200 else {}
    return Outcome(d, resp.status_code, resp.text, reply)


def run_tasks(servers: list[Server], tasks: list[list[Delivery]]) -> list[Outcome]:
    """Everything at once on ``THREADS`` threads. The two halves of a pair are submitted next
    to each other, so a free thread always picks up the partner a barrier is waiting for."""
    limits = httpx.Limits(max_connections=THREADS, max_keepalive_connections=THREADS)
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(httpx.Client(base_url=s.base_url,
                                                    timeout=REQUEST_TIMEOUT_S, limits=limits))
                   for s in servers]
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            futures = []
            for group in tasks:
                barrier = (threading.Barrier(len(group), timeout=BARRIER_TIMEOUT_S)
                           if len(group) > 1 else None)
                futures += [pool.submit(post, clients[d.server], d, barrier) for d in group]
            return [f.result() for f in futures]


def say_hello(servers: list[Server], workload: Workload) -> list[Outcome]:
    """Each user messages once, so the subscriber exists before the CLI credits them."""
    tasks = [[workload.one("hello", u, "帮助", server=i % len(servers))]
             for i, u in enumerate([*USERS, OPERATOR])]
    outcomes = run_tasks(servers, tasks)
    assert all(o.status == 200 and o.reply["type"] == "text" for o in outcomes), outcomes
    return outcomes


# --------------------------------------------------------------------------- the checks


_BALANCE = re.compile(r"余额 (\d+)")


def charged(o: Outcome) -> bool:
    """Did the reply tell the user that money moved?"""
    if o.delivery.kind == "redeem":
        return "兑换成功" in o.text
    if o.delivery.kind == "topup":
        return o.text.startswith("✅ 已为")
    return False


def check_replies(outcomes: list[Outcome]) -> None:
    failed = [(o.delivery, o.status, o.body[:300]) for o in outcomes if o.status != 200]
    assert not failed, f"{len(failed)} requests failed: {failed[:5]}"
    busy = [o.delivery for o in outcomes if BUSY in o.text]
    assert not busy, f"handler errors (answered {BUSY!r}): {busy[:5]}"
    replayed = [o.delivery for o in outcomes if "重复指令" in o.text]
    assert not replayed, f"a delivery reached the ledger twice: {replayed[:5]}"
    for o in outcomes:
        d = o.delivery
        if d.kind == "redeem":
            ok = (o.reply["type"] == "news" and ("兑换成功" in o.text or "已解锁过" in o.text)) \
                or (o.reply["type"] == "text" and "余额不足" in o.text)
            assert ok, (d, o.reply)
        elif d.kind == "topup":
            assert o.reply["type"] == "text" and charged(o), (d, o.reply)
        elif d.kind == "balance":
            assert o.reply["type"] == "text" and "你的余额" in o.text, (d, o.reply)

    by_id: dict[int, list[Outcome]] = {}
    for o in outcomes:
        by_id.setdefault(o.delivery.msg_id, []).append(o)
    dups = [group for group in by_id.values() if len(group) > 1]
    assert dups and all(g[0].delivery.group == "dup" for g in dups)
    for first, second in dups:
        assert first.reply == second.reply, (
            f"MsgId {first.delivery.msg_id} delivered twice got two different replies (was the "
            f"second handled again instead of answered from the first?): {first.reply} vs "
            f"{second.reply}")
    races = [o for o in outcomes if o.delivery.group == "race"]
    unlocks = Counter((o.delivery.sender, o.delivery.issue) for o in races if charged(o))
    assert all(n == 1 for n in unlocks.values()), unlocks


def check_books(config: Path, url: str, outcomes: list[Outcome], prices: dict[int, int]) -> None:
    check = cli(config, "ledger", "check")
    assert check.exit_code == 0 and "ledger OK" in check.output, check.output

    shown: dict[str, dict[str, Any]] = {}
    for openid in USERS:
        shown[openid] = json.loads(cli_ok(config, "user", "show", openid, "--json",
                                          "--entries", "100000").stdout)
    negative = {u: d["balance"] for u, d in shown.items() if d["balance"] < 0}
    assert not negative, negative

    with database(url) as engine, reading(engine) as s:
        entries = list(s.exec(select(LedgerEntry)).all())
        entitlements = list(s.exec(select(Entitlement)).all())
        balances = {sub.openid: sub.balance for sub in s.exec(select(Subscriber)).all()}
    assert all(b >= 0 for b in balances.values()), balances

    # Every balance is the sum of its entries, in the database and as the CLI shows it.
    for openid in USERS:
        own = [e for e in entries if e.openid == openid]
        assert balances[openid] == sum(e.amount for e in own), openid
        assert shown[openid]["balance"] == balances[openid]
        assert sorted(e["id"] for e in shown[openid]["entries"]) == sorted(
            e.id for e in own if e.id is not None)

    # One entry per MsgId that moved money, none for the others, and each says what the
    # reply said.
    keys = Counter(e.idempotency_key for e in entries)
    assert all(n == 1 for n in keys.values()), [k for k, n in keys.items() if n > 1]
    by_key = {e.idempotency_key: e for e in entries}
    answered: dict[int, Outcome] = {}
    for o in outcomes:
        answered.setdefault(o.delivery.msg_id, o)
    charged_keys = set()
    for msg_id, o in answered.items():
        key = f"wechat:{o.delivery.sender}:{msg_id}"
        entry = by_key.get(key)
        if not charged(o):
            assert entry is None, (o.delivery, o.reply, entry)
            continue
        charged_keys.add(key)
        assert entry is not None, (o.delivery, o.reply)
        d = o.delivery
        if d.kind == "redeem":
            assert (entry.kind, entry.openid, entry.issue_number) == ("redeem", d.sender, d.issue)
            assert d.issue is not None and entry.amount == -prices[d.issue]
        else:
            assert (entry.kind, entry.openid, entry.amount, entry.operator) == (
                "topup", d.target, CHAT_TOPUP, OPERATOR)
        said = _BALANCE.search(o.text)
        assert said is not None and int(said.group(1)) == entry.balance_after, (o.text, entry)
    assert {k for k in keys if k.startswith("wechat:")} == charged_keys

    # Entitlements: unique per (user, issue), one per redemption, and the unlock count matches.
    redeems = [e for e in entries if e.kind == "redeem"]
    pairs = Counter((g.openid, g.issue_number) for g in entitlements)
    assert all(n == 1 for n in pairs.values()), [p for p, n in pairs.items() if n > 1]
    assert sorted(g.ledger_entry_id or 0 for g in entitlements) == sorted(
        e.id or 0 for e in redeems)
    assert set(pairs) == {(e.openid, e.issue_number) for e in redeems}
    unlocked_replies = sum(1 for o in answered.values()
                           if o.delivery.kind == "redeem" and charged(o))
    assert unlocked_replies == len(redeems) == len(entitlements)
    for openid in USERS:
        assert sorted(shown[openid]["unlocked"]) == sorted(
            g.issue_number for g in entitlements if g.openid == openid)

    # Money in = money out + money left.
    topped = sum(1 for o in answered.values() if o.delivery.kind == "topup" and charged(o))
    spent = sum(-e.amount for e in redeems)
    assert sum(balances[u] for u in USERS) == len(USERS) * CLI_CREDIT + topped * CHAT_TOPUP \
        - spent


def check_logs(servers: list[Server], outcomes: list[Outcome]) -> set[str]:
    """No 500 and no handler error anywhere; every MsgId handled once, the second delivery of
    each duplicate answered from the first. Returns the pids that handled webhook requests."""
    text = "\n".join(s.log_text() for s in servers)
    problems = [line for line in text.splitlines()
                if "status=500" in line or "outcome=error" in line or "Traceback" in line]
    assert not problems, "\n".join(problems[:20])
    handled = re.findall(r"\[(\d+)\] newsbot\.webhook: webhook .* outcome=ok ", text)
    replayed = re.findall(r"outcome=duplicate", text)
    distinct = len({o.delivery.msg_id for o in outcomes})
    assert (len(handled), len(replayed)) == (distinct, len(outcomes) - distinct)
    return set(handled)


def exercise(servers: list[Server], config: Path, url: str, prices: dict[int, int], *,
             cross_server_pairs: bool) -> set[str]:
    """Users say hello, get a CLI credit, then the concurrent burst; then every check."""
    workload = Workload(seed=20261124, servers=len(servers),
                        cross_server_pairs=cross_server_pairs, prices=prices)
    hello = say_hello(servers, workload)
    for openid in USERS:
        cli_ok(config, "topup", openid, str(CLI_CREDIT), "--reason", "multiprocess credit")
    # 200 requests, plus 20 MsgIds delivered twice at the same moment.
    tasks = workload.tasks(redeems=110, races=10, topups=35, balances=35, dups=20)
    assert sum(len(t) for t in tasks) == 240
    started = time.monotonic()
    outcomes = run_tasks(servers, tasks)
    elapsed = time.monotonic() - started
    check_replies(outcomes)
    check_books(config, url, outcomes, prices)
    pids = check_logs(servers, hello + outcomes)
    unlocked = sum(1 for o in outcomes if o.delivery.kind == "redeem" and charged(o))
    print(f"{len(outcomes)} requests in {elapsed:.2f} s; {unlocked} unlock replies; "
          f"webhook handled by pids {sorted(pids)}")
    return pids


# --------------------------------------------------------------------------- the tests


def test_two_servers_share_one_postgresql_database(tmp_path: Path, postgres_url: str) -> None:
    ports = [free_port(), free_port()]
    configs = [write_config(tmp_path / f"server-{i}.toml", db_url=postgres_url, port=port)
               for i, port in enumerate(ports)]
    prepare_database(configs[0])
    prices = publish_issues(configs[0], tmp_path)
    with running(tmp_path) as procs:
        servers = [procs.serve(f"server-{i}", config, port)
                   for i, (config, port) in enumerate(zip(configs, ports, strict=True))]
        for server in servers:
            wait_healthy(server)
        pids = exercise(servers, configs[0], postgres_url, prices, cross_server_pairs=True)
        assert len(pids) >= 2  # both servers handled webhook traffic
        codes = procs.stop_all()
    assert codes == {"server-0": 0, "server-1": 0}


def test_gunicorn_workers_share_one_sqlite_file(tmp_path: Path, sqlite_url: str) -> None:
    port = free_port()
    config = write_config(tmp_path / "config.toml", db_url=sqlite_url, port=port)
    prepare_database(config)
    prices = publish_issues(config, tmp_path)
    with running(tmp_path) as procs:
        server = procs.serve("server", config, port, "--workers", "2")
        wait_healthy(server, workers=2)
        pids = exercise([server], config, sqlite_url, prices, cross_server_pairs=False)
        assert len(pids) == 2, "both workers should have handled webhook requests"
        codes = procs.stop_all()
    assert codes == {"server": 0}


def cron_two_minutes_ago() -> str:
    """A daily crontab line whose last fire time was 2–3 minutes ago in ``TZ``: daily, so it
    stays in the grace window across hour and midnight boundaries alike."""
    then = datetime.now(ZoneInfo(TZ)) - timedelta(minutes=2)
    return f"{then.minute} {then.hour} * * *"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_one_scheduler_among_many_runs_the_missed_weekly_job_once(
        tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> None:
    url: str = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    followers = [f"o_mp_follower_{i:02d}" for i in range(25)]
    with FakeWeChat(app_id=APP_ID, app_secret=APP_SECRET, followers=followers) as fake:
        cron = cron_two_minutes_ago()
        broadcast = {"scheduler": True, "mode": "openids", "cron": cron, "timezone": TZ,
                     "misfire_grace_s": 3600, "batch_size": 10}
        wechat = {"app_id": APP_ID, "app_secret": APP_SECRET, "api_base": fake.base_url}
        ports = [free_port(), free_port()]
        configs = [write_config(tmp_path / f"sched-{i}.toml", db_url=url, port=port, threads=2,
                                broadcast=broadcast, wechat=wechat)
                   for i, port in enumerate(ports)]
        prepare_database(configs[0])
        cli_ok(configs[0], "issue", "import", str(SAMPLE_ISSUE), str(SAMPLE_DRAFT))
        cli_ok(configs[0], "issue", "publish", "1")
        synced = json.loads(cli_ok(configs[0], "users", "sync", "--json").stdout)
        assert synced["active"] == len(followers)
        with database(url) as engine, reading(engine) as s:
            before = {i.number: i.published_at for i in s.exec(select(Issue)).all()}
        assert before[1] is not None and before[2] is None  # issue 2 is the draft

        with running(tmp_path) as procs:
            # Both start at once: each start-up catches up the fire time missed 2 minutes ago.
            servers = [procs.serve(f"sched-{i}", config, port)
                       for i, (config, port) in enumerate(zip(configs, ports, strict=True))]
            for server in servers:
                wait_healthy(server)
            runs = wait_for_weekly_run(url)
            # Each server's scheduler is a process of its own; let the slower one catch up too
            # (and find the fire time claimed) before stopping them.
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while time.monotonic() < deadline:
                logs = [s.log_text() for s in servers]
                if (all("catching up the weekly job" in text for text in logs)
                        and sum("already claimed elsewhere" in text for text in logs) == 1):
                    break
                time.sleep(0.2)
            codes = procs.stop_all()
        assert codes == {"sched-0": 0, "sched-1": 0}

        with database(url) as engine, reading(engine) as s:
            after = {i.number: i.published_at for i in s.exec(select(Issue)).all()}
            casts = list(s.exec(select(Broadcast)).all())
            final_runs = list(s.exec(select(WeeklyRun)).all())

        assert len(runs) == len(final_runs) == 1
        run = final_runs[0]
        assert (run.status, run.published_issue, run.broadcast_issue) == ("done", 2, 2), run
        assert after[1] == before[1] and after[2] is not None  # the draft, published once
        assert [(c.issue_number, c.status, c.recipients, c.batches_sent) for c in casts] == [
            (2, "done", len(followers), 3)]

        # One broadcast: 3 batches (10 + 10 + 5), every follower exactly one message.
        assert [m.kind for m in fake.mass_sends] == ["send"] * 3
        assert sorted(m.total_count for m in fake.mass_sends) == [5, 10, 10]
        assert len({m.clientmsgid for m in fake.mass_sends}) == 3
        assert len({m.content for m in fake.mass_sends}) == 1
        assert fake.deliveries == dict.fromkeys(followers, 1)

        assert all("catching up the weekly job" in text for text in logs), logs
        assert sum("already claimed elsewhere" in text for text in logs) == 1, logs
        assert len(fake.mass_sends) == 3  # still one broadcast once both have run


def wait_for_weekly_run(url: str) -> list[WeeklyRun]:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with database(url) as engine:
        while True:
            with reading(engine) as s:
                runs = list(s.exec(select(WeeklyRun)).all())
            if runs and all(r.status != "running" for r in runs):
                return runs
            if time.monotonic() > deadline:
                pytest.fail(f"no finished weekly_run within {STARTUP_TIMEOUT_S} s: {runs}")
            time.sleep(0.1)
