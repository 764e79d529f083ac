"""Running things: the server, the demo and the chat simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bot.cli.base import (
    WHOLE_NUMBER,
    ConfigOpt,
    LogLevel,
    _database,
    _fail,
    _settings,
    app,
    err,
    out,
)
from bot.logs import setup_logging
from bot.settings import Settings
from bot.wechat.crypto import safe_mode_problems


def plain_mode_warning(settings: Settings) -> str | None:
    """A warning when operator commands may arrive in plain messages, whose signature does not
    cover the body: only 安全模式 authenticates what an operator's message says."""
    wechat = settings.wechat
    if not settings.operators.openids:
        return None
    if not wechat.encoding_aes_key:
        why = "no [wechat] encoding_aes_key is set (plain mode)"
    elif wechat.accept_plain:
        why = "[wechat] accept_plain = true (compatible mode)"
    else:
        return None
    return (f"warning: [operators] openids is set while plain messages are accepted: {why}. "
            "A plain message's signature does not cover its text; replays are refused, but "
            "the secure setting is 安全模式 with accept_plain = false (see docs/deploy.md, "
            "\"Safe mode\").")


@app.command()
def serve(
    ctx: typer.Context,
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: [server] host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: [server] port).",
                                             parser=WHOLE_NUMBER)] = None,
    workers: Annotated[int | None, typer.Option(
        help="Worker processes (default: [server] workers).", parser=WHOLE_NUMBER)] = None,
    threads: Annotated[int | None, typer.Option(
        help="Threads per worker (default: [server] threads).", parser=WHOLE_NUMBER)] = None,
    log_level: Annotated[LogLevel, typer.Option(help="Log level.")] = LogLevel.info,
) -> None:
    """Run the webhook and reader pages on gunicorn.

    Refuses to start (exit 2) unless the database schema is current: run `newsbot db upgrade`
    first."""
    from bot.server import ServerOptions, run_server

    given = {"host": host, "port": port, "workers": workers, "threads": threads}
    overrides = {"server": {k: v for k, v in given.items() if v is not None}}
    settings = _settings(ctx, config, overrides)
    problems = settings.missing_secrets(
        need_api=settings.broadcast.scheduler and settings.broadcast.mode != "off")
    wechat = settings.wechat
    problems += safe_mode_problems(wechat.encoding_aes_key, wechat.app_id,
                                   wechat.previous_encoding_aes_key)
    if problems:
        for line in problems:
            err.print(line, style="red", markup=False, soft_wrap=True)
        _fail("refusing to start until these are set", 2)
    if warning := plain_mode_warning(settings):
        err.print(warning, style="yellow", markup=False, soft_wrap=True)
    setup_logging(log_level.value.upper(), settings.server.log_format)
    with _database(settings, set_up_empty=False):
        pass  # checks the schema revision; each worker opens its own engine after the fork
    srv = settings.server
    run_server(settings, ServerOptions(host=srv.host, port=srv.port, workers=srv.workers,
                                       threads=srv.threads, log_level=log_level.value))


@app.command()
def demo(
    port: Annotated[int | None, typer.Option(help="Port (default: a free one).",
                                             parser=WHOLE_NUMBER)] = None,
    workdir: Annotated[Path, typer.Option(
        "--dir", help="Working folder, wiped each run; one running demo per folder.")]
    = Path(".newsbot-demo"),
    no_chat: Annotated[bool, typer.Option("--no-chat", help="Only serve until Ctrl-C.")]
    = False,
) -> None:
    """Try the bot locally: fresh database, sample issue, a funded reader, a chat."""
    from bot.demo.run import run_demo

    raise typer.Exit(run_demo(port=port, workdir=workdir, chat=not no_chat, console=out))


@app.command()
def chat(
    ctx: typer.Context,
    config: ConfigOpt = None,
    url: Annotated[str | None, typer.Option(help="Webhook URL (default from the config).")]
    = None,
    user: Annotated[str, typer.Option(help="The openid to chat as.")] = "o_chat_user",
    token: Annotated[str | None, typer.Option(help="WeChat token (default [wechat] token).")]
    = None,
) -> None:
    """Chat with a running server as a WeChat user would (signed XML pushes).

    Needs no config when both --url and --token are given."""
    from bot.demo.chat import run_chat

    if url is None or token is None:
        settings = _settings(ctx, config, no_config_hint="or chat without a config: pass "
                             "both --url URL and --token TOKEN")
        srv = settings.server
        host = "127.0.0.1" if srv.host in ("0.0.0.0", "::", "") else srv.host
        url = url or f"http://{host}:{srv.port}{srv.webhook_path}"
        token = token if token is not None else settings.wechat.token
    if not token:
        _fail("no WeChat token: pass --token or set [wechat] token in the config", 2)
    raise typer.Exit(run_chat(url=url, token=token, openid=user, console=out))
