# -*- test-case-name: tests.test_deliver_smtp -*-
"""
C{--deliver smtp:ENDPOINT}: relay through a smarthost (Postfix, a provider's
submission port), transaction by transaction.

    --deliver smtp:tcp:relay.example.org:587:user=mx1:password-file=/etc/smtpd/relay.pw
    --deliver smtp:tcp:relay.example.org:465:tls=implicit
    --deliver smtp:tcp:127.0.0.1:10025            (loopback: plain SMTP)

Keys after the endpoint:

- C{tls=required} (the default for a host that is not loopback): STARTTLS
  before MAIL, the certificate verified against the system store or
  C{--deliver-ca}; C{tls=implicit}: TLS from the first byte (port 465);
  C{tls=opportunistic}: STARTTLS when offered; C{tls=none} (the default on
  loopback and unix sockets).
- C{tls-name=NAME}: the name the certificate must carry (default the host).
- C{user=NAME} and C{password-file=FILE}: AUTH PLAIN (or LOGIN), only over
  TLS unless the smarthost is on loopback.
- C{pool=N}: connections at most (16); C{helo=NAME}: our EHLO name.
"""

from __future__ import annotations

import base64
from typing import Any, Optional

from twisted.internet import ssl

from ..replies import Reply
from . import DeliverOptions
from ._proxy import (
    DownstreamError,
    DownstreamProtocol,
    ProxyHandler,
    auth_plain,
    parse_endpoint,
)
from .lmtp import pool_size

__all__ = ["SMTPRelayHandler", "from_target", "TLS_MODES"]

_KEYS = frozenset({"pool", "helo", "tls", "tls-name", "user", "password-file"})
TLS_MODES = ("required", "implicit", "opportunistic", "none")


def load_trust_root(ca_file: Optional[str]) -> Any:
    """The CA certificates of C{ca_file} (PEM, one or more), or the system's."""
    if ca_file is None:
        return ssl.platformTrust()
    try:
        with open(ca_file, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ValueError(f"cannot read --deliver-ca {ca_file!r}: {error.strerror}")
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + part for part in data.split(marker)[1:]]
    try:
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception:
        certificates = []
    if not certificates:
        raise ValueError(f"--deliver-ca {ca_file!r} holds no PEM certificate")
    return ssl.trustRootFromCertificates(certificates)


class SMTPRelayHandler(ProxyHandler):
    """Relay each client transaction through one smarthost transaction.

    Args:
        endpoint: C{tcp:HOST:PORT} (or C{unix:PATH}).
        tls: one of L{TLS_MODES}, or C{None}: C{required} unless the host
            is loopback, then C{none}.
        tls_name: the name to verify the certificate against.
        ca_file: PEM CA certificates (default: the system store).
        user, password: AUTH credentials (C{password_file} reads it).
        timeout, pool_size, helo, reactor: as for L{LMTPHandler
            <twisted_smtpd.deliver.lmtp.LMTPHandler>}.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        tls: Optional[str] = None,
        tls_name: Optional[str] = None,
        ca_file: Optional[str] = None,
        user: Optional[str] = None,
        password: Optional[str] = None,
        password_file: Optional[str] = None,
        timeout: float = 60.0,
        pool_size: int = 16,
        helo: Optional[str] = None,
        reactor: Any = None,
    ) -> None:
        parsed = parse_endpoint("smtp", "smtp:" + endpoint, _KEYS, reactor)
        if tls is None:
            tls = "none" if parsed.loopback else "required"
        if tls not in TLS_MODES:
            raise ValueError(
                f"--deliver smtp: tls={tls!r} is not one of {', '.join(TLS_MODES)}"
            )
        if password_file is not None:
            try:
                with open(password_file, encoding="utf-8") as handle:
                    password = handle.read().rstrip("\r\n")
            except OSError as error:
                raise ValueError(
                    f"cannot read password-file {password_file!r}: {error.strerror}"
                )
        if (user is None) != (password is None):
            raise ValueError("--deliver smtp: user= and password-file= go together")
        if user is not None and tls == "none" and not parsed.loopback:
            raise ValueError(
                "--deliver smtp: refusing to send a password without TLS to a"
                " host that is not loopback (use tls=required)"
            )
        self.tls = tls
        self.user = user
        self._password = password
        self._tls_options: Any = None
        if tls != "none":
            name = tls_name or parsed.host
            if not name:
                raise ValueError(
                    "--deliver smtp: TLS over a unix socket needs tls-name="
                )
            self._tls_options = ssl.optionsForClientTLS(
                name, trustRoot=load_trust_root(ca_file)
            )
        super().__init__(parsed, reactor, timeout, pool_size, helo=helo)

    def start_tls_now(self, connection: DownstreamProtocol) -> None:
        if self.tls == "implicit":
            connection.transport.startTLS(self._tls_options)
            connection.tls = True

    async def prepare(self, connection: DownstreamProtocol) -> None:
        await super().prepare(connection)
        if self.tls in ("required", "opportunistic") and not connection.tls:
            if "STARTTLS" in connection.extensions:
                reply = await connection.command("STARTTLS")
                if reply.code != 220:
                    if self.tls == "required":
                        raise self._refused("STARTTLS", reply.code, reply.text)
                else:
                    connection.transport.startTLS(self._tls_options)
                    connection.tls = True
                    await self.hello(connection)
            elif self.tls == "required":
                raise DownstreamError(
                    Reply(451, "4.7.5", f"Next hop {self.name} does not offer STARTTLS")
                )
        if self.user is not None:
            await self._authenticate(connection)

    def _refused(self, what: str, code: int, text: str) -> DownstreamError:
        enhanced = "4.7.5" if what == "STARTTLS" else "4.7.0"
        return DownstreamError(
            Reply(451, enhanced, f"Next hop {self.name} refused {what}: {code} {text}")
        )

    async def _authenticate(self, connection: DownstreamProtocol) -> None:
        assert self.user is not None and self._password is not None
        mechanisms = connection.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            reply = await connection.command(auth_plain(self.user, self._password))
        elif "LOGIN" in mechanisms:
            reply = await connection.command("AUTH LOGIN")
            for secret in (self.user, self._password):
                if reply.code != 334:
                    break
                reply = await connection.command(
                    base64.b64encode(secret.encode()).decode("ascii")
                )
        else:
            raise DownstreamError(
                Reply(
                    451,
                    "4.7.0",
                    f"Next hop {self.name} offers no AUTH PLAIN or LOGIN",
                )
            )
        if reply.code != 235:
            raise self._refused("AUTH", reply.code, reply.text)


def from_target(target: str, options: DeliverOptions, reactor: Any) -> SMTPRelayHandler:
    """C{smtp:ENDPOINT[:tls=MODE][:user=U:password-file=F]...} -> a handler."""
    parsed = parse_endpoint("smtp", target, _KEYS, reactor)
    keys = parsed.options
    return SMTPRelayHandler(
        parsed.description,
        tls=keys.get("tls") or None,
        tls_name=keys.get("tls-name") or None,
        ca_file=options.ca_file,
        user=keys.get("user") or None,
        password_file=keys.get("password-file") or None,
        timeout=options.timeout,
        pool_size=pool_size(keys, target),
        helo=keys.get("helo") or None,
        reactor=reactor,
    )
