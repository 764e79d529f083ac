"""The shipped nginx file (docs/deploy/nginx-newsbot.conf) under a real nginx.

The file is included, as it ships, into an nginx.conf shaped like Debian's stock one (an
http-level access log in the `combined` format, a main-level error log at `error`), so a server
that forgets its own logs leaks into those. Only what cannot work in a test is replaced, by
text: ports, certificate and log paths, the upstream address. Requests carrying a webhook
signature and openid, or a reader link's openid and signature, go through both servers,
including ones nginx itself logs as errors (denied /healthz, a dying upstream, a body over the
limit); no log file may contain the secrets. Each way of putting a leak back (the request line
in the format, the error log at `error`, a server without its access log) is shown to be
caught.

Without an nginx binary these tests skip, unless NEWSBOT_REQUIRE_NGINX is set (CI sets it),
where they fail: CI must not pass by skipping them."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import ROOT, free_port

SHIPPED = ROOT / "docs" / "deploy" / "nginx-newsbot.conf"
HOST = "news.example.com"
SIG = "SECRETSIG"
OPENID = "oSECRET"
SECRETS = (SIG, OPENID)
WEBHOOK = f"/wechat?signature={SIG}&timestamp=1&nonce=2&openid={OPENID}"
READER = f"/read/1?u={OPENID}&e=4102444800&s={SIG}"
# Read at import: some test modules clear NEWSBOT_* from the environment while they run.
REQUIRE_NGINX = bool(os.environ.get("NEWSBOT_REQUIRE_NGINX"))


def nginx_binary() -> str:
    # /usr/sbin is not on every user's PATH, and that is where Debian puts nginx.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    if REQUIRE_NGINX:
        pytest.fail("NEWSBOT_REQUIRE_NGINX is set but there is no nginx binary "
                    "(apt-get install nginx)")
    pytest.skip("no nginx binary (apt-get install nginx); CI sets NEWSBOT_REQUIRE_NGINX=1 "
                "so these run there")


def config_text(text: str) -> str:
    """The directives only: comments are dropped, since they may mention what they forbid."""
    return re.sub(r"#[^\n]*", "", text)


# --- without nginx: what the file says --------------------------------------------------------

def test_log_format_names_no_variable_that_carries_the_query() -> None:
    conf = config_text(SHIPPED.read_text(encoding="utf-8"))
    formats = re.findall(r"log_format\s+(\w+)\s+([^;]*);", conf)
    assert [name for name, _ in formats] == ["newsbot"]
    leaky = re.findall(r"\$(request|request_uri|args|arg_\w+|query_string|is_args|http_referer)\b",
                       formats[0][1])
    assert not leaky, f"these log variables can carry the query string: {leaky}"
    assert "$uri" in formats[0][1]


def test_every_server_has_its_own_logs() -> None:
    """A server without access_log inherits nginx.conf's `combined` log (the full request line);
    one without error_log inherits the `error` level, whose lines carry it too."""
    servers = re.split(r"\bserver\s*\{", config_text(SHIPPED.read_text(encoding="utf-8")))[1:]
    assert len(servers) == 2
    for body in servers:
        assert re.search(r"\baccess_log\s+\S+\s+newsbot\s*;", body), body
        assert re.search(r"\berror_log\s+\S+\s+(crit|alert|emerg)\s*;", body), body


# --- with nginx ---------------------------------------------------------------------------------

@dataclass
class Upstream:
    """Stands in for `newsbot serve`: answers 200 and remembers what it was sent. A query with
    `boom` makes it drop the connection unanswered, which nginx logs as an error (502)."""

    port: int
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    nginx_binary()  # skip (or fail) before starting anything
    up = Upstream(port=0)

    class Handler(BaseHTTPRequestHandler):
        # nginx talks HTTP/1.1 with keepalive to the upstream, as to gunicorn.
        protocol_version = "HTTP/1.1"

        def answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            up.seen.append((self.command, self.path, dict(self.headers.items())))
            if "boom" in self.path:
                self.close_connection = True
                return
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    up.port = server.server_address[1]
    # A short poll so that shutdown() at the end of each test does not wait half a second.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield up
    server.shutdown()
    server.server_close()
    thread.join(5)


def self_signed(directory: Path) -> Path:
    directory.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
            .sign(key, hashes.SHA256()))
    (directory / "fullchain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "privkey.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return directory


def replace(text: str, old: str, new: str, count: int | None = None) -> str:
    """Every `old` by `new`; exactly `count` of them (at least one without a count), so that a
    reshaped shipped file fails here instead of being tested half-substituted."""
    found = text.count(old)
    assert found == count if count is not None else found > 0, (
        f"{old!r} is {found}× in the shipped file, expected {count or 'at least 1'}")
    return text.replace(old, new)


@dataclass
class Nginx:
    binary: str
    prefix: Path
    conf: Path
    http_port: int
    https_port: int

    @property
    def logs(self) -> Path:
        return self.prefix / "logs"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        # -e: messages before the config is read go to stderr, not to the build's default log.
        return subprocess.run([self.binary, "-e", "stderr", "-p", str(self.prefix),
                               "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=30, check=False)

    def log_files(self) -> dict[str, str]:
        return {p.name: p.read_text(encoding="utf-8", errors="replace")
                for p in sorted(self.logs.iterdir())}


def make_nginx(tmp_path: Path, upstream_port: int, shipped: str) -> Nginx:
    binary = nginx_binary()
    prefix = tmp_path / "nginx"
    logs = prefix / "logs"
    logs.mkdir(parents=True)
    for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / temp).mkdir()
    (prefix / "acme").mkdir()
    certs = self_signed(prefix / "certs")
    http_port, https_port = free_port(), free_port()

    text = replace(shipped, "server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};", 1)
    text = replace(text, "\n    listen 80;", f"\n    listen 127.0.0.1:{http_port};", 1)
    text = replace(text, "\n    listen 443 ", f"\n    listen 127.0.0.1:{https_port} ", 1)
    text = replace(text, f"/etc/letsencrypt/live/{HOST}", str(certs), 2)
    text = replace(text, "/var/log/nginx", str(logs))
    text = replace(text, "/var/www/letsencrypt", str(prefix / "acme"), 1)
    # Nothing may still point into the machine's own nginx setup.
    assert not re.search(r"\s/(etc|var)/", config_text(text)), text
    (prefix / "newsbot.conf").write_text(text, encoding="utf-8")

    conf = prefix / "nginx.conf"
    # One process in the foreground: it runs as the test's user (no switch to `nobody`, who
    # could not enter tmp_path), and stopping it stops all of nginx.
    conf.write_text(f"""
