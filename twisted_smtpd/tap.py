# -*- test-case-name: tests.test_tap -*-
"""
C{twistd smtpd}: command-line options and the service they describe.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any, Optional

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.cred import strcred
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError, ProcessExitedAlready
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.reflect import namedAny

from ._session import Limits
from .factory import SMTPFactory
from .proxy import use_proxy_header_wrapper
from .tls import (
    ServerTLSContext,
    TLSPolicy,
    fix_ssl_endpoint,
    read_passphrase_file,
)

__all__ = ["Options", "makeService"]

#: loopback only: the default handler accepts every recipient, so listening
#: on other interfaces is a choice to make (--port tcp:2525)
DEFAULT_PORT = "tcp:2525:interface=127.0.0.1"
#: unix sockets without mode=: owner and group only (Twisted's is 0666)
DEFAULT_UNIX_MODE = "660"

#: listen(2) backlog of a --port that gives no backlog= (Twisted's is 50:
#: a burst of clients beyond it waits for SYN retries, seconds each).
DEFAULT_BACKLOG = 4096

_log = Logger()


def listen_backlog(somaxconn_path: str = "/proc/sys/net/core/somaxconn") -> int:
    """L{DEFAULT_BACKLOG}, capped like the kernel caps it: net.core.somaxconn."""
    try:
        with open(somaxconn_path) as file:
            ceiling = int(file.read())
    except (OSError, ValueError):
        ceiling = socket.SOMAXCONN
    return max(1, min(DEFAULT_BACKLOG, ceiling))


def set_default_backlog(endpoint: Any) -> None:
    """Give a listening endpoint (or the one it wraps) L{listen_backlog}."""
    while endpoint is not None:
        if hasattr(endpoint, "_backlog"):
            endpoint._backlog = listen_backlog()
            return
        endpoint = getattr(endpoint, "_wrappedEndpoint", None)


#: --deliver schemes whose targets keep mail in --spool during an outage
_SPOOLING_SCHEMES = ("amqp", "amqps", "redis", "rediss", "nats")


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
        [
            "twistd-log",
            None,
            "Log through twistd's own text observer, not twisted_smtpd.fastlog"
            " (the same lines, more CPU per line).",
        ],
        ["no-reverse-dns", None, "Do not look up client names (Received: shows IPs)."],
        [
            "lmtp",
            None,
            "Serve LMTP (RFC 2033) instead of SMTP: LHLO, one reply per recipient.",
        ],
    ]
    optParameters = [
        ["hostname", None, None, "Name for the greeting and EHLO [default: FQDN]."],
        [
            "maildir",
            None,
            "Maildir",
            "Maildir to deliver into (created); {local}, {domain} or"
            " {recipient} in it give one Maildir per recipient.",
        ],
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
        [
            "handler-timeout",
            None,
            "120",
            "Seconds a handler hook may take before it is cancelled (451 4.3.0);"
            " 0 = no limit.",
        ],
        [
            "tls-handshake-timeout",
            None,
            "60",
            "Seconds a TLS handshake may take (STARTTLS or ssl:), then abort.",
        ],
        [
            "max-session-time",
            None,
            "3600",
            "Seconds a session may last in all (0 = no limit).",
        ],
        ["max-connections", None, "0", "Concurrent sessions (0 = no limit)."],
        ["max-connections-per-ip", None, "0", "Concurrent sessions per client IP."],
        [
            "auth-failure-limit",
            None,
            "10/600",
            "N/SECONDS: failed AUTHs per client address before AUTH gets 454"
            " for SECONDS (0 = no limit).",
        ],
        ["dns-timeout", None, "5", "Seconds a client's reverse DNS lookup may take."],
        [
            "shutdown-grace",
            None,
            "30",
            "Seconds to let messages in flight finish on shutdown.",
        ],
        ["workers", None, "1", "Processes sharing the listening ports."],
        [
            "tls-key-passphrase-file",
            None,
            None,
            "File whose first line is the passphrase of encrypted --tls-key files.",
        ],
        [
            "metrics",
            None,
            None,
            "Serve /metrics, /healthz, /readyz (and POST /drain from loopback)"
            " on this endpoint, e.g. tcp:9464:interface=127.0.0.1.",
        ],
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
            "tls-key-passphrase-file": usage.CompleteFiles(),
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self["ports"] = []
        self["tls-certs"] = []
        self["tls-keys"] = []
        self["xclient-hosts"] = []

    def opt_tls_cert(self, path: str) -> None:
        """PEM certificate (then its chain) for STARTTLS, repeatable; chosen
        by SNI, the first is the default; reloaded on SIGHUP."""
        self["tls-certs"].append(path)

    def opt_tls_key(self, path: str) -> None:
        """PEM private key of the --tls-cert in the same position."""
        self["tls-keys"].append(path)

    def opt_auth(self, description: str) -> None:
        """A twisted.cred checker: memory:USER:PASS, file:PATH, unix
        (repeatable; --help-auth lists them)."""
        kind, _, argument = description.partition(":")
        if kind == "file":
            # strcred only warns and then refuses every login.
            if not os.path.isfile(argument):
                raise usage.UsageError(
                    f"--auth {description}: no such file (a password file of"
                    " user:password lines)"
                )
            if not os.access(argument, os.R_OK):
                raise usage.UsageError(f"--auth {description}: cannot read the file")
        super().opt_auth(description)

    def opt_port(self, description: str) -> None:
        """Endpoint to listen on, repeatable [default: tcp:2525].
        Implicit TLS: ssl:465:privateKey=key.pem:certKey=cert.pem"""
        self["ports"].append(description)

    opt_p = opt_port

    def opt_xclient_hosts(self, networks: str) -> None:
        """CIDR network(s), comma-separated, whose clients may send XCLIENT
        (a proxy in front, e.g. nginx); repeatable [default: nobody]."""
        self["xclient-hosts"].extend(n for n in networks.split(",") if n.strip())

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

        self["default_port"] = not self["ports"]
        if not self["ports"]:
            self["ports"] = [DEFAULT_PORT]
        self["tls_policy"] = self._tls()
        self["tls_contexts"] = self._tls_contexts()
        self["endpoints"] = [
            self._endpoint(reactor, description) for description in self["ports"]
        ]
        self["limits"] = Limits(
            max_message_size=_positive_int(
                "max-message-size", self["max-message-size"]
            ),
            max_recipients=_positive_int("max-recipients", self["max-recipients"], 1),
            timeout=_positive_int("timeout", self["timeout"], 1),
            handler_timeout=_positive_int("handler-timeout", self["handler-timeout"]),
            tls_handshake_timeout=_positive_int(
                "tls-handshake-timeout", self["tls-handshake-timeout"], 1
            ),
            max_session_time=_positive_int(
                "max-session-time", self["max-session-time"]
            ),
            max_connections=_positive_int("max-connections", self["max-connections"]),
            max_connections_per_ip=_positive_int(
                "max-connections-per-ip", self["max-connections-per-ip"]
            ),
        )
        self["grace"] = _positive_int("shutdown-grace", self["shutdown-grace"])
        self._mta_front()
        self["worker_count"] = _positive_int("workers", self["workers"], 1)
        if self["worker_count"] > 1:
            from .workers import SHAREABLE_ENDPOINTS

            for description, endpoint in zip(self["ports"], self["endpoints"]):
                if not isinstance(endpoint, SHAREABLE_ENDPOINTS):
                    raise usage.UsageError(
                        f"--workers can share tcp: and ssl: ports, not {description!r}"
                    )
        self["metrics_endpoint"] = self._metrics()
        self["handler_object"] = self._handler()
        self["web_service"] = None
        if self["web"]:
            from .web import configure_web

            self["handler_object"], self["web_service"] = configure_web(
                self, self["handler_object"]
            )
        self["auth_policy"] = self._auth()

    def _mta_front(self) -> None:
        """--xclient-hosts, --auth-failure-limit, --dns-timeout: checked here."""
        from ._ratelimit import parse_limit
        from ._xclient import AddressList

        try:
            self["xclient_list"] = AddressList(self["xclient-hosts"])
        except ValueError as error:
            raise usage.UsageError(f"--xclient-hosts: {error}") from None
        limit = self["auth-failure-limit"].strip()
        try:
            self["auth_limit"] = None if limit == "0" else parse_limit(limit)
        except ValueError as error:
            raise usage.UsageError(f"--auth-failure-limit: {error}") from None
        try:
            self["dns_timeout"] = float(self["dns-timeout"])
        except ValueError:
            self["dns_timeout"] = 0.0
        if not self["dns_timeout"] > 0:
            raise usage.UsageError(
                f"--dns-timeout: expected seconds > 0, not {self['dns-timeout']!r}"
            )

    def _metrics(self) -> Any:
        description = self["metrics"]
        if not description:
            return None
        # find_spec, not import: with --workers, PROMETHEUS_MULTIPROC_DIR must
        # be set before prometheus-client is first imported (makeService).
        if importlib.util.find_spec("prometheus_client") is None:
            raise usage.UsageError(
                "--metrics needs prometheus-client:"
                " pip install 'twisted_smtpd[metrics]'"
            )
        from twisted.internet import reactor

        try:
            return endpoints.serverFromString(reactor, description)
        except Exception as error:
            raise usage.UsageError(f"bad --metrics {description!r}: {error}")

    def _handler(self) -> Any:
        scheme = (self["deliver"] or "").split(":", 1)[0].lower()
        if self["spool"] and scheme not in _SPOOLING_SCHEMES:
            # Anything else would take the option and silently not spool.
            raise usage.UsageError(
                "--spool is for --deliver amqp://, redis:// or nats://"
                " (other targets answer 451 while the next hop is down)"
            )
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
            from ._delivery import HandlerHooks

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
        except ValueError as error:  # a placeholder other than {local} etc.
            raise usage.UsageError(f"cannot use --maildir: {error}")

    def _deliver(self) -> Any:
        if self["handler"]:
            raise usage.UsageError("--deliver and --handler exclude each other")
        if self["spool"] and self["worker_count"] > 1:
            raise usage.UsageError(
                "--spool needs one process per spool directory: use --workers 1"
                " (run more instances, each with its own --spool, to scale)"
            )
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
        certs, keys = self["tls-certs"], self["tls-keys"]
        if self["require-tls"] and not certs:
            raise usage.UsageError("--require-tls needs --tls-cert and --tls-key")
        self["tls_passphrase"] = None
        if self["tls-key-passphrase-file"]:
            try:
                self["tls_passphrase"] = read_passphrase_file(
                    self["tls-key-passphrase-file"]
                )
            except OSError as error:
                raise usage.UsageError(error.strerror or str(error))
            except ValueError as error:
                raise usage.UsageError(str(error))
        if not certs and not keys:
            return None
        if len(certs) != len(keys):
            # One --tls-key per --tls-cert, in the same order.
            raise usage.UsageError("--tls-cert and --tls-key go together")
        try:
            return TLSPolicy.from_pairs(
                list(zip(certs, keys)),
                required=bool(self["require-tls"]),
                passphrase=self["tls_passphrase"],
            )
        except OSError as error:
            raise usage.UsageError(error.strerror or str(error))
        except ValueError as error:
            raise usage.UsageError(str(error))

    def _tls_contexts(self) -> list[ServerTLSContext]:
        """The contexts SIGHUP reloads; ssl: listeners add theirs."""
        policy = self["tls_policy"]
        if policy is not None and isinstance(policy.context_factory, ServerTLSContext):
            return [policy.context_factory]
        return []

    def _endpoint(self, reactor: Any, description: str) -> Any:
        """The endpoint for one --port: ALPN-safe TLS, our backlog default."""
        try:
            args, kwargs = endpoints._parse(description)
        except Exception:
            args, kwargs = [], {}
        if args[:1] == ["unix"] and "mode" not in kwargs:
            description += f":mode={DEFAULT_UNIX_MODE}"
        try:
            endpoint = None
            if args[:1] == ["ssl"]:
                endpoint = self._ssl_endpoint(reactor, args, kwargs)
            elif args[:1] == ["systemd"]:
                endpoint = systemd_endpoint(reactor, description, kwargs)
            if endpoint is None:
                endpoint = endpoints.serverFromString(reactor, description)
        except Exception as error:
            reason = getattr(error, "strerror", None) or error
            raise usage.UsageError(f"bad --port {description!r}: {reason}")
        endpoint = fix_ssl_endpoint(use_proxy_header_wrapper(endpoint))
        if "backlog" not in kwargs:
            set_default_backlog(endpoint)
        return endpoint

    def _ssl_endpoint(self, reactor: Any, args: list, kwargs: dict) -> Any:
        """An ssl: listener on our L{ServerTLSContext}, or None to let Twisted
        build it (options our context does not take: sslmethod, dhParameters).

        Without certificate arguments it shares the --tls-cert certificates.
        """
        ours = {"privateKey", "certKey", "extraCertChain", "interface", "backlog"}
        positional = args[1:]
        port = kwargs.get("port", positional[0] if positional else None)
        options = set(kwargs) - {"port"}
        if port is None or len(positional) > 1 or not options <= ours:
            return None
        if "privateKey" in kwargs or "certKey" in kwargs:
            key = kwargs.get("privateKey", "server.pem")
            context = ServerTLSContext(
                [(kwargs.get("certKey", key), key)],
                self["tls_passphrase"],
                chain_path=kwargs.get("extraCertChain"),
            )
            self["tls_contexts"].append(context)
        elif self["tls_contexts"] and "extraCertChain" not in kwargs:
            context = self["tls_contexts"][0]
        elif "extraCertChain" in kwargs:
            return None
        elif os.path.exists("server.pem"):
            # Twisted's default: key and certificate in ./server.pem.
            context = ServerTLSContext([("server.pem", "server.pem")], None)
            self["tls_contexts"].append(context)
        else:
            raise ValueError(
                "ssl: needs privateKey= and certKey=, or --tls-cert and --tls-key"
            )
        return endpoints.SSL4ServerEndpoint(
            reactor,
            int(port),
            context,
            backlog=int(kwargs.get("backlog", 50)),
            interface=kwargs.get("interface", ""),
        )

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


def systemd_endpoint(
    reactor: Any,
    description: str,
    kwargs: dict[str, str],
    passed: Any = None,
) -> Any:
    """The socket systemd passed for C{systemd:domain=D:index=N|name=X}.

    Twisted reads (and removes) LISTEN_PID and LISTEN_FDS when its endpoints
    module is imported, and keeps no socket at all when LISTEN_FDNAMES is
    missing (systemd before 227, or a launcher that names none); its parser
    then fails with "list index out of range".  An C{index=} needs no names
    (sd_listen_fds(3)): then descriptor 3 + N is used if it is a listening
    socket of that family.  Everything else that is missing is said in one
    line.

    Args:
        passed: Twisted's L{ListenFDs} of this process (tests give theirs).

    Raises:
        usage.UsageError: what systemd did not pass.
    """
    if passed is None:
        passed = endpoints._SystemdParser._sddaemon
    descriptors = list(passed.inheritedDescriptors())
    named = dict(passed.inheritedNamedDescriptors())
    domain = kwargs.get("domain", "")
    family = getattr(socket, f"AF_{domain}", None)
    if domain not in ("INET", "INET6", "UNIX") or family is None:
        raise usage.UsageError("domain= must be INET, INET6 or UNIX")
    if ("index" in kwargs) == ("name" in kwargs):
        raise usage.UsageError("give index=N or name=NAME")
    if "name" in kwargs:
        name = kwargs["name"]
        if name in named:
            return endpoints.AdoptedStreamServerEndpoint(reactor, named[name], family)
        if not named:
            raise usage.UsageError(
                "name= needs LISTEN_FDNAMES, which systemd did not set"
                " (FileDescriptorName= in the .socket unit, systemd 227+);"
                " or use index=N"
            )
        raise usage.UsageError(
            f"systemd passed no socket named {name!r}"
            f" (LISTEN_FDNAMES={':'.join(named)})"
        )
    try:
        index = int(kwargs["index"])
    except ValueError:
        raise usage.UsageError("index= is not a number")
    if descriptors:
        if not 0 <= index < len(descriptors):
            raise usage.UsageError(
                f"systemd passed {len(descriptors)} socket(s); index={index} is"
                " out of range"
            )
        return endpoints.AdoptedStreamServerEndpoint(
            reactor, descriptors[index], family
        )
    # SD_LISTEN_FDS_START: the passed sockets start at descriptor 3.
    fileno = 3 + index
    if index >= 0 and _is_listening_socket(fileno, family):
        return endpoints.AdoptedStreamServerEndpoint(reactor, fileno, family)
    raise usage.UsageError(
        f"systemd passed no socket to this process (no LISTEN_FDS and LISTEN_PID"
        f" for it, and descriptor {fileno} is not a listening {domain} socket):"
        " start twistd from a .socket unit, or listen with tcp: or unix:"
    )


def _is_listening_socket(fileno: int, family: int) -> bool:
    try:
        probe = socket.socket(fileno=os.dup(fileno))
    except OSError:
        return False
    try:
        accepting = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        return bool(accepting) and probe.family == family
    except OSError:
        return False
    finally:
        probe.close()


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
        #: children stopped only once the sessions are gone (the metrics site)
        self.stop_after_drain: list[service.IService] = []
        self._drained: Optional[Deferred[None]] = None
        self._previous_usr1: Any = None
        #: twistd's own options (set by makeService): where the log goes
        self.twistd_options: Optional[Any] = None

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self.twistd_options is not None:
            _log_through_fastlog(parent, self.twistd_options)

    def startService(self) -> None:
        super().startService()
        # Signals can only be set from the main thread; Windows has no SIGUSR1.
        if threading.current_thread() is threading.main_thread() and hasattr(
            signal, "SIGUSR1"
        ):
            from twisted.internet import reactor

            def on_usr1(signum: int, frame: Any) -> None:
                reactor.callFromThread(self.drain)  # type: ignore[attr-defined]

            self._previous_usr1 = signal.signal(signal.SIGUSR1, on_usr1)

    @property
    def draining(self) -> bool:
        return self._drained is not None

    def ready(self) -> bool:
        """True while this server accepts mail (C{/readyz})."""
        return (
            bool(self.running)
            and self._drained is None
            and not getattr(self.factory, "shutting_down", False)
        )

    def drain(self) -> Deferred[None]:
        """Stop accepting; sessions finish within the grace (SIGUSR1, POST /drain).

        Idle sessions get C{421 4.3.2} at once, messages in flight their reply
        first.  The process keeps running (C{/healthz} 200, C{/readyz} 503)
        until it is stopped.  Fires when the sessions are gone.
        """
        from .workers import WorkerPool

        if self._drained is None:
            _log.info("smtpd: draining (no new sessions)")
            set_draining = getattr(
                getattr(self.factory, "events", None), "set_draining", None
            )
            if set_draining is not None:
                set_draining(True)
            listeners = []
            for child in self:
                if isinstance(child, WorkerPool):
                    for process, worker in child.workers:
                        if not worker.ended.called:
                            try:
                                process.signalProcess(signal.SIGUSR1)
                            except ProcessExitedAlready:
                                pass
                elif getattr(child, "factory", None) is self.factory:
                    # Only the SMTP listeners: the metrics site and the
                    # SIGHUP reloader keep working while the server drains.
                    listeners.append(maybeDeferred(child.stopService))
            self._drained = gatherResults(listeners).addCallback(
                lambda _: self.factory.shutdown(self.grace)
            )
        return _follow(self._drained)

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
        for child in self:
            waiting = getattr(child, "_waitingForPort", None)
            if waiting is not None and getattr(child, "factory", None) is self.factory:
                waiting.addCallback(self._listening)

    #: set by makeService when no --port was given
    default_port = False

    def _listening(self, port: Any) -> Any:
        where = listening_address(port)
        if self.default_port:
            _log.warn(
                "smtpd: listening on {where} only (the default): to take mail from"
                " other machines give --port tcp:2525 (every interface) or"
                " --port tcp:25:interface=ADDRESS",
                where=where,
            )
        else:
            _log.info("smtpd: listening on {where}", where=where)
        return port

    def stopService(self) -> Deferred[None]:
        """Stop accepting, then drain; workers drain at the same time."""
        from .workers import WorkerPool

        service.Service.stopService(self)
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None
        children = list(self)
        listeners = [
            maybeDeferred(child.stopService)
            for child in reversed(children)
            if not isinstance(child, WorkerPool) and child not in self.stop_after_drain
        ]
        drained = gatherResults(listeners).addCallback(
            lambda _: self.factory.shutdown(self.grace)
        )
        if self.stop_after_drain:
            # /readyz answers 503, not "connection refused", while sessions end.
            drained.addCallback(
                lambda _: gatherResults(
                    [
                        maybeDeferred(child.stopService)
                        for child in self.stop_after_drain
                    ]
                )
            )
        workers = [
            maybeDeferred(child.stopService)
            for child in children
            if isinstance(child, WorkerPool)
        ]
        return gatherResults([drained, *workers]).addCallback(lambda _: None)


class TLSReloadService(service.Service):
    """SIGHUP reloads every certificate and key from disk.

    New handshakes use the new files, sessions keep theirs; a pair that
    cannot be loaded keeps its previous certificate and logs one line.
    """

    def __init__(self, contexts: Sequence[ServerTLSContext]) -> None:
        self.contexts = list(contexts)
        #: a L{WorkerPool} whose processes get the signal too
        self.workers: Any = None
        self._previous: Any = None

    def startService(self) -> None:
        from twisted.internet import reactor

        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(
                signal.SIGHUP,
                lambda *_: reactor.callFromThread(self._hangup),  # type: ignore[attr-defined]
            )

    def _hangup(self) -> None:
        for process, worker in getattr(self.workers, "workers", []):
            if not worker.ended.called:
                try:
                    process.signalProcess("HUP")
                except ProcessExitedAlready:
                    pass
        self.reload()

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def reload(self) -> Deferred[list[str]]:
        """Reload all contexts; fires with the problems, each logged once."""

        def report(results: list[list[str]]) -> list[str]:
            problems = [line for result in results for line in result]
            for problem in problems:
                _log.error("smtpd: TLS reload: {problem}", problem=problem)
            if not problems:
                count = sum(len(context.pairs) for context in self.contexts)
                _log.info("smtpd: TLS reloaded {count} certificate(s)", count=count)
            return problems

        return gatherResults([c.reload() for c in self.contexts]).addCallback(report)


def _follow(deferred: Deferred[Any]) -> Deferred[None]:
    """A new Deferred that fires when C{deferred} does, leaving its result alone."""
    follower: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        follower.callback(None)
        return result

    deferred.addBoth(fire)
    return follower


def _metrics_events(config: Options) -> Any:
    if not config.get("metrics_endpoint"):
        return None
    from .metrics import PrometheusEvents

    return PrometheusEvents()


def _share_metrics_between_workers() -> None:
    """Point every process at one multiprocess directory (before any metric)."""
    # Spelled out: importing .metrics would import prometheus-client too early.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return  # the operator's own directory: they empty it between runs
    import shutil
    import tempfile

    from twisted.internet import reactor

    path = tempfile.mkdtemp(prefix="smtpd-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # the workers inherit it
    reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, path, True)


def _add_metrics_site(config: Options, parent: SMTPService) -> None:
    from .metrics import (
        CertificateExpiry,
        MetricsResource,
        PrometheusEvents,
        metrics_site,
    )

    events = parent.factory.events
    assert isinstance(events, PrometheusEvents)  # build_factory made it
    if config.get("tls_contexts"):
        events.add_collector(CertificateExpiry(config["tls_contexts"]))
    resource = MetricsResource(events, ready=parent.ready, drain=parent.drain)
    listener = StreamServerEndpointService(
        config["metrics_endpoint"], metrics_site(resource)
    )
    listener._raiseSynchronously = True
    listener.setServiceParent(parent)
    parent.stop_after_drain.append(listener)


def listening_address(port: Any) -> str:
    """C{127.0.0.1:2525}, C{[::1]:2525} or C{unix socket /run/smtpd.sock}."""
    try:
        host = port.getHost()
    except Exception:
        return repr(port)
    if hasattr(host, "port"):
        address = f"[{host.host}]" if ":" in host.host else host.host
        return f"{address}:{host.port}"
    name = getattr(host, "name", None)
    if name is not None:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "surrogateescape")
        return f"unix socket {name}"
    return str(host)


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
        events=_metrics_events(config),
        xclient_hosts=config["xclient_list"],
        reverse_dns=_reverse_dns(config),
        auth_failure_limit=config["auth_limit"],
        lmtp=bool(config["lmtp"]),
    )


def _reverse_dns(config: Options) -> Any:
    if config["no-reverse-dns"]:
        return None
    from .rdns import ReverseDNS

    return ReverseDNS(timeout=config["dns_timeout"])


def _twistd_options(config: Options) -> Any:
    """twistd's C{ServerOptions} when twistd runs the plugin, else None."""
    parent = getattr(config, "parent", None)
    if parent is None or config["twistd-log"]:
        return None
    from twisted.application.app import ServerOptions

    return parent if isinstance(parent, ServerOptions) else None


