"""The terminal chat simulator: plays WeChat's servers against a running webhook. Every line
becomes a signed XML push exactly as WeChat would send it, so what you see here is what a
follower would see in the app."""

from __future__ import annotations

import contextlib
import logging
import secrets
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from xml.etree import ElementTree

import httpx
from rich.console import Console

from bot.wechat.webhook import sign

log = logging.getLogger("newsbot.chat")

ACCOUNT = "gh_newsbot"

HELP = """Type a message to send it as the current user. Commands:
  /subscribe          follow the account (subscribe event)
  /unsubscribe        unfollow (unsubscribe event)
  /click KEY          press a menu button, e.g. /click LATEST
  /image /voice /location   send that kind of message
  /user OPENID        continue as another user
  /retry              re-send the last message unchanged (same MsgId), as WeChat does
                      when a reply is slow; the answer must be identical and nothing re-charged
  /help               this text
  /quit               leave (Ctrl-D works too)"""


class ServerUnreachable(Exception):
    pass


@dataclass(frozen=True)
class Outcome:
    """What came back for one push, ready to print."""

    lines: tuple[str, ...]
    ok: bool = True


def _cdata(value: str) -> str:
    return "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def _xml(fields: dict[str, str | int]) -> str:
    parts = []
    for name, value in fields.items():
        inner = str(value) if isinstance(value, int) else _cdata(value)
        parts.append(f"<{name}>{inner}</{name}>")
    return "<xml>" + "".join(parts) + "</xml>"


def new_msg_id() -> int:
    # WeChat MsgIds are 64-bit integers; 19 random digits never collide in practice.
    return 10**18 + secrets.randbelow(9 * 10**18)


def describe_reply(status: int, body: str) -> Outcome:
    if status != 200:
        detail = body.strip()[:200]
        return Outcome((f"HTTP {status}" + (f": {detail}" if detail else ""),), ok=False)
    if body.strip() in ("", "success"):
        return Outcome(("(no reply)",))
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return Outcome((f"(unparseable reply) {body[:200]}",), ok=False)
    kind = root.findtext("MsgType") or ""
    if kind == "text":
        return Outcome(((root.findtext("Content") or ""),))
    if kind == "news":
        lines: list[str] = []
        for item in root.findall("./Articles/item"):
            lines.append(f"【{item.findtext('Title') or ''}】")
            if item.findtext("Description"):
                lines.append(item.findtext("Description") or "")
            lines.append(item.findtext("Url") or "")
        return Outcome(tuple(lines) or ("(empty news reply)",))
    return Outcome((f"({kind or 'unknown'} reply) {body[:200]}",))