daemon off;
master_process off;
pid {prefix}/nginx.pid;
# As in Debian's nginx.conf: what a server does not log itself lands here.
error_log {logs}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {logs}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/newsbot.conf;
}}
""", encoding="utf-8")
    return Nginx(binary, prefix, conf, http_port, https_port)


@contextmanager
def serving(nginx: Nginx) -> Iterator[None]:
    stderr = (nginx.logs / "stderr.log").open("w", encoding="utf-8")
    proc = subprocess.Popen([nginx.binary, "-e", "stderr", "-p", str(nginx.prefix),
                             "-c", str(nginx.conf)], stdout=stderr, stderr=stderr)
    try:
        deadline = time.monotonic() + 10
        for port in (nginx.http_port, nginx.https_port):
            while True:
                assert proc.poll() is None, (nginx.logs / "stderr.log").read_text()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"nginx never listened on {port}"
                    time.sleep(0.05)
        yield
    finally:
        # SIGQUIT: a graceful stop, so every finished request has written its log line.
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        stderr.close()


def can_bind(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
    except OSError:
        return False
    return True


def exchange(nginx: Nginx) -> dict[str, int]:
    """The requests of a day in production, secrets in every query; their statuses by name."""
    https = f"https://127.0.0.1:{nginx.https_port}"
    http = f"http://127.0.0.1:{nginx.http_port}"
    headers = {"Host": HOST}
    xml = b"<xml><MsgType><![CDATA[text]]></MsgType></xml>"
    got: dict[str, int] = {}
    with httpx.Client(verify=False, headers=headers, timeout=10) as tls:
        got["webhook"] = tls.post(https + WEBHOOK, content=xml).status_code
        got["reader"] = tls.get(https + READER).status_code
        got["healthz"] = tls.get(https + f"/healthz?probe={OPENID}").status_code
        # nginx logs each of these as an error, with the request line.
        got["upstream-died"] = tls.post(https + WEBHOOK + "&boom=1", content=xml).status_code
        got["too-large"] = tls.post(https + WEBHOOK, content=b"x" * 100_000).status_code
    # From an address /healthz does not allow (all of 127/8 is loopback on Linux).
    if can_bind("127.0.0.2"):
        outsider = httpx.HTTPTransport(verify=False, local_address="127.0.0.2")
        with httpx.Client(transport=outsider, headers=headers, timeout=10) as other:
            got["healthz-denied"] = other.get(https + f"/healthz?probe={OPENID}").status_code
    with httpx.Client(headers=headers, timeout=10) as plain:
        for name, target in (("http-webhook", WEBHOOK), ("http-reader", READER)):
            answer = plain.get(http + target)
            assert answer.headers["location"] == f"https://{HOST}{target}"
            got[name] = answer.status_code
    return got


def leaks(logs: dict[str, str]) -> list[str]:
    return [f"{name}: {line}" for name, text in logs.items() for line in text.splitlines()
            if any(secret in line for secret in SECRETS)]


def test_shipped_file_passes_nginx_t(tmp_path: Path, upstream: Upstream) -> None:
    nginx = make_nginx(tmp_path, upstream.port, SHIPPED.read_text(encoding="utf-8"))
    done = nginx.run("-t")
    assert done.returncode == 0, done.stderr
    assert "syntax is ok" in done.stderr and "test is successful" in done.stderr
    version = nginx.run("-v").stderr.strip()
    # From 1.25.1 `listen … http2` still works but warns; the file is written for 1.22.
    warnings = [line for line in done.stderr.splitlines() if "[warn]" in line
                and "http2" not in line]
    assert not warnings, (version, warnings)


def test_tls_server_offers_http2(tmp_path: Path, upstream: Upstream) -> None:
    nginx = make_nginx(tmp_path, upstream.port, SHIPPED.read_text(encoding="utf-8"))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    with serving(nginx), socket.create_connection(("127.0.0.1", nginx.https_port)) as raw, \
            context.wrap_socket(raw, server_hostname=HOST) as tls:
        assert tls.selected_alpn_protocol() == "h2"


def test_no_log_records_a_query_string(tmp_path: Path, upstream: Upstream) -> None:
    nginx = make_nginx(tmp_path, upstream.port, SHIPPED.read_text(encoding="utf-8"))
    with serving(nginx):
        got = exchange(nginx)
    assert got == {"webhook": 200, "reader": 200, "healthz": 200, "upstream-died": 502,
                   "too-large": 413, "http-webhook": 301, "http-reader": 301,
                   **({"healthz-denied": 403} if "healthz-denied" in got else {})}

    # The app still gets the query it needs to check signatures, and knows it came over TLS.
    paths = [path for _, path, _ in upstream.seen]
    assert WEBHOOK in paths and READER in paths
    assert all(h.get("X-Forwarded-Proto") == "https" and h.get("Host") == HOST
               for _, _, h in upstream.seen)

    logs = nginx.log_files()
    assert not leaks(logs), "\n".join(leaks(logs))
    ours = logs["newsbot.access.log"]
    for line in ('"POST /wechat HTTP/1.1" 200', '"GET /read/1 HTTP/1.1" 200',
                 '"POST /wechat HTTP/1.1" 502', '"POST /wechat HTTP/1.1" 413',
                 '"GET /wechat HTTP/1.1" 301', '"GET /read/1 HTTP/1.1" 301'):
        assert line in ours, ours
    assert f"upstream=127.0.0.1:{upstream.port}/502/" in ours, ours
    assert "/healthz" not in ours
    # Nothing of ours fell through to nginx.conf's own logs.
    assert logs.get("access.log", "") == ""


def http_server_without_access_log(text: str) -> str:
    line = "    access_log /var/log/nginx/newsbot.access.log newsbot;\n"
    first = text.index(line)
    assert first < text.index("\n    listen 443 "), "the port-80 server comes first"
    return text[:first] + text[first + len(line):]


Mutation = Callable[[str], str]
# Each way of logging a query again, and the log it then shows up in.
LEAKY: dict[str, tuple[Mutation, str]] = {
    "request-in-log-format": (lambda t: replace(
        t, '"$request_method $uri $server_protocol"', '"$request"', 1), "newsbot.access.log"),
    "request-uri-in-log-format": (lambda t: replace(
        t, '"$request_method $uri ', '"$request_method $request_uri ', 1),
        "newsbot.access.log"),
    # Request-level errors are logged with their request line and upstream URL.
    "error-log-at-error": (lambda t: replace(
        t, "newsbot.error.log crit;", "newsbot.error.log error;", 2), "newsbot.error.log"),
    # The port-80 server falls back to nginx.conf's `combined` access log.
    "http-server-without-access-log": (http_server_without_access_log, "access.log"),
}


@pytest.mark.parametrize(("mutation", "where"), LEAKY.values(), ids=LEAKY.keys())
def test_a_leak_put_back_is_caught(tmp_path: Path, upstream: Upstream,
                                   mutation: Mutation, where: str) -> None:
    """test_no_log_records_a_query_string can fail: with the file changed in any of these
    ways, the same requests leave secrets in a log."""
    nginx = make_nginx(tmp_path, upstream.port, mutation(SHIPPED.read_text(encoding="utf-8")))
    with serving(nginx):
        exchange(nginx)
    found = leaks(nginx.log_files())
    assert found
    assert all(line.startswith(f"{where}: ") for line in found), found
