"""bench/purge.py keeps working: ``--quick`` (tiny sizes) runs, exits 0 and prints both tables.
Nothing here asserts on speed."""

from __future__ import annotations

from tests.test_bench_smoke import pg_expected, run_quick


def test_purge_quick() -> None:
    out = run_quick("purge.py")
    assert "(a) MiB per 1,000,000 deliveries" in out and "after VACUUM" in out
    assert "(b) webhook" in out and "SQLite: purged 50,000 of 50,000 rows" in out
    if pg_expected():
        assert "PostgreSQL: purged 50,000 of 50,000 rows" in out
    else:
        assert "PostgreSQL skipped" in out