class WeChatSimulator:
    """Builds, signs and posts pushes for one user at a time; remembers the last for /retry."""

    def __init__(self, http: httpx.Client, *, url: str, token: str, openid: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.http = http
        self.url = url
        self.token = token
        self.openid = openid
        self.clock = clock
        self.last_xml: str | None = None

    def _header(self, msg_type: str) -> dict[str, str | int]:
        return {"ToUserName": ACCOUNT, "FromUserName": self.openid,
                "CreateTime": int(self.clock()), "MsgType": msg_type}

    def text_xml(self, content: str) -> str:
        return _xml({**self._header("text"), "Content": content, "MsgId": new_msg_id()})

    def event_xml(self, event: str, key: str = "") -> str:
        return _xml({**self._header("event"), "Event": event, "EventKey": key})

    def media_xml(self, kind: str) -> str:
        fields = self._header(kind)
        media = uuid.uuid4().hex
        if kind == "image":
            fields |= {"PicUrl": f"http://mmbiz.example.invalid/{media}.jpg", "MediaId": media}
        elif kind == "voice":
            fields |= {"MediaId": media, "Format": "amr"}
        elif kind == "location":
            fields |= {"Location_X": "31.2304", "Location_Y": "121.4737", "Scale": 15,
                       "Label": "上海市黄浦区"}
        fields["MsgId"] = new_msg_id()
        return _xml(fields)

    def post(self, xml: str) -> Outcome:
        self.last_xml = xml
        timestamp = str(int(self.clock()))
        nonce = uuid.uuid4().hex[:10]
        params = {"signature": sign(self.token, timestamp, nonce), "timestamp": timestamp,
                  "nonce": nonce}
        try:
            resp = self.http.post(self.url, params=params, content=xml.encode("utf-8"),
                                  headers={"Content-Type": "text/xml; charset=utf-8"})
        except httpx.ConnectError as exc:
            raise ServerUnreachable(f"cannot connect to {self.url} ({exc})") from exc
        except httpx.TimeoutException:
            return Outcome((f"(timed out waiting for {self.url}: WeChat would have retried)",),
                           ok=False)
        except httpx.HTTPError as exc:
            return Outcome((f"(request failed: {exc})",), ok=False)
        return describe_reply(resp.status_code, resp.text)

    def retry(self) -> Outcome | None:
        return None if self.last_xml is None else self.post(self.last_xml)


def _print(console: Console, outcome: Outcome) -> None:
    style = None if outcome.ok else "red"
    for line in outcome.lines:
        console.print(line, markup=False, highlight=False, style=style, soft_wrap=True)


def handle_line(sim: WeChatSimulator, line: str) -> Outcome | str | None:
    """Run one input line: an Outcome to print, a note for the user, or None to quit."""
    text = line.strip()
    if not text:
        return ""
    if not text.startswith("/"):
        return sim.post(sim.text_xml(line.rstrip("\r\n")))
    command, _, arg = text.partition(" ")
    arg = arg.strip()
    match command.lower():
        case "/quit" | "/exit":
            return None
        case "/help":
            return HELP
        case "/subscribe":
            return sim.post(sim.event_xml("subscribe"))
        case "/unsubscribe":
            return sim.post(sim.event_xml("unsubscribe"))
        case "/click":
            if not arg:
                return "usage: /click KEY   (e.g. /click LATEST)"
            return sim.post(sim.event_xml("CLICK", arg))
        case "/image" | "/voice" | "/location":
            return sim.post(sim.media_xml(command[1:].lower()))
        case "/user":
            if not arg:
                return f"you are {sim.openid}; usage: /user OPENID"
            sim.openid = arg
            sim.last_xml = None
            return f"now chatting as {arg}"
        case "/retry":
            outcome = sim.retry()
            return "nothing to retry yet" if outcome is None else outcome
        case _:
            return f"unknown command {command}; /help lists them"


def _read_line(prompt: str, console: Console, interactive: bool) -> str:
    if interactive:
        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    # Echo piped input so a transcript reads like a conversation.
    console.print(f"{prompt}{line.rstrip()}", markup=False, highlight=False, soft_wrap=True)
    return line


def run_chat(*, url: str, token: str, openid: str, console: Console | None = None,
             timeout_s: float = 10.0) -> int:
    """The interactive loop; returns the process exit code."""
    console = console or Console(highlight=False)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    timeout = httpx.Timeout(timeout_s, connect=3.0)
    with httpx.Client(timeout=timeout) as http:
        sim = WeChatSimulator(http, url=url, token=token, openid=openid)
        console.print(f"Chatting with {url} as {openid}. /help for commands, /quit to leave.",
                      markup=False, style="dim", soft_wrap=True)
        while True:
            try:
                line = _read_line(f"{sim.openid}> ", console, interactive)
            except (EOFError, KeyboardInterrupt):
                console.print()
                return 0
            try:
                result = handle_line(sim, line)
            except ServerUnreachable as exc:
                Console(stderr=True).print(f"{exc}: is `newsbot serve` running there?",
                                           markup=False, style="bold red", soft_wrap=True)
                return 1
            except KeyboardInterrupt:
                console.print()
                return 0
            if result is None:
                return 0
            if isinstance(result, Outcome):
                _print(console, result)
            elif result:
                console.print(result, markup=False, highlight=False, style="dim")
