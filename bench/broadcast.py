"""The weekly push to 1,000,000 subscribers in ``openids`` mode, through the fake WeChat API.

Three processes, so that each figure belongs to the right one:

* the fake WeChat API (``bot.fake_wechat.FakeWeChat`` with 1,000,000 followers), run by this
  script in a process of its own so it can report per-openid deliveries at the end;
* this script, which creates the database, imports and publishes the sample issue and seeds
  the subscribers (``storage.subscribers.add_followers``, pages of 10,000; not timed);
* the broadcasting process, which does only the broadcast (``bot.broadcast.Broadcaster`` with
  the real ``WeChatClient``) and reports its wall time and peak RSS
  (``getrusage(RUSAGE_SELF).ru_maxrss``).

    python bench/broadcast.py                 # 1,000,000 subscribers on SQLite and PostgreSQL
    python bench/broadcast.py --quick         # 3,000 subscribers, for CI

Targets: the broadcast takes ≤ 60 s and the broadcasting process peaks at ≤ 150 MB RSS; every
subscriber gets exactly one delivery.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
from _common import Table, child_env, note, verdict

TARGET_SECONDS = 60.0
TARGET_RSS_MB = 150.0
APP_ID = "wx_bench"
APP_SECRET = "bench-secret"
SEED_PAGE = 10_000


def _rss_mb() -> float:
    """Peak RSS of this process in MB. On Linux, VmHWM of /proc/self/status: getrusage's
    ru_maxrss survives exec, so a child started from a big parent (this script holds a million
    openids while seeding) would report the parent's size. Elsewhere ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def _maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


# --------------------------------------------------------------------------- the fake API


def serve_fake(followers: int) -> int:
    """Child mode: serve the fake API; on stdin ``report`` print the delivery summary as one
    JSON line; stop at end of input."""
    from bot.wechat.fake import FakeWeChat, fake_openids

    fake = FakeWeChat(app_id=APP_ID, app_secret=APP_SECRET, followers=fake_openids(followers))
    with fake:
        print(fake.base_url, flush=True)
        for line in sys.stdin:
            if line.strip() != "report":
                continue
            counts = list(fake.deliveries.values())
            follower_set = set(fake.followers)
            sends = [m for m in fake.mass_sends if m.kind == "send"]
            summary = {
                "followers": len(fake.followers),
                "delivered_openids": len(counts),
                "exactly_once": sum(1 for c in counts if c == 1),
                "more_than_once": sum(1 for c in counts if c > 1),
                "total_deliveries": sum(counts),
                "not_followers": sum(1 for o in fake.deliveries if o not in follower_set),
                "mass_send_calls": len(sends),
                "largest_call": max((m.total_count for m in sends), default=0),
                "errors": sum(1 for c in fake.calls if c.errcode not in (0, None)),
                "fake_rss_mb": round(_rss_mb(), 1),
            }
            print(json.dumps(summary), flush=True)
    return 0


@dataclass
class Fake:
    proc: subprocess.Popen[str]
    base_url: str

    def report(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        data: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return data


@contextmanager
def fake_api(followers: int) -> Iterator[Fake]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-fake", str(followers)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=child_env())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("http"):
            raise RuntimeError(f"the fake WeChat API did not start (said {line!r})")
        yield Fake(proc, line)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _common.stop_process(proc)


# --------------------------------------------------------------------------- the broadcaster


def run_broadcast(config: str, number: int) -> int:
    """Child mode: only the broadcast. Prints one JSON line with its figures."""
    from bot.jobs.broadcast import Broadcaster, Progress
    from bot.settings import load_settings
    from bot.wechat.api import WeChatClient
    from storage.db import make_engine

    settings = load_settings(config)
    engine = make_engine(settings.database.url)
    batches = 0

    def on_progress(p: Progress) -> None:
        nonlocal batches
        batches = p.batch

    rss_before = _rss_mb()
    with WeChatClient(settings.wechat, engine) as client:
        sender = Broadcaster(settings, engine, client, on_progress=on_progress)
        began = time.perf_counter()
        record = sender.start(number, force=True)
        seconds = time.perf_counter() - began
    engine.dispose()
    print(json.dumps({"seconds": seconds, "rss_before_mb": rss_before, "peak_rss_mb": _rss_mb(),
                      "ru_maxrss_mb": _maxrss_mb(),
                      "status": record.status, "recipients": record.recipients,
                      "batches": record.batches_sent, "progress_batches": batches}), flush=True)
    return 0


# --------------------------------------------------------------------------- seeding


def seed(db_url: str, workdir: Path, subscribers: int, base_url: str,
         batch_size: int) -> tuple[Path, int, float]:
    """Schema, the sample issue (published), the subscribers; returns (config, issue, seconds
    spent adding subscribers)."""
    from bot.wechat.fake import fake_openids
    from storage import subscribers as subs
    from storage.db import make_engine, transaction

    config = _common.prepare_database(db_url, workdir)
    number = _common.seed_sample_issue(db_url)
    sections = _common.base_sections(db_url)
    sections["wechat"].update({"app_id": APP_ID, "app_secret": APP_SECRET, "api_base": base_url})
    sections["broadcast"].update({"mode": "openids", "batch_size": batch_size})
    _common.write_config(config, sections)
    engine = make_engine(db_url)
    openids = fake_openids(subscribers)
    began = time.perf_counter()
    try:
        for start in range(0, subscribers, SEED_PAGE):
            with transaction(engine) as s:
                subs.add_followers(s, openids=openids[start:start + SEED_PAGE])
    finally:
        engine.dispose()
    return config, number, time.perf_counter() - began


@dataclass
class Result:
    backend: str
    subscribers: int
    seed_seconds: float = 0.0
    run: dict[str, Any] = field(default_factory=dict)
    deliveries: dict[str, Any] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        d = self.deliveries
        return (d.get("delivered_openids") == self.subscribers
                and d.get("exactly_once") == self.subscribers
                and d.get("more_than_once") == 0 and d.get("not_followers") == 0
                and d.get("errors") == 0
                and self.run.get("recipients") == self.subscribers
                and self.run.get("status") == "done")


def measure(backend: str, db_url: str, workdir: Path, subscribers: int, batch_size: int,
            quiet_wait: float) -> Result:
    result = Result(backend, subscribers)
    with fake_api(subscribers) as fake:
        print(f"  {backend}: seeding {subscribers:,} subscribers …", flush=True)
        config, number, result.seed_seconds = seed(db_url, workdir, subscribers, fake.base_url,
                                                   batch_size)
        _common.wait_until_quiet(quiet_wait)
        print(f"  {backend}: broadcasting …", flush=True)
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--run-broadcast", str(config),
             "--issue", str(number)],
            capture_output=True, text=True, env=child_env(), check=False)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("{")), "")
        if done.returncode != 0 or not line:
            raise RuntimeError(f"the broadcast failed ({done.returncode}):\n{done.stdout}\n"
                               f"{done.stderr[-3000:]}")
        result.run = json.loads(line)
        result.deliveries = fake.report()
    return result


