"""End to end: the real ``newsbot serve`` (gunicorn, gthread) as a subprocess, driven over
HTTP with signed WeChat XML, the CLI moving money in between, the reader link followed like a
browser would, and a clean exit on SIGTERM. Also ``newsbot demo`` and ``newsbot chat``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from bot.cli import app
from tests.conftest import SAMPLE_ISSUE, TOKEN, WeChatUser, child_env, free_port

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# From the end of the sample issue: only a paying reader's page may contain it.
LAST_SENTENCE = "你们的支持决定了这份周刊能走多远"
SAMPLE_TITLE = "AI客服的真实账本"


def newsbot(*args: str) -> list[str]:
    return [sys.executable, "-m", "bot.cli", *args]


def wait_healthy(proc: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"no /healthz within {STARTUP_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Last resort in ``finally``: the process and anything it started (its own session, so
    this also reaches a gunicorn left behind by a process that has already exited)."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=STOP_TIMEOUT_S)


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) != 0


def cli(config: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["--config", str(config), *args])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base_url: str
    port: int
    config: Path
    log: Path

    def cli(self, *args: str) -> Result:
        return cli(self.config, *args)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def running_server(tmp_path: Path, db_url: str) -> Iterator[Server]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\npublic_url = "{base_url}"\n'
        f"workers = 2\nthreads = 4\n\n"
        f'[wechat]\ntoken = "{TOKEN}"\n\n'
        f'[database]\nurl = "{db_url}"\n\n'
        f'[reader]\nsecret = "e2e-reader-secret-0123456789"\n',
        encoding="utf-8",
    )
    imported = cli(config, "issue", "import", str(SAMPLE_ISSUE))
    assert imported.exit_code == 0, imported.output
    assert cli(config, "issue", "publish", "1").exit_code == 0
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            newsbot("serve", "--config", str(config)), cwd=tmp_path, env=child_env(),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_healthy(proc, base_url, log)
        yield Server(proc, base_url, port, config, log)
    finally:
        kill_group(proc)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("NEWSBOT_"):
            monkeypatch.delenv(name)


def test_serve_end_to_end(tmp_path: Path, db_url: str) -> None:
    with (running_server(tmp_path, db_url) as server,
          httpx.Client(base_url=server.base_url, timeout=10.0) as http):
        reader = WeChatUser(http, "o_e2e_reader", token=TOKEN)

        card = reader.send("本周")
        assert card["type"] == "text" and SAMPLE_TITLE in card["content"]

        preview = reader.send("试读")
        assert preview["type"] == "text" and f"{server.base_url}/read/1?" in preview["content"]
        preview_link = next(w for w in preview["content"].split()
                            if w.startswith(f"{server.base_url}/read/1?"))
        locked = http.get(preview_link)
        assert locked.status_code == 200 and LAST_SENTENCE not in locked.text

        topped = server.cli("topup", "o_e2e_reader", "120", "--reason", "e2e credit")
        assert topped.exit_code == 0, topped.output

        unlocked = reader.send("兑换")
        assert unlocked["type"] == "news", unlocked
        assert "99" in unlocked["description"] and unlocked["url"].startswith(server.base_url)

        page = http.get(unlocked["url"])
        assert page.status_code == 200
        assert LAST_SENTENCE in page.text
        assert "no-store" in page.headers["cache-control"]

        again = reader.send("兑换")
        assert again["type"] == "news" and "未重复扣费" in again["description"]

        shown = server.cli("user", "show", "o_e2e_reader", "--json")
        assert shown.exit_code == 0, shown.output
        data: dict[str, Any] = json.loads(shown.stdout)
        assert data["balance"] == 21 and data["unlocked"] == [1]
        assert [e["kind"] for e in data["entries"]] == ["redeem", "topup"]

        check = server.cli("ledger", "check")
        assert check.exit_code == 0 and "ledger OK" in check.stdout

        assert server.stop(signal.SIGTERM) == 0
        assert port_closed(server.port)


def test_chat_retry_gets_identical_reply(tmp_path: Path, db_url: str) -> None:
    with running_server(tmp_path, db_url) as server:
        done = subprocess.run(
            newsbot("chat", "--url", f"{server.base_url}/wechat", "--user", "o_chat_e2e",
                    "--token", TOKEN),
            input="本周\n/retry\n/quit\n".encode(), capture_output=True, cwd=tmp_path,
            env=child_env(), timeout=30,
        )
        out = done.stdout.decode()
        assert done.returncode == 0, out + done.stderr.decode()
        # The transcript: each echoed prompt line is followed by that message's reply.
        chunks = out.split("o_chat_e2e> ")
        first = chunks[1].removeprefix("本周\n")
        retried = chunks[2].removeprefix("/retry\n")
        assert SAMPLE_TITLE in first
        assert first == retried
        # The retry was recognised as the same delivery, not handled twice.
        server.stop()
        assert "outcome=duplicate" in server.log.read_text(errors="replace")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_demo_serves_and_stops_on_signal(tmp_path: Path, sig: int) -> None:
    port = free_port()
    workdir = tmp_path / "demo"
    log = tmp_path / "demo.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            newsbot("demo", "--no-chat", "--port", str(port), "--dir", str(workdir)),
            cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, base_url, log)
        settings = tomllib.loads((workdir / "config.toml").read_text(encoding="utf-8"))
        assert settings["operators"]["openids"] == ["o_demo_operator"]
        with httpx.Client(base_url=base_url, timeout=10.0) as http:
            reply = WeChatUser(http, "o_demo_reader", token=settings["wechat"]["token"]).send(
                "本周")
        assert reply["type"] == "text" and SAMPLE_TITLE in reply["content"]
        assert "120" in reply["content"]  # the demo credit shows as the reader's balance

        proc.send_signal(sig)
        assert proc.wait(timeout=STOP_TIMEOUT_S + 5) == 0
        assert port_closed(port)
        assert (workdir / "newsbot.db").exists() and (workdir / "server.log").exists()
    finally:
        kill_group(proc)


def test_demo_refuses_a_foreign_folder(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete", encoding="utf-8")
    result = CliRunner().invoke(app, ["demo", "--no-chat", "--dir", str(precious)])
    assert result.exit_code == 2  # a --dir the demo may not use: the request is wrong
    assert (precious / "thesis.txt").exists()
