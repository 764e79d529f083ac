"""The benchmark scripts keep working: each runs in ``--quick`` mode (tiny sizes, a few
seconds) as a subprocess, exits 0 and prints its figures. Nothing here asserts on speed; the
PostgreSQL parts run only when ``NEWSBOT_TEST_DATABASE_URL`` is set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def run_quick(script: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run([sys.executable, str(BENCH / script), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{script} --quick failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.startswith("machine: "), done.stdout
    return done.stdout


def pg_expected() -> bool:
    return bool(os.environ.get("NEWSBOT_TEST_DATABASE_URL"))


def test_webhook_quick() -> None:
    out = run_quick("webhook.py")
    assert "req/s" in out and "p99 ms" in out
    assert "a: WeRoBot echo" in out and "b: newsbot 本周, SQLite" in out
    assert "b/a = " in out
    if pg_expected():
        assert "c: newsbot 本周, PostgreSQL" in out and "c/a = " in out
    else:
        assert "PostgreSQL skipped" in out and "c/a = n/a" in out
    # The generator's answers were checked: no failed requests, no errors in the server logs.
    assert "log errors 0" in out
    assert "load errors" not in out


def test_redeem_quick() -> None:
    out = run_quick("redeem.py")
    assert "redemptions/s" in out
    assert "SQLite race: 14 of 20 succeeded, expected exactly ⌊100/7⌋ = 14: OK" in out
    if pg_expected():
        assert "PostgreSQL race: 14 of 20 succeeded" in out
        assert "PostgreSQL: n/a" not in out
    else:
        assert "PostgreSQL skipped" in out


def test_broadcast_quick() -> None:
    out = run_quick("broadcast.py")
    assert "peak RSS" in out and "broadcast s" in out
    assert "SQLite: broadcast " in out
    assert "exactly one delivery per subscriber: OK" in out
    assert "WRONG" not in out
    if pg_expected():
        assert "PostgreSQL: broadcast " in out


def test_codes_quick() -> None:
    out = run_quick("codes.py")
    assert "SQLite: 500 codes created and exported in " in out
    assert "SQLite: " in out and " code redemptions/s through newsbot serve" in out
    if pg_expected():
        assert "PostgreSQL: 500 codes created and exported in " in out
        assert "PostgreSQL: " in out.split("through newsbot serve")[0]
    else:
        assert "PostgreSQL skipped" in out
    # Every row checked out: the CSV, the sample redeemed, each delivered code used once.
    assert "WRONG" not in out and " OK" in out


@pytest.mark.parametrize("script", ["webhook.py", "redeem.py", "broadcast.py", "codes.py"])
def test_help(script: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout


def test_code_redeem_quick() -> None:
    out = run_quick("code_redeem.py")
    assert "redemptions/s" in out and "books" in out
    assert "statements:" in out
    if pg_expected():
        assert "PostgreSQL: n/a" not in out and "WITH 1" in out
    else:
        assert "PostgreSQL skipped" in out and "SQLite" in out


def test_pay_notify_quick() -> None:
    out = run_quick("pay_notify.py")
    assert "notifications/s" in out
    assert "SQLite books: 100 credits for 100 orders, ledger check clean: OK" in out
    if pg_expected():
        assert "PostgreSQL books: 100 credits for 100 orders" in out
    else:
        assert "PostgreSQL skipped" in out
