"""Helpers shared by the benchmark scripts: the repository on ``sys.path``, machine facts,
throw-away PostgreSQL databases, config files, percentiles and plain-text tables.

The scripts are run as files (``python bench/webhook.py``), so this module is imported as
``_common`` and puts the repository root on ``sys.path`` for ``bot``/``storage``/``handlers``.
"""

from __future__ import annotations

import os
import platform
import resource
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAMPLE_ISSUE = ROOT / "bot" / "sample" / "issue-001.md"
TOKEN = "bench-wechat-token"
READER_SECRET = "bench-reader-secret-0123456789abcdef"
PG_ENV = "NEWSBOT_TEST_DATABASE_URL"
# Used in full-size runs when $NEWSBOT_TEST_DATABASE_URL is not set.
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def child_env() -> dict[str, str]:
    """The environment for a subprocess that imports the project from the repository root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    # Settings overrides from the caller's shell must not leak into a benchmark server.
    for name in list(env):
        if name.startswith("NEWSBOT_") and "__" in name:
            del env[name]
    env.pop("NEWSBOT_CONFIG", None)
    return env


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def machine_line(pg_admin: str | None = None) -> str:
    parts = [f"CPU {cpu_model()}", f"{os.cpu_count()} cores", f"RAM {ram_gib():.1f} GiB",
             f"Python {platform.python_version()}", f"SQLite {sqlite3.sqlite_version}"]
    if pg_admin:
        version = pg_server_version(pg_admin)
        if version:
            parts.append(f"PostgreSQL {version}")
    return "machine: " + ", ".join(parts)


# --------------------------------------------------------------------------- PostgreSQL


def libpq_url(url: str) -> str:
    """``postgresql+psycopg://…`` (SQLAlchemy) → ``postgresql://…`` (libpq)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}"


def sqlalchemy_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgres", "postgresql"):
        scheme = "postgresql+psycopg"
    return f"{scheme}{sep}{rest}"


def _with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(sqlalchemy_url(url)).set(database=name).render_as_string(
        hide_password=False)


def pg_admin_url(*, quick: bool) -> tuple[str | None, str]:
    """The server URL to create throw-away databases on, or None and why it is skipped.

    Quick (CI) runs use PostgreSQL only when $NEWSBOT_TEST_DATABASE_URL is set; full runs fall
    back to the local server. Either way an unreachable server is skipped, not an error."""
    url = os.environ.get(PG_ENV, "")
    if not url:
        if quick:
            return None, f"PostgreSQL skipped: ${PG_ENV} is not set (quick mode)"
        url = PG_DEFAULT
    url = sqlalchemy_url(url)
    try:
        import psycopg
    except ImportError:
        return None, "PostgreSQL skipped: psycopg is not installed (pip install -e '.[postgres]')"
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"PostgreSQL skipped: cannot connect ({first})"
    return url, ""


def pg_server_version(admin_url: str) -> str:
    try:
        import psycopg

        with psycopg.connect(libpq_url(admin_url), connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]).split()[0] if row else ""
    except Exception:
        return ""


@contextmanager
def temp_pg_database(admin_url: str, prefix: str = "newsbot_bench") -> Iterator[str]:
    """A fresh, empty database on the admin URL's server; dropped afterwards (connections
    still open, such as a killed server's, are terminated first). Yields its SQLAlchemy URL."""
    import psycopg
    from psycopg import sql

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_database(admin_url, name)
    finally:
        with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


@contextmanager
def fresh_database(backend: str, pg_admin: str | None, workdir: Path, tag: str,
                   prefix: str) -> Iterator[str]:
    """A new database with the schema (``newsbot db upgrade``): a throw-away PostgreSQL
    database named ``prefix_<random>`` on ``pg_admin``'s server, or ``workdir/tag.db``."""
    with ExitStack() as stack:
        if backend == "PostgreSQL":
            assert pg_admin is not None
            url = stack.enter_context(temp_pg_database(pg_admin, prefix=prefix))
        else:
            url = f"sqlite:///{workdir}/{tag}.db"
        prepare_database(url, workdir)
        yield url


def children_cpu() -> float:
    """User+system CPU seconds of this process's finished children (worker processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Fanned:
    """What ``fan_out``'s processes reported, with the CPU they (and PostgreSQL) used."""

    results: list[Any]
    client_cpu_s: float
    db_cpu_s: float
    busy_pct: float


def fan_out(target: Any, args_per_process: list[tuple[Any, ...]], timeout: float = 3600
            ) -> Fanned:
    """Run ``target(*args, queue)`` in a forked process per ``args``, and collect the one
    result each puts on the queue."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue: Any = ctx.Queue()
    workers = [ctx.Process(target=target, args=(*a, queue)) for a in args_per_process]
    cpu0, db0, busy0 = children_cpu(), named_processes_cpu("postgres"), machine_busy()
    for w in workers:
        w.start()
    results = [queue.get(timeout=timeout) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    busy1 = machine_busy()
    return Fanned(results, children_cpu() - cpu0, named_processes_cpu("postgres") - db0,
                  (busy1[0] - busy0[0]) / (busy1[1] - busy0[1]) * 100
                  if busy1[1] > busy0[1] else 0.0)


def add_run_options(parser: Any) -> None:
    """The options every script takes: --quick, --no-pg, --quiet-wait."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="wait up to this many seconds for other load on the machine to "
                        "stop before measuring (default 120)")


