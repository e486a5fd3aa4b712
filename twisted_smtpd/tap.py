# -*- test-case-name: tests.test_tap -*-
"""
C{twistd smtpd}: command-line options and the service they describe.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Optional

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.cred import strcred
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.python import usage
from twisted.python.reflect import namedAny

from ._session import Limits
from .factory import SMTPFactory
from .proxy import use_proxy_header_wrapper

__all__ = ["Options", "makeService"]

DEFAULT_PORT = "tcp:2525"


def _positive_int(name: str, text: str, minimum: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError(f"--{name} must be a whole number, not {text!r}")
    if value < minimum:
        raise usage.UsageError(f"--{name} must be at least {minimum}, not {value}")
    return value


class Options(usage.Options, strcred.AuthOptionMixin):
    """Options for C{twistd smtpd}; see DESIGN.md section 5 and the README."""

    synopsis = "[options]"
    # SASL hands us user names and passwords (or CRAM-MD5 digests).
    supportedInterfaces = (IUsernamePassword, IUsernameHashedPassword)
    longdesc = (
        "Receive mail over SMTP/ESMTP. By default listens on tcp:2525 and"
        " delivers into ./Maildir."
    )
    optFlags = [
        ["require-tls", None, "Refuse MAIL and AUTH before STARTTLS (530 5.7.0)."],
        ["require-auth", None, "Refuse MAIL before AUTH (530 5.7.0)."],
        ["auth-without-tls", None, "Offer AUTH on connections without TLS."],
        ["debug", None, "Log the SMTP dialogue (AUTH payloads masked)."],
        ["quiet", None, "No log line per session or accepted message."],
    ]
    optParameters = [
        ["hostname", None, None, "Name for the greeting and EHLO [default: FQDN]."],
        ["maildir", None, "Maildir", "Maildir to deliver into (created)."],
        [
            "handler",
            None,
            None,
            "Dotted name of a handler instead of Maildir delivery.",
        ],
        [
            "deliver",
            None,
            None,
            "Hand mail on instead of storing it: lmtp:ENDPOINT, smtp:ENDPOINT,"
            " http(s)://URL, amqp://..., redis://...?stream=S, nats://...?subject=S.",
        ],
        ["deliver-timeout", None, "60", "Seconds the next hop gets per step."],
        ["deliver-ca", None, None, "PEM CA file to verify the next hop's TLS."],
        ["spool", None, None, "Spool directory for broker outages (then 250)."],
        ["max-message-size", None, "33554432", "Largest message in bytes (SIZE)."],
        ["max-recipients", None, "100", "Recipients per message."],
        ["timeout", None, "300", "Idle timeout in seconds."],
        ["max-connections", None, "0", "Concurrent sessions (0 = no limit)."],
        ["max-connections-per-ip", None, "0", "Concurrent sessions per client IP."],
        [
            "shutdown-grace",
            None,
            "30",
            "Seconds to let messages in flight finish on shutdown.",
        ],
        ["workers", None, "1", "Processes sharing the listening ports."],
        ["tls-cert", None, None, "PEM certificate (chain) for STARTTLS."],
        ["tls-key", None, None, "PEM private key for STARTTLS."],
        ["web", None, None, "Mail catcher UI + Mailpit API on ENDPOINT (loopback)."],
        ["web-auth", None, None, "Password file (user:password) for the catcher."],
        ["web-mailboxes", None, "recipient", "recipient, domain, auth or DOTTED.NAME."],
        ["web-relay", None, None, "HOST:PORT the catcher releases messages to."],
    ]
    compData = usage.Completions(
        optActions={
            "maildir": usage.CompleteDirs(),
            "tls-cert": usage.CompleteFiles("*.pem"),
            "tls-key": usage.CompleteFiles("*.pem"),
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self["ports"] = []

    def opt_port(self, description: str) -> None:
        """Endpoint to listen on, repeatable [default: tcp:2525].
        Implicit TLS: ssl:465:privateKey=key.pem:certKey=cert.pem"""
        self["ports"].append(description)

    opt_p = opt_port

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """Report a bad option in one line on stderr, not a page of help."""
        # Workers are started with the same options.
        self["argv"] = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            sys.stderr.write(f"twistd smtpd: error: {error}\n")
            raise SystemExit(1)

    def postOptions(self) -> None:
        from twisted.internet import reactor

        if not self["ports"]:
            self["ports"] = [DEFAULT_PORT]
        self["endpoints"] = []
        for description in self["ports"]:
            try:
                endpoint = endpoints.serverFromString(reactor, description)
            except Exception as error:
                raise usage.UsageError(f"bad --port {description!r}: {error}")
            self["endpoints"].append(use_proxy_header_wrapper(endpoint))
        self["limits"] = Limits(
            max_message_size=_positive_int(
                "max-message-size", self["max-message-size"]
            ),
            max_recipients=_positive_int("max-recipients", self["max-recipients"], 1),
            timeout=_positive_int("timeout", self["timeout"], 1),
            max_connections=_positive_int("max-connections", self["max-connections"]),
            max_connections_per_ip=_positive_int(
                "max-connections-per-ip", self["max-connections-per-ip"]
            ),
        )
        self["grace"] = _positive_int("shutdown-grace", self["shutdown-grace"])
        self["worker_count"] = _positive_int("workers", self["workers"], 1)
        if self["worker_count"] > 1:
            from .workers import SHAREABLE_ENDPOINTS

            for description, endpoint in zip(self["ports"], self["endpoints"]):
                if not isinstance(endpoint, SHAREABLE_ENDPOINTS):
                    raise usage.UsageError(
                        f"--workers can share tcp: and ssl: ports, not {description!r}"
                    )
        self["handler_object"] = self._handler()
        self["web_service"] = None
        if self["web"]:
            from .web import configure_web

            self["handler_object"], self["web_service"] = configure_web(
                self, self["handler_object"]
            )
        self["tls_policy"] = self._tls()
        self["auth_policy"] = self._auth()

    def _handler(self) -> Any:
        if self["deliver"]:
            return self._deliver()
        if self["handler"]:
            try:
                handler = namedAny(self["handler"])
            except Exception as error:
                raise usage.UsageError(
                    f"cannot load --handler {self['handler']!r}: {error}"
                )
            if isinstance(handler, type):
                handler = handler()
            from .protocol import HandlerHooks

            try:
                HandlerHooks(handler)
            except TypeError as error:
                raise usage.UsageError(f"--handler {self['handler']!r}: {error}")
            return handler
        from .handlers import MaildirHandler

        try:
            return MaildirHandler(self["maildir"])
        except OSError as error:
            raise usage.UsageError(
                f"cannot use --maildir {self['maildir']!r}: {error.strerror}"
            )

    def _deliver(self) -> Any:
        if self["handler"]:
            raise usage.UsageError("--deliver and --handler exclude each other")
        from .deliver import DeliverOptions, handler_from_target

        options = DeliverOptions(
            timeout=_positive_int("deliver-timeout", self["deliver-timeout"], 1),
            ca_file=self["deliver-ca"],
            spool_dir=self["spool"],
            lmtp=bool(self.get("lmtp")),
        )
        try:
            return handler_from_target(self["deliver"], options)
        except ValueError as error:
            raise usage.UsageError(str(error))

    def _tls(self) -> Any:
        cert, key = self["tls-cert"], self["tls-key"]
        if self["require-tls"] and not cert:
            raise usage.UsageError("--require-tls needs --tls-cert and --tls-key")
        if not cert and not key:
            return None
        if not (cert and key):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        from .tls import TLSPolicy

        try:
            return TLSPolicy.from_files(cert, key, required=bool(self["require-tls"]))
        except OSError as error:
            raise usage.UsageError(error.strerror or str(error))
        except ValueError as error:
            raise usage.UsageError(str(error))

    def _auth(self) -> Any:
        checkers = self.get("credCheckers") or []
        if self["require-auth"] and not checkers:
            raise usage.UsageError("--require-auth needs at least one --auth checker")
        if not checkers:
            return None
        from .auth import AuthPolicy

        return AuthPolicy.from_checkers(
            checkers,
            required=bool(self["require-auth"]),
            allow_without_tls=bool(self["auth-without-tls"]),
        )


class SMTPService(service.MultiService):
    """The listeners plus a graceful stop: stop accepting, drain, then close.

    Args:
        factory: the factory every listener shares.
        grace: seconds sessions with a message in flight get to finish.
    """

    def __init__(self, factory: SMTPFactory, grace: float = 30.0) -> None:
        super().__init__()
        self.factory = factory
        self.grace = grace

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            reason = getattr(error.socketError, "strerror", None) or error.socketError
            sys.stderr.write(
                f"twistd smtpd: error: cannot listen on"
                f" {error.interface or '*'}:{error.port}: {reason}\n"
            )
            raise SystemExit(1)

    def stopService(self) -> Deferred[None]:
        """Stop accepting, then drain; workers drain at the same time."""
        from .workers import WorkerPool

        service.Service.stopService(self)
        children = list(self)
        listeners = [
            maybeDeferred(child.stopService)
            for child in reversed(children)
            if not isinstance(child, WorkerPool)
        ]
        drained = gatherResults(listeners).addCallback(
            lambda _: self.factory.shutdown(self.grace)
        )
        workers = [
            maybeDeferred(child.stopService)
            for child in children
            if isinstance(child, WorkerPool)
        ]
        return gatherResults([drained, *workers]).addCallback(lambda _: None)


def build_factory(config: Options) -> SMTPFactory:
    """The L{SMTPFactory} the parsed options describe."""
    return SMTPFactory(
        config["handler_object"],
        hostname=config["hostname"],
        limits=config["limits"],
        tls=config["tls_policy"],
        auth=config["auth_policy"],
        debug=bool(config["debug"]),
        quiet=bool(config["quiet"]),
    )


def makeService(config: Options) -> service.IService:
    """One L{SMTPFactory}, one listening service per C{--port}, and workers."""
    factory = build_factory(config)
    parent = SMTPService(factory, config["grace"])
    if config.get("web_service") is not None:
        config["web_service"].setServiceParent(parent)  # first: its index opens first
    listeners = []
    for endpoint in config["endpoints"]:
        listener = StreamServerEndpointService(endpoint, factory)
        # A port that cannot be bound stops twistd instead of serving nothing.
        listener._raiseSynchronously = True
        listener.setServiceParent(parent)
        listeners.append(listener)
    if config["worker_count"] > 1:
        from .workers import WorkerPool

        WorkerPool(
            listeners, config["worker_count"] - 1, config["argv"], config["grace"]
        ).setServiceParent(parent)
    return parent
