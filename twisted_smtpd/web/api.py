# -*- test-case-name: tests.test_web_api -*-
"""
The catcher's HTTP side: the web UI, a Mailpit-compatible v1 API, live
updates as server-sent events, and optional basic auth.

Every response carries C{X-Content-Type-Options: nosniff}; the UI page has a
Content-Security-Policy that allows only its own script and style, and mail
content (the HTML part, attachments) is served with a CSP C{sandbox} so that
scripts in mail never run, even when the URL is opened directly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import quote, unquote

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from .. import __version__
from ._message import find_part, parse_message
from .store import MessageStore

__all__ = ["CatcherResource", "CatcherSite", "load_password_file", "Relay"]

_log = Logger()

UI_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
)
#: mail content: no script, no network but our own images, no forms, a sandbox
MAIL_CSP = (
    "sandbox allow-popups allow-popups-to-escape-sandbox; default-src 'none';"
    " img-src 'self' data:; style-src 'unsafe-inline'; font-src data:;"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
#: the largest request body the API reads (JSON bodies are tiny)
MAX_BODY = 1024 * 1024
#: seconds between keep-alive comments on the event stream
KEEPALIVE = 15.0


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value).encode("utf-8"))


def error(status: int, text: str) -> Response:
    return Response(status, text.encode("utf-8"), "text/plain; charset=utf-8")


@dataclass(frozen=True)
class Relay:
    """Where C{release} sends messages: an SMTP server's host and port."""

    host: str
    port: int = 25

    @classmethod
    def parse(cls, text: str) -> Relay:
        host, colon, port = text.strip().rpartition(":")
        if not colon:
            host, port = port, "25"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"relay must be HOST:PORT, not {text!r}")
        return cls(host, int(port))


def load_password_file(path: str) -> dict[str, str]:
    """C{user:password} lines (or htpasswd C{-s} C{user:{SHA}...}).

    Raises:
        ValueError: a line this reader cannot check (say which one).
    """
    users: dict[str, str] = {}
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            user, colon, secret = line.partition(":")
            if not colon or not user:
                raise ValueError(f"{path}:{number}: expected user:password")
            if secret.startswith(("$2", "$apr1$", "$1$", "$5$", "$6$")):
                raise ValueError(
                    f"{path}:{number}: crypt/bcrypt hashes are not supported;"
                    " use a plain password or htpasswd -s ({SHA})"
                )
            users[user] = secret
    if not users:
        raise ValueError(f"{path}: no users")
    return users


def _password_matches(stored: str, given: str) -> bool:
    if stored.startswith("{SHA}"):
        digest = base64.b64encode(hashlib.sha1(given.encode("utf-8")).digest())
        return hmac.compare_digest(stored[5:].encode("ascii", "replace"), digest)
    return hmac.compare_digest(stored.encode("utf-8"), given.encode("utf-8"))


def _load_static() -> dict[str, tuple[bytes, str]]:
    files = {}
    for name in os.listdir(STATIC_DIR):
        content_type = STATIC_TYPES.get(os.path.splitext(name)[1])
        if content_type:
            with open(os.path.join(STATIC_DIR, name), "rb") as file:
                files[name] = (file.read(), content_type)
    return files


def _int_arg(request: Request, name: str, default: int) -> int:
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(name.encode())
    try:
        return max(0, int(values[0])) if values else default
    except ValueError:
        return default


def _str_arg(request: Request, name: str) -> str:
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else ""


def _json_body(request: Request) -> Any:
    """The JSON body, C{None} if empty; C{ValueError} if it is not JSON."""
    data = request.content.read(MAX_BODY + 1) if request.content else b""
    if len(data) > MAX_BODY:
        raise ValueError("request body too large")
    if not data.strip():
        return None
    return json.loads(data)


_CID = re.compile(r"""cid:([^"'\s)>]+)""", re.I)


def _attachment_disposition(name: str, inline: bool) -> str:
    kind = "inline" if inline else "attachment"
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "")
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"