def pg_for(args: Any) -> tuple[str | None, str]:
    """``pg_admin_url`` for parsed ``add_run_options``: (admin URL or None, why skipped)."""
    if args.no_pg:
        return None, "PostgreSQL skipped: --no-pg"
    return pg_admin_url(quick=args.quick)


# --------------------------------------------------------------------------- config files


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A newsbot config file from ``{section: {key: value}}`` (scalars and flat lists)."""
    lines: list[str] = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def base_sections(db_url: str, *, port: int = 8080) -> dict[str, dict[str, Any]]:
    """Secrets set, the given database, no scheduler in the server's master."""
    return {
        "server": {"host": "127.0.0.1", "port": port,
                   "public_url": f"http://127.0.0.1:{port}"},
        "wechat": {"token": TOKEN},
        "database": {"url": db_url},
        "reader": {"secret": READER_SECRET},
        "broadcast": {"scheduler": False},
    }


def run_cli(config: Path, *args: str, timeout: float = 300) -> str:
    """``newsbot --config CONFIG ARGS…`` in a subprocess (as an operator would run it)."""
    done = subprocess.run([sys.executable, "-m", "bot.cli", "--config", str(config), *args],
                          capture_output=True, text=True, env=child_env(), timeout=timeout,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"newsbot {' '.join(args)} failed ({done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")
    return done.stdout


def prepare_database(db_url: str, workdir: Path) -> Path:
    """The schema, made the way an operator makes it: ``newsbot db upgrade``. Returns the
    config file written for it (secrets set, this database)."""
    config = write_config(workdir / f"schema-{secrets.token_hex(3)}.toml",
                          base_sections(db_url))
    run_cli(config, "db", "upgrade")
    return config


def seed_sample_issue(db_url: str) -> int:
    """Import the sample issue and publish it now (the schema must exist). Returns the issue
    number."""
    from storage.content import parse_issue_file
    from storage.db import make_engine, transaction
    from storage.issues import publish_issue, upsert_issue

    engine = make_engine(db_url)
    try:
        parsed = parse_issue_file(SAMPLE_ISSUE, default_free_percent=10)
        with transaction(engine) as session:
            upsert_issue(session, parsed=parsed, default_free_percent=10)
            publish_issue(session, number=parsed.number)
    finally:
        engine.dispose()
    return parsed.number


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[Any] | None, timeout: float = 30.0,
                  what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM this one process (gunicorn's master stops its workers), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def process_tree_cpu(pid: int) -> float:
    """User+system CPU seconds used so far by a process and its live children (Linux /proc;
    0.0 elsewhere). Used to compare servers independently of the load generator."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
        for kid in kids:
            found.append(kid)
            found += _children(kid)
    return found


def child_pids(pid: int) -> list[int]:
    return _children(pid)


def named_processes_cpu(name: str) -> float:
    """CPU seconds used so far by every process whose command name is ``name`` (e.g. the
    local PostgreSQL server's backends); 0.0 where /proc is not readable."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    try:
        entries = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return 0.0
    for entry in entries:
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.find("(") + 1:raw.rfind(")")]
        if comm != name:
            continue
        fields = raw.rsplit(")", 1)[1].split()
        # utime + stime, plus cutime + cstime: the server's parent collects the CPU of
        # backends that have exited (a closed connection's backend is gone by the reading).
        total += sum(int(f) for f in fields[11:15]) / tick
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat; diff two readings for a share."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0, 0.0
    values = [float(v) for v in first]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


def busy_share(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over the next ``seconds`` (0.0 where /proc/stat is missing)."""
    busy0, total0 = machine_busy()
    time.sleep(seconds)
    busy1, total1 = machine_busy()
    return (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0


def wait_until_quiet(max_wait: float, threshold: float = 0.15) -> None:
    """Benchmarks share the machine with whatever else runs on it: wait up to ``max_wait``
    seconds for it to go quiet, and say so when it does not (the figures are then low)."""
    deadline = time.monotonic() + max_wait
    share = busy_share()
    while share > threshold and time.monotonic() < deadline:
        share = busy_share(2.0)
    if share > threshold:
        note(f"the machine was {share:.0%} busy with other work before this run; the "
             "figures below are lower than on a quiet machine")


# --------------------------------------------------------------------------- figures


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(pct / 100 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]

    def render(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(self.headers)]
        line = "  ".join(h.ljust(w) for h, w in zip(self.headers, widths, strict=True))
        out = [line, "  ".join("-" * w for w in widths)]
        for row in self.rows:
            out.append("  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        return "\n".join(out)


def note(message: str) -> None:
    print(f"note: {message}", flush=True)