@contextmanager
def database(backend: str, pg_admin: str | None, workdir: Path) -> Iterator[str]:
    with ExitStack() as stack:
        if backend == "PostgreSQL":
            assert pg_admin is not None
            yield stack.enter_context(_common.temp_pg_database(
                pg_admin, prefix="newsbot_bench_broadcast"))
        else:
            yield f"sqlite:///{workdir}/broadcast.db"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A broadcast to many subscribers through the "
                                     "fake WeChat API.")
    parser.add_argument("--subscribers", type=int, default=1_000_000,
                        help="subscribers and fake followers (default 1,000,000)")
    parser.add_argument("--batch-size", type=int, default=10_000,
                        help="[broadcast] batch_size: openids per mass/send call (default "
                        "10,000, WeChat's maximum)")
    parser.add_argument("--quick", action="store_true",
                        help="3,000 subscribers in batches of 1,000, for CI")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="wait up to this many seconds for other load on the machine to "
                        "stop before each broadcast (default 120)")
    parser.add_argument("--serve-fake", type=int, metavar="FOLLOWERS", help=argparse.SUPPRESS)
    parser.add_argument("--run-broadcast", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--issue", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fake is not None:
        return serve_fake(args.serve_fake)
    if args.run_broadcast:
        return run_broadcast(args.run_broadcast, args.issue)
    if args.quick:
        args.subscribers = min(args.subscribers, 3_000)
        args.batch_size = min(args.batch_size, 1_000)
        args.quiet_wait = 0
    pg_admin, pg_note = _common.pg_admin_url(quick=args.quick)
    if args.no_pg:
        pg_admin, pg_note = None, "PostgreSQL skipped: --no-pg"
    print(_common.machine_line(pg_admin))
    print(f"{args.subscribers:,} subscribers, mode openids, batches of {args.batch_size:,}, "
          "fake WeChat API in its own process; the broadcasting process does only the "
          "broadcast")
    if pg_note:
        note(pg_note)
    backends = ([] if args.no_sqlite else ["SQLite"]) + (["PostgreSQL"] if pg_admin else [])
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="newsbot-bench-broadcast-") as tmp:
        workdir = Path(tmp)
        for backend in backends:
            with database(backend, pg_admin, workdir) as url:
                results.append(measure(backend, url, workdir, args.subscribers,
                                       args.batch_size, args.quiet_wait))
    return report(results)


def report(results: list[Result]) -> int:
    print()
    table = Table(["database", "subscribers", "seed s (untimed)", "broadcast s", "batches",
                   "peak RSS MB", "RSS before MB", "ru_maxrss MB", "recipients", "delivered once",
                   "twice+", "missing", "fake RSS MB"], [])
    for r in results:
        d = r.deliveries
        missing = r.subscribers - int(d.get("delivered_openids", 0))
        table.rows.append([r.backend, f"{r.subscribers:,}", f"{r.seed_seconds:.1f}",
                           f"{r.run['seconds']:.2f}", str(r.run["batches"]),
                           f"{r.run['peak_rss_mb']:.1f}", f"{r.run['rss_before_mb']:.1f}",
                           f"{r.run.get('ru_maxrss_mb', 0):.1f}",
                           f"{r.run['recipients']:,}", f"{d.get('exactly_once', 0):,}",
                           str(d.get("more_than_once", 0)), str(missing),
                           f"{d.get('fake_rss_mb', 0):.0f}"])
    print(table.render())
    print()
    ok = True
    for r in results:
        fast = r.run["seconds"] <= TARGET_SECONDS
        small = r.run["peak_rss_mb"] <= TARGET_RSS_MB
        print(f"{r.backend}: broadcast {r.run['seconds']:.1f} s (target ≤ {TARGET_SECONDS:g} s): "
              f"{verdict(fast)}; peak RSS {r.run['peak_rss_mb']:.1f} MB (target ≤ "
              f"{TARGET_RSS_MB:g} MB): {verdict(small)}; exactly one delivery per subscriber: "
              f"{'OK' if r.exact else 'WRONG'}")
        ok = ok and r.exact
    if results:
        note("peak RSS is VmHWM (/proc/self/status) of the broadcasting process; ru_maxrss is "
             "shown too but on Linux it carries over the parent's peak across exec")
    if results and results[0].subscribers < 1_000_000:
        note("the targets are defined for 1,000,000 subscribers; this run used "
             f"{results[0].subscribers:,}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