class CatcherResource(Resource):
    """The whole site as one resource with a small router.

    Args:
        store: the started L{MessageStore}.
        users: C{user -> secret} for basic auth; C{None} for none.
        relay: default SMTP server for release; C{None} to require one per
            request.
        reactor: for the keep-alive timer and the release client.
    """

    isLeaf = True

    def __init__(
        self,
        store: MessageStore,
        *,
        users: Optional[dict[str, str]] = None,
        relay: Optional[Relay] = None,
        reactor: Any = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.store = store
        self.users = users
        self.relay = relay
        self.reactor = reactor
        self.static = _load_static()

    # -- plumbing ------------------------------------------------------------------
    def render(self, request: Request) -> Any:
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"Cache-Control", b"no-store")
        if self.users is not None and not self._authorized(request):
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Basic realm="twisted_smtpd"')
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Authentication required\n"
        postpath = request.postpath or []
        segments = [unquote(s.decode("utf-8", "replace")) for s in postpath]
        while segments and segments[-1] == "":
            segments.pop()
        method = request.method.decode("ascii", "replace")
        route = self._route(method, segments)
        if route is None:
            self._write(request, error(404, "Not found"))
            return NOT_DONE_YET
        handler, args = route
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        done = maybeDeferred(handler, request, *args)

        def respond(response: Optional[Response]) -> None:
            if response is not None and not gone:
                self._write(request, response)

        def failed(failure: Any) -> None:
            if failure.check(ValueError):
                respond(error(400, str(failure.value)))
                return
            _log.failure(
                "smtpd web: {method} {path} failed",
                failure,
                method=method,
                path="/".join(segments),
            )
            respond(error(500, "Internal error"))

        done.addCallback(respond).addErrback(failed)
        return NOT_DONE_YET

    def _authorized(self, request: Request) -> bool:
        header = request.getHeader("Authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return False
        user, _, password = decoded.partition(":")
        assert self.users is not None
        stored = self.users.get(user)
        return stored is not None and _password_matches(stored, password)

    def _write(self, request: Request, response: Response) -> None:
        request.setResponseCode(response.status)
        request.setHeader(b"Content-Type", response.content_type.encode())
        for name, value in response.headers.items():
            request.setHeader(name.encode(), value.encode("latin-1", "replace"))
        request.setHeader(b"Content-Length", str(len(response.body)).encode())
        if request.method != b"HEAD":
            request.write(response.body)
        request.finish()

    def _route(
        self, method: str, s: list[str]
    ) -> Optional[tuple[Callable[..., Any], tuple[Any, ...]]]:
        get = method in ("GET", "HEAD")
        if not s and get:
            return self.index, ()
        if len(s) == 2 and s[0] == "static" and get:
            return self.static_file, (s[1],)
        if s in (["livez"], ["readyz"]) and get:
            return self.health, (s[0],)
        if len(s) == 2 and s[0] == "view" and get:
            stem, dot, kind = s[1].rpartition(".")
            if dot and kind in ("html", "txt"):
                return self.view, (stem, kind)
        if s[:2] != ["api", "v1"]:
            return None
        rest = s[2:]
        table: dict[tuple[str, ...], dict[str, Callable[..., Any]]] = {
            ("messages",): {
                "GET": self.list_messages,
                "DELETE": self.delete_messages,
                "PUT": self.set_read,
            },
            ("search",): {"GET": self.search, "DELETE": self.delete_search},
            ("mailboxes",): {"GET": self.mailboxes},
            ("events",): {"GET": self.events},
            ("info",): {"GET": self.info},
            ("webui",): {"GET": self.webui},
        }
        methods = table.get(tuple(rest))
        if methods is not None:
            handler = methods.get("GET" if method == "HEAD" else method)
            return (handler, ()) if handler else (self.not_allowed, ())
        if len(rest) >= 2 and rest[0] == "message":
            message_id, tail = rest[1], rest[2:]
            if not tail and get:
                return self.message, (message_id,)
            if tail == ["headers"] and get:
                return self.headers, (message_id,)
            if tail == ["raw"] and get:
                return self.raw, (message_id,)
            if tail == ["release"] and method == "POST":
                return self.release, (message_id,)
            if len(tail) == 2 and tail[0] == "part" and get:
                return self.part, (message_id, tail[1])
        return None

    def not_allowed(self, request: Request) -> Response:
        return error(405, "Method not allowed")

    # -- UI ------------------------------------------------------------------------
    def index(self, request: Request) -> Response:
        return self.static_file(request, "index.html")

    def static_file(self, request: Request, name: str) -> Response:
        found = self.static.get(name)
        if found is None:
            return error(404, "Not found")
        body, content_type = found
        headers = {"X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
        if content_type.startswith("text/html"):
            headers["Content-Security-Policy"] = UI_CSP
        return Response(200, body, content_type, headers)

    def health(self, request: Request, name: str) -> Response:
        if name == "readyz" and not self.store.ready:
            return error(503, "indexing")
        return Response(200, b"ok\n", "text/plain; charset=utf-8")

    # -- listing and search --------------------------------------------------------
    def list_messages(self, request: Request) -> Deferred[Response]:
        return self._list(request, "")

    def search(self, request: Request) -> Deferred[Response]:
        return self._list(request, _str_arg(request, "query"))

    def _list(self, request: Request, query: str) -> Deferred[Response]:
        start = _int_arg(request, "start", 0)
        limit = min(_int_arg(request, "limit", 50) or 50, 1000)
        mailbox = _str_arg(request, "mailbox") or None
        done = self.store.list_messages(start, limit, query, mailbox)
        return done.addCallback(json_response)

    def mailboxes(self, request: Request) -> Deferred[Response]:
        return self.store.mailboxes().addCallback(json_response)

    def delete_messages(self, request: Request) -> Deferred[Response]:
        body = _json_body(request)
        ids = None
        if isinstance(body, dict) and body.get("IDs"):
            ids = [str(i) for i in body["IDs"]]
        done = self.store.delete(ids)
        return done.addCallback(lambda _: Response(200, b"ok", "text/plain"))

    def delete_search(self, request: Request) -> Deferred[Response]:
        query = _str_arg(request, "query")
        if not query.strip():
            return succeed(error(400, "query is required"))
        done = self.store.delete(None, query)
        return done.addCallback(lambda _: Response(200, b"ok", "text/plain"))

    def set_read(self, request: Request) -> Deferred[Response]:
        body = _json_body(request)
        if not isinstance(body, dict):
            raise ValueError('expected {"IDs": [...], "Read": true}')
        ids = [str(i) for i in body.get("IDs") or []] or None
        done = self.store.set_read(ids, bool(body.get("Read", True)))
        return done.addCallback(lambda _: Response(200, b"ok", "text/plain"))

    # -- one message ---------------------------------------------------------------
    def _with_message(
        self,
        message_id: str,
        then: Callable[[dict[str, Any], bytes], Any],
        mark_read: bool = False,
    ) -> Deferred[Response]:
        def found(result: Any) -> Any:
            if result is None:
                return error(404, "Message not found")
            summary, raw = result
            return self._in_thread(then, summary, raw)

        return self.store.get(message_id, mark_read).addCallback(found)

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        # MIME parsing of a big message is CPU work: keep it off the reactor.
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    def message(self, request: Request, message_id: str) -> Deferred[Response]:
        def detail(summary: dict[str, Any], raw: bytes) -> Response:
            parsed = parse_message(raw)
            value = {
                "ID": summary["ID"],
                "MessageID": summary["MessageID"],
                "Read": summary["Read"],
                "From": summary["From"],
                "To": summary["To"],
                "Cc": summary["Cc"],
                "Bcc": summary["Bcc"],
                "ReplyTo": summary["ReplyTo"],
                "ReturnPath": parsed.return_path,
                "Subject": summary["Subject"],
                "ListUnsubscribe": {
                    "Header": (parsed.headers.get("List-Unsubscribe") or [""])[0],
                    "Links": [],
                    "Errors": "",
                    "HeaderPost": (parsed.headers.get("List-Unsubscribe-Post") or [""])[
                        0
                    ],
                },
                "Date": parsed.date or summary["Created"],
                "Created": summary["Created"],
                "Tags": [],
                "Username": summary["Username"],
                "Text": parsed.text,
                "HTML": parsed.html,
                "Size": summary["Size"],
                "Inline": [p.as_json() for p in parsed.inline],
                "Attachments": [p.as_json() for p in parsed.attachments],
            }
            return json_response(value)

        return self._with_message(message_id, detail, mark_read=True)

    def headers(self, request: Request, message_id: str) -> Deferred[Response]:
        return self._with_message(
            message_id, lambda _s, raw: json_response(parse_message(raw).headers)
        )

    def raw(self, request: Request, message_id: str) -> Deferred[Response]:
        def source(summary: dict[str, Any], raw: bytes) -> Response:
            headers = {}
            if _str_arg(request, "dl"):
                headers["Content-Disposition"] = _attachment_disposition(
                    f"{summary['ID']}.eml", inline=False
                )
            return Response(200, raw, "text/plain; charset=utf-8", headers)

        return self._with_message(message_id, source)

    def part(
        self, request: Request, message_id: str, part_id: str
    ) -> Deferred[Response]:
        def content(summary: dict[str, Any], raw: bytes) -> Response:
            found = find_part(raw, part_id)
            if found is None:
                return error(404, "Part not found")
            part, data = found
            image = part.content_type.startswith("image/")
            name = part.file_name or f"part-{part_id}"
            return Response(
                200,
                data,
                part.content_type,
                {
                    "Content-Disposition": _attachment_disposition(name, inline=image),
                    "Content-Security-Policy": MAIL_CSP,
                },
            )

        return self._with_message(message_id, content)

    def view(self, request: Request, message_id: str, kind: str) -> Deferred[Response]:
        def page(summary: dict[str, Any], raw: bytes) -> Response:
            parsed = parse_message(raw)
            headers = {
                "Content-Security-Policy": MAIL_CSP,
                "X-Frame-Options": "SAMEORIGIN",
            }
            if kind == "txt":
                return Response(
                    200,
                    parsed.text.encode("utf-8"),
                    "text/plain; charset=utf-8",
                    headers,
                )
            parts = {
                p.content_id: p.part_id for p in parsed.inline + parsed.attachments
            }

            def local(match: re.Match[str]) -> str:
                part_id = parts.get(unquote(match.group(1)))
                if part_id is None:
                    return match.group(0)
                return f"/api/v1/message/{quote(summary['ID'])}/part/{part_id}"

            markup = _CID.sub(local, parsed.html)
            return Response(
                200, markup.encode("utf-8"), "text/html; charset=utf-8", headers
            )

        return self._with_message(message_id, page)

    # -- release -------------------------------------------------------------------
    def release(self, request: Request, message_id: str) -> Deferred[Response]:
        if not (request.getHeader("Content-Type") or "").startswith("application/json"):
            # A cross-site form or no-cors fetch cannot send this type.
            return succeed(error(415, "Content-Type must be application/json"))
        body = _json_body(request)
        if not isinstance(body, dict) or not body.get("To"):
            raise ValueError('expected {"To": ["address", ...]}')
        recipients = [str(a) for a in body["To"]]
        relay = Relay.parse(str(body["Relay"])) if body.get("Relay") else self.relay
        if relay is None:
            return succeed(error(400, "no relay: start with --web-relay or pass Relay"))

        def send(found: Any) -> Any:
            if found is None:
                return error(404, "Message not found")
            summary, raw = found
            sender = (summary.get("From") or {}).get("Address", "")
            return self._send(relay, sender, recipients, raw)

        return self.store.get(message_id).addCallback(send)

    def _send(
        self, relay: Relay, sender: str, recipients: list[str], raw: bytes
    ) -> Deferred[Response]:
        from twisted.mail.smtp import sendmail

        # twisted.mail's client turns every LF into CRLF: hand it LF lines.
        raw = _without_trace(raw).replace(b"\r\n", b"\n")
        done = sendmail(
            relay.host, sender, recipients, raw, port=relay.port, reactor=self.reactor
        )

        def sent(result: Any) -> Response:
            return Response(200, b"ok", "text/plain")

        def failed(failure: Any) -> Response:
            return error(
                502,
                f"release to {relay.host}:{relay.port} failed: "
                f"{failure.getErrorMessage()}",
            )

        return done.addCallbacks(sent, failed)

    # -- live updates and info -----------------------------------------------------
    def events(self, request: Request) -> None:
        """Server-sent events: C{data: {"Type": ..., "Data": ...}} per change."""
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.write(b"retry: 2000\n: connected\n\n")
        from twisted.internet.task import LoopingCall

        def send(event_type: str, data: Any) -> None:
            frame = json.dumps({"Type": event_type, "Data": data})
            request.write(f"data: {frame}\n\n".encode())

        keepalive = LoopingCall(lambda: request.write(b": keep-alive\n\n"))
        keepalive.clock = self.reactor
        keepalive.start(KEEPALIVE, now=False)
        self.store.subscribe(send)

        def closed(_: Any) -> None:
            self.store.unsubscribe(send)
            if keepalive.running:
                keepalive.stop()

        request.notifyFinish().addBoth(closed)
        return None

    def info(self, request: Request) -> Deferred[Response]:
        def shape(stats: dict[str, int]) -> Response:
            return json_response(
                {
                    "Version": f"twisted_smtpd {__version__}",
                    "LatestVersion": "",
                    "Database": self.store.index_path,
                    "DatabaseSize": 0,
                    "Messages": stats["Total"],
                    "Unread": stats["Unread"],
                    "Tags": {},
                    "RuntimeStats": {},
                }
            )

        return self.store.stats().addCallback(shape)

    def webui(self, request: Request) -> Response:
        relay = self.relay
        return json_response(
            {
                "Label": "twisted_smtpd",
                "MessageRelay": {
                    "Enabled": True,
                    "SMTPServer": f"{relay.host}:{relay.port}" if relay else "",
                    "ReturnPath": "",
                    "AllowedRecipients": "",
                },
                "DisableHTMLCheck": True,
                "SpamAssassin": False,
            }
        )


def _without_trace(raw: bytes) -> bytes:
    """The message without the C{Return-Path:} our Maildir delivery added."""
    if raw.startswith(b"Return-Path:"):
        end = raw.find(b"\r\n")
        if end != -1:
            return raw[end + 2 :]
    return raw


class CatcherSite(Site):
    """A L{Site} serving L{CatcherResource}; no access log line per request
    unless asked (the SSE stream and the UI's polling would flood it)."""

    def __init__(
        self, resource: CatcherResource, *, log_requests: bool = False
    ) -> None:
        super().__init__(resource)
        self._log_requests = log_requests

    def log(self, request: Any) -> None:
        if self._log_requests:
            super().log(request)