def _log_through_fastlog(application: Any, twistd_options: Any) -> None:
    """Make twistd log through L{twisted_smtpd.fastlog}: the same lines, cheaper.

    twistd adds the plugin's service to its application before it starts
    logging, and then, unless given C{--logger}, logs to the application's
    L{ILogObserver} component if it has one.  The observer writes where
    twistd's own would (C{--logfile}, C{-n}); with C{--logger} or
    C{--syslog} twistd's choice stands.
    """
    from twisted.logger import ILogObserver
    from twisted.python.components import Componentized

    from .fastlog import twistd_observer

    if not isinstance(application, Componentized):
        return
    if application.getComponent(ILogObserver, None) is not None:
        return
    try:
        observer = twistd_observer(twistd_options)
    except OSError as error:
        sys.stderr.write(
            f"twistd smtpd: error: cannot open the log file"
            f" {error.filename or twistd_options.get('logfile')}:"
            f" {error.strerror or error}\n"
        )
        raise SystemExit(1)
    if observer is not None:
        application.setComponent(ILogObserver, observer)


def makeService(config: Options) -> service.IService:
    """One L{SMTPFactory}, one listening service per C{--port}, and workers."""
    if config.get("metrics_endpoint") and config["worker_count"] > 1:
        _share_metrics_between_workers()
    factory = build_factory(config)
    parent = SMTPService(factory, config["grace"])
    parent.default_port = bool(config.get("default_port"))
    parent.twistd_options = _twistd_options(config)
    if config.get("web_service") is not None:
        # First: its index opens first; last: it indexes the messages drained.
        config["web_service"].setServiceParent(parent)
        parent.stop_after_drain.append(config["web_service"])
    listeners = []
    for endpoint in config["endpoints"]:
        listener = StreamServerEndpointService(endpoint, factory)
        # A port that cannot be bound stops twistd instead of serving nothing.
        listener._raiseSynchronously = True
        listener.setServiceParent(parent)
        listeners.append(listener)
    reloader = None
    if config.get("tls_contexts"):
        reloader = TLSReloadService(config["tls_contexts"])
        reloader.setServiceParent(parent)
        # A SIGHUP during a drain or a graceful stop must reload, not kill.
        parent.stop_after_drain.append(reloader)
    if config["worker_count"] > 1:
        from .workers import WorkerPool

        pool = WorkerPool(
            listeners,
            config["worker_count"] - 1,
            config["argv"],
            config["grace"],
            command=WORKER_COMMAND,
        )
        pool.setServiceParent(parent)
        if reloader is not None:
            reloader.workers = pool
    if config.get("metrics_endpoint"):
        _add_metrics_site(config, parent)
    return parent


#: how L{WorkerPool} starts a worker: C{python -c ...} then its arguments
WORKER_COMMAND = (
    "-c",
    "import sys; from twisted_smtpd.tap import run_worker; run_worker(sys.argv[1:])",
)


def run_worker(args: list[str]) -> None:
    """Entry point of a C{--workers} process: the same options, adopted ports.

    Args:
        args: the shared sockets, the parent's pid, the worker's number,
            then the C{smtpd} options (see L{WorkerPool}).
    """
    from twisted.internet import reactor

    from .workers import serve_worker

    options = Options()
    options.parseOptions(args[3:])
    if options.get("tls_contexts"):
        # The parent relays SIGHUP: reload certificates here too.
        reloader = TLSReloadService(options["tls_contexts"])
        reactor.callWhenRunning(reloader.startService)
    serve_worker(
        build_factory(options), options["endpoints"], args[:3], options["grace"]
    )
