"""``newsbot demo``: a complete local setup in one command. A throwaway folder gets a config with
fresh random secrets, a SQLite database with the sample issues and a funded reader; the real
server (gunicorn, via ``newsbot serve``) runs as a child process and the chat simulator talks
to it over HTTP, exactly as WeChat would. A fake WeChat API (``bot.wechat.fake``) runs in this
process with 50 followers, so a broadcast can be watched end to end, and so does a fake WeChat
Pay (``bot.pay.fake``) with its own page that "pays" an order, so the pay page works too."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.text import Text
from sqlmodel import Session

import bot
from bot.demo.chat import run_chat
from bot.pay.fake import FakeIdentity, FakeWeChatPay
from bot.settings import ENV_PREFIX, Settings, SettingsError, load_settings
from bot.wechat.fake import FakeWeChat
from storage import codes, schema, subscribers
from storage.content import IssueFileError, parse_issue_file
from storage.db import make_engine, transaction
from storage.issues import publish_issue, upsert_issue
from storage.ledger import credit

log = logging.getLogger("newsbot.demo")

READER = "o_demo_reader"
OPERATOR = "o_demo_operator"
MARKER = ".newsbot-demo"
LOCK = ".newsbot-demo.lock"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
PUBLISHED_SAMPLE = "issue-001.md"
DRAFT_SAMPLE = "issue-002.md"
DEMO_APP_ID = "wx_newsbot_demo"
FOLLOWERS = [READER, OPERATOR] + [f"o_demo_follower_{i:02d}" for i in range(48)]
DEMO_PASS: dict[str, Any] = {"id": "month", "name": "月卡", "days": 30, "price": 100}
DEMO_CODE_TOKENS = 50  # each of the demo's two tokens codes
DEMO_PACKAGES: list[dict[str, Any]] = [
    {"id": "p30", "tokens": 30, "price_fen": 300, "label": "30 豆"},
    {"id": "p99", "tokens": 99, "price_fen": 990, "label": "99 豆"},
    {"id": "p300", "tokens": 300, "price_fen": 2800, "label": "300 豆（超值）"},
]


@dataclass(frozen=True)
class Seeded:
    balance: int  # the demo reader's
    codes: list[tuple[str, str]]  # (code, what it grants) for the newcomer to try


class DemoError(Exception):
    """The demo could not run; ``code`` is the CLI exit code (see ``bot.cli``)."""

    code = 1


class DemoRefused(DemoError):
    """The request itself is wrong (e.g. a --dir the demo may not use): nothing was touched."""

    code = 2


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def prepare_dir(workdir: Path) -> tuple[Path, TextIO]:
    """Lock the folder for this demo, then empty it, but only one that a previous demo made
    (or an empty one): ``--dir ~`` must never delete a home directory. Returns the folder and
    the open lock file, which must stay open while the demo runs."""
    workdir = workdir.resolve()
    if workdir.exists():
        if not workdir.is_dir():
            raise DemoRefused(f"{workdir} is a file, not a folder; choose another --dir")
        if (any(p.name != LOCK for p in workdir.iterdir())
                and not (workdir / MARKER).exists()):
            raise DemoRefused(f"{workdir} is not empty and was not made by `newsbot demo`; "
                            "choose another --dir or remove it yourself")
    workdir.mkdir(parents=True, exist_ok=True)
    lock = lock_dir(workdir)
    try:
        # The lock file stays: removing it would let a third demo lock a new file of the
        # same name while this one holds the old one.
        for entry in workdir.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (workdir / MARKER).write_text("made by `newsbot demo`; wiped on the next run\n",
                                      encoding="utf-8")
    except BaseException:
        lock.close()
        raise
    return workdir, lock


def lock_dir(workdir: Path) -> TextIO:
    """Hold an exclusive flock on the folder's lock file for as long as it stays open. The
    kernel drops it when the process ends however it ends, so a crashed demo never leaves a
    stale lock; the pid written into it is only for the message."""
    path = workdir / LOCK
    lock = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = _describe_holder(lock.read())
        lock.close()
        raise DemoRefused(
            f"a demo is already running in {workdir}{holder}: starting another here would "
            "replace its database, config and port.\n"
            f"Use that one (newsbot --config {workdir / 'config.toml'} chat), stop it with "
            "Ctrl-C in its terminal, or start a fresh one in another folder: "
            "newsbot demo --dir OTHER_FOLDER") from None
    except BaseException:
        lock.close()
        raise
    _write_lock(lock, {"pid": os.getpid()})
    return lock


def _write_lock(lock: TextIO, info: dict[str, object]) -> None:
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps(info) + "\n")
    lock.flush()


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
    except ValueError:
        return ""
    if not isinstance(info, dict):
        return ""
    parts = [f"pid {info['pid']}"] if isinstance(info.get("pid"), int) else []
    if isinstance(info.get("webhook"), str):
        parts.append(f"webhook {info['webhook']}")
    return f" ({', '.join(parts)})" if parts else ""


def _toml(value: str | int | list[str]) -> str:
    # JSON strings (ASCII with \uXXXX escapes) are valid TOML basic strings.
    return json.dumps(value)


def _pay_lines(pay: dict[str, Any] | None) -> list[str]:
    """The [pay] section for the fake WeChat Pay (keys written beside the config)."""
    if pay is None:
        return ["# No [pay]: the fake WeChat Pay could not start, so payments are off.", ""]
    lines = ["# The fake WeChat Pay inside the running demo process: nothing is charged.", "[pay]"]
    lines += [f"{k} = {_toml(v)}" for k, v in pay.items() if k != "packages"]
    for package in pay["packages"]:
        lines += ["", "[[pay.packages]]", *(f"{k} = {_toml(v)}" for k, v in package.items())]
    return [*lines, ""]


def start_fake_pay(workdir: Path, console: Console) -> tuple[FakeWeChatPay | None,
                                                              dict[str, Any] | None]:
    """The fake WeChat Pay and its [pay] table, or (None, None) when it cannot start: the
    demo then runs without payments."""
    try:
        fake = FakeWeChatPay(FakeIdentity.generate(app_id=DEMO_APP_ID), retry_scale=0.01,
                             refund_delay_s=1.0).start()
    except OSError as exc:
        console.print(f"no fake WeChat Pay ({exc}); payments are off in this demo",
                      style="yellow", markup=False)
        return None, None
    table = fake.identity.pay_table(workdir / "pay", fake.base_url)
    table["packages"] = DEMO_PACKAGES
    return fake, table


def write_config(workdir: Path, *, port: int, api_base: str, app_secret: str,
                 token: str, pay: dict[str, Any] | None = None) -> Path:
    db = (workdir / "newsbot.db").as_posix()
    lines = [
        "# Written by `newsbot demo`: throwaway secrets for a local demo, never for production.",
        "# Reuse it with other commands: newsbot --config THIS_FILE user list",
        "",
        "[server]",
        f"host = {_toml('127.0.0.1')}",
        f"port = {port}",
        f"public_url = {_toml(f'http://127.0.0.1:{port}')}",
        "workers = 1",
        "threads = 4",
        "",
        "[wechat]",
        f"token = {_toml(token)}",
        "# The fake WeChat API inside the running demo process (gone when the demo stops).",
        f"app_id = {_toml(DEMO_APP_ID)}",
        f"app_secret = {_toml(app_secret)}",
        f"api_base = {_toml(api_base)}",
        "",
        "[database]",
        f"url = {_toml('sqlite:///' + db)}",
        "",
        "[reader]",
        f"secret = {_toml(secrets.token_urlsafe(32))}",
        "",
        "[content]",
        "# The sample issues' own masthead.",
        'publication = "深潮周刊"',
        "",
        "[operators]",
        f"openids = {_toml([OPERATOR])}",
        "",
        "[codes]",
        "# Redemption and gift codes are on: the demo prints a few at startup.",
        f"secret = {_toml(secrets.token_urlsafe(32))}",
        "",
        "# One pass on sale: reply 开通 月卡 in the chat.",
        "[[passes]]",
        f"id = {_toml(DEMO_PASS['id'])}",
        f"name = {_toml(DEMO_PASS['name'])}",
        f"days = {DEMO_PASS['days']}",
        f"price = {DEMO_PASS['price']}",
        "",
        "[broadcast]",
        'mode = "openids"',
        "# No weekly job in the demo: broadcast by hand with `newsbot broadcast N`.",
        "scheduler = false",
        f"preview_openids = {_toml([OPERATOR])}",
        "",
        *_pay_lines(pay),
    ]
    path = workdir / "config.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    path.chmod(0o600)
    return path


@contextmanager
def _sample(name: str) -> Iterator[Path | None]:
    resource = files("bot").joinpath("sample", name)
    if not resource.is_file():
        yield None
        return
    with as_file(resource) as path:
        yield path


def seed(settings: Settings, console: Console) -> Seeded:
    """Sample issues, the demo reader and their credit, and a small batch of codes to try."""
    free = settings.content.free_percent
    engine = make_engine(settings.database.url)
    try:
        schema.upgrade(engine)  # the migrations, as `newsbot db upgrade` would run them
        with _sample(PUBLISHED_SAMPLE) as path:
            if path is None:
                raise DemoError(f"the sample issue bot/sample/{PUBLISHED_SAMPLE} is missing")
            try:
                issue = parse_issue_file(path, default_free_percent=free)
            except IssueFileError as exc:
                raise DemoError(f"sample issue: {exc}") from exc
        with transaction(engine) as session:
            upsert_issue(session, parsed=issue, default_free_percent=free)
            publish_issue(session, number=issue.number)
        with _sample(DRAFT_SAMPLE) as path:
            if path is not None:
                try:
                    draft = parse_issue_file(path, default_free_percent=free)
                except IssueFileError as exc:
                    console.print(f"skipping the draft sample: {exc}", style="yellow",
                                  markup=False)
                else:
                    with transaction(engine) as session:
                        upsert_issue(session, parsed=draft, default_free_percent=free)
        with transaction(engine) as session:
            # As `newsbot users sync` would pull them from WeChat.
            subscribers.add_followers(session, openids=FOLLOWERS)
            # Enough for one unlock of the sample and a little over.
            result = credit(session, openid=READER, amount=issue.price + 21, kind="topup",
                            key="demo:credit", reason="demo credit", operator="newsbot demo")
            made = _demo_codes(session, settings)
        return Seeded(result.balance, made)
    finally:
        engine.dispose()


def _demo_codes(session: Session, settings: Settings) -> list[tuple[str, str]]:
    """Two codes of 50 tokens and one of the demo pass, as `newsbot code create` makes them."""
    secret = settings.chat_config().codes.secret
    unit = settings.tokens.name
    tokens = codes.create_batch(session, secret=secret, kind="tokens", count=2,
                                tokens=DEMO_CODE_TOKENS, label="demo", created_by="newsbot demo")
    month = codes.create_batch(session, secret=secret, kind="pass", count=1,
                               pass_id=DEMO_PASS["id"], pass_days=DEMO_PASS["days"],
                               label="demo", created_by="newsbot demo")
    return ([(code, f"{DEMO_CODE_TOKENS} {unit}") for code in tokens.codes]
            + [(code, f"{DEMO_PASS['name']}（{DEMO_PASS['days']} 天）") for code in month.codes])


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    # The child must import this very copy of the code, installed or not.
    package_root = str(Path(bot.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def start_server(config: Path, workdir: Path) -> subprocess.Popen[bytes]:
    with (workdir / "server.log").open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=_child_env(),
        )


def wait_until_healthy(proc: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the server exited with code {proc.returncode}:\n"
                            f"{_log_tail(log_path)}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise DemoError(f"the server did not answer /healthz within {STARTUP_TIMEOUT_S:.0f} s:\n"
                    f"{_log_tail(log_path)}")


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM (gunicorn finishes in-flight requests), then SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        return proc.wait()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _panel(settings: Settings, config: Path, workdir: Path, webhook: str,
           seeded: Seeded) -> Panel:
    unit = settings.tokens.name
    text = Text()
    text.append("newsbot demo is running\n\n", style="bold")
    text.append(f"Webhook  {webhook}\nFolder   {workdir}  (config.toml, newsbot.db, "
                "server.log)\n\n")
    text.append(f"You are {READER} with {seeded.balance} {unit}, enough for one unlock. Try:\n",
                style="bold")
    text.append("  本周   试读   兑换   余额   往期   帮助   充值   会员卡   赠送 1\n")
    text.append("  /subscribe   /click LATEST   /retry   /help   /quit\n")
    text.append(f"  /user {OPERATOR}  then  #topup {READER} 50 gift   (operator)\n\n")
    text.append("Redemption codes to send in the chat (each works once):\n", style="bold")
    for code, grants in seeded.codes:
        text.append(f"  {code}   {grants}\n")
    text.append(f"Then buy the pass: 开通 {DEMO_PASS['name']} ({DEMO_PASS['price']} {unit}, "
                f"{DEMO_PASS['days']} 天).\n\n")
    text.append("Reader links open in a normal browser.\n\n")
    if settings.pay is not None:
        text.append("Pay (fake WeChat Pay, nothing is charged):\n", style="bold")
        text.append("  reply 充值, open the link in a browser and pick a package; under the QR\n"
                    "  code, 在假微信支付页面付款 → 确认支付: the page shows 到账 once the bot\n"
                    "  has credited it. A shortfall reply's link pays the difference and\n"
                    "  unlocks the issue in one step.\n")
        text.append(f"  The fake's orders: {settings.pay.api_base}/\n\n")
    text.append("Watch a broadcast (another terminal, while the demo runs):\n", style="bold")
    text.append(f"  newsbot --config {config} issue publish 2\n")
    text.append(f"  newsbot --config {config} broadcast 2 --preview   (to {OPERATOR} only)\n")
    text.append(f"  newsbot --config {config} broadcast 2\n")
    text.append(f"  newsbot --config {config} broadcast status\n")
    text.append("Pushed messages and previews show up here in the chat.\n\n")
    text.append("The operators' console (a web page; the link opens once, for 15 minutes):\n",
                style="bold")
    text.append(f"  /user {OPERATOR}  then  #console   (or: newsbot --config {config} "
                f"console-link {OPERATOR})\n")
    text.append("  Text no command takes (e.g. 你们的发票怎么开？) lands in its 留言 inbox.\n\n")
    text.append(f"How it sells:    newsbot --config {config} stats\n")
    text.append(f"Messages:        newsbot --config {config} inbox   (answer: reply OPENID TEXT)\n")
    text.append(f"Other commands:  newsbot --config {config} user list\n")
    text.append(f"What was sold:   newsbot --config {config} revenue\n")
    text.append(f"Chat from another terminal:  newsbot --config {config} chat\n")
    return Panel(text, title="newsbot demo", expand=False)


def _watch_pushes(fake: FakeWeChat, console: Console) -> None:
    """Show what the fake WeChat pushes, as the phones would: each broadcast batch, and each
    `broadcast --preview` (mass/preview), which only the previewed openid receives."""

    def watch() -> None:
        seen_sends = seen_previews = 0
        while fake.running:
            sends, previews = fake.mass_sends, fake.previews
            for send in sends[seen_sends:]:
                if fake.deliveries.get(READER):
                    followers = "follower" if send.sent_count == 1 else "followers"
                    console.print(f"\n📣 pushed to {send.sent_count} {followers} "
                                  f"(batch msg_id {send.msg_id}):\n{send.content}\n",
                                  style="cyan", markup=False)
            for openid, content in previews[seen_previews:]:
                console.print(f"\n👀 preview pushed to {openid} only "
                              f"([broadcast] preview_openids):\n{content}\n",
                              style="cyan", markup=False)
            seen_sends, seen_previews = len(sends), len(previews)
            time.sleep(0.3)

    threading.Thread(target=watch, name="demo-push-watch", daemon=True).start()


def run_demo(*, port: int | None, workdir: Path, chat: bool, console: Console) -> int:
    """Set up, serve, chat; returns the exit code. The folder is left for inspection."""
    # These signals end the demo the same way, through the finally below that stops the server
    # (SIGINT is set explicitly: a shell's `&` starts background jobs with it ignored; SIGHUP
    # is a closed terminal window, which would otherwise leave the server running).
    previous = {sig: signal.signal(sig, _interrupt)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    proc: subprocess.Popen[bytes] | None = None
    fake: FakeWeChat | None = None
    fake_pay: FakeWeChatPay | None = None
    lock: TextIO | None = None
    try:
        workdir, lock = prepare_dir(workdir)
        port = port or free_port()
        token, app_secret = secrets.token_hex(16), secrets.token_hex(16)
        fake = FakeWeChat(app_id=DEMO_APP_ID, app_secret=app_secret, followers=FOLLOWERS,
                          webhook_url=f"http://127.0.0.1:{port}/wechat",
                          webhook_token=token).start()
        fake_pay, pay = start_fake_pay(workdir, console)
        config = write_config(workdir, port=port, api_base=fake.base_url,
                              app_secret=app_secret, token=token, pay=pay)
        settings = load_settings(config, environ={})
        seeded = seed(settings, console)
        base_url = f"http://127.0.0.1:{port}"
        webhook = base_url + settings.server.webhook_path
        _write_lock(lock, {"pid": os.getpid(), "webhook": webhook})
        console.print(f"starting the server on {base_url} …", style="dim", markup=False)
        # Assigned before the health wait, so a signal during startup still stops it.
        proc = start_server(config, workdir)
        wait_until_healthy(proc, base_url, workdir / "server.log")
        console.print(_panel(settings, config, workdir, webhook, seeded))
        _watch_pushes(fake, console)
        if chat:
            return run_chat(url=webhook, token=settings.wechat.token, openid=READER,
                            console=console)
        console.print("serving; Ctrl-C to stop", style="dim")
        code = proc.wait()
        console.print(f"the server exited with code {code}:\n"
                      f"{_log_tail(workdir / 'server.log')}", style="red", markup=False)
        return 1
    except KeyboardInterrupt:
        return 0
    except (DemoError, SettingsError) as exc:
        console.print(str(exc), style="red", markup=False)
        return 2 if isinstance(exc, SettingsError) else exc.code
    finally:
        if fake is not None:
            fake.stop()
        if fake_pay is not None:
            fake_pay.stop()
        if proc is not None:
            stop_server(proc)
            console.print(f"server stopped; the demo files stay in {workdir}", style="dim",
                          markup=False)
        if lock is not None:
            lock.close()  # after the server is gone: the next demo may now take the folder
        for sig, handler in previous.items():
            signal.signal(sig, handler)
