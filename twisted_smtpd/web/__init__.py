# -*- test-case-name: tests.test_web_api -*-
"""
The mail catcher: a web UI and a Mailpit-compatible HTTP API over the mail
the server receives (C{twistd -n smtpd --web tcp:8025}).

    store = MessageStore("Maildir")
    handler = CatcherHandler(MaildirHandler("Maildir"), store)
    factory = SMTPFactory(handler)
    web = WebService(serverFromString(reactor, "tcp:8025:interface=127.0.0.1"),
                     store)
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .api import CatcherResource, CatcherSite, Relay, load_password_file
from .catcher import CatcherHandler
from .store import RULES, MessageStore

__all__ = [
    "CatcherHandler",
    "CatcherResource",
    "CatcherSite",
    "MessageStore",
    "Relay",
    "RULES",
    "WebService",
    "loopback_by_default",
    "load_password_file",
]


_log = Logger()


def loopback_by_default(description: str) -> str:
    """C{tcp:PORT} (or a bare port) listens on 127.0.0.1 unless it names an
    interface: the catcher shows every message, so it is private by default."""
    text = description.strip()
    if text.isdigit():
        text = f"tcp:{text}"
    kind = text.split(":", 1)[0].lower()
    if kind in ("tcp", "ssl", "tcp6") and "interface=" not in text:
        text += ":interface=::1" if kind == "tcp6" else ":interface=127.0.0.1"
    return text


class WebService(service.MultiService):
    """The store (started first, stopped last) and the HTTP listener."""

    def __init__(
        self,
        endpoint: Any,
        store: MessageStore,
        *,
        users: Optional[dict[str, str]] = None,
        relay: Optional[Relay] = None,
        reactor: Any = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.resource = CatcherResource(
            store, users=users, relay=relay, reactor=reactor
        )
        self.site = CatcherSite(self.resource)
        self.listener = StreamServerEndpointService(endpoint, self.site)
        self.listener._raiseSynchronously = True
        self.listener.setServiceParent(self)

    def startService(self) -> None:
        # The store's thread starts now; the scan runs while the port opens,
        # and API calls queue behind it in order.
        self.store.start().addErrback(self.store_failed)
        super().startService()
        waiting = getattr(self.listener, "_waitingForPort", None)
        if waiting is not None:
            waiting.addCallback(self._announce)

    def _announce(self, port: Any) -> Any:
        address = port.getHost()
        host = getattr(address, "host", None)
        if host is not None:
            host = f"[{host}]" if ":" in host else host
            _log.info(
                "smtpd web: the mail catcher is at http://{host}:{port}/",
                host=host,
                port=address.port,
            )
        return port

    def store_failed(self, failure: Any) -> None:
        _log.failure("smtpd web: the catcher's index could not start", failure)

    def stopService(self) -> Deferred[None]:
        done: Deferred[Any] = Deferred.fromCoroutine(self._stop())
        return done

    async def _stop(self) -> None:
        await super().stopService()
        await self.store.stop()


def configure_web(options: Any, handler: Any) -> tuple[Any, WebService]:
    """C{--web} and its friends: the wrapped handler and the web service.

    Raises:
        twisted.python.usage.UsageError: one line saying what is wrong.
    """
    from twisted.internet import endpoints, reactor
    from twisted.python import usage
    from twisted.python.reflect import namedAny

    from ..handlers import MaildirHandler

    if int(options.get("workers") or 1) > 1:
        raise usage.UsageError(
            "--web needs --workers 1 (the index lives in one process)"
        )
    description = loopback_by_default(options["web"])
    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except Exception as error:
        raise usage.UsageError(f"bad --web {options['web']!r}: {error}")
    rule_name = options.get("web-mailboxes") or "recipient"
    rule = RULES.get(rule_name)
    if rule is None:
        try:
            rule = namedAny(rule_name)
        except Exception as error:
            raise usage.UsageError(
                f"cannot load --web-mailboxes {rule_name!r}: {error}"
            )
        if not callable(rule):
            raise usage.UsageError(f"--web-mailboxes {rule_name!r} is not callable")
    users = None
    if options.get("web-auth"):
        try:
            users = load_password_file(options["web-auth"])
        except OSError as error:
            raise usage.UsageError(
                f"cannot read --web-auth {options['web-auth']!r}: {error.strerror}"
            )
        except (ValueError, UnicodeDecodeError) as error:
            raise usage.UsageError(f"--web-auth: {error}")
    relay = None
    if options.get("web-relay"):
        try:
            relay = Relay.parse(options["web-relay"])
        except ValueError as error:
            raise usage.UsageError(f"--web-relay: {error}")
    maildir = handler.path if isinstance(handler, MaildirHandler) else None
    store = MessageStore(maildir, mailbox_rule=rule)
    web = WebService(endpoint, store, users=users, relay=relay)
    return CatcherHandler(handler, store), web
