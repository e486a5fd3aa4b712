"""Shared by the catcher's tests: a running catcher on loopback ports."""

from __future__ import annotations

import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Optional

from twisted.internet import defer, reactor, threads

from twisted_smtpd import SMTPFactory
from twisted_smtpd.handlers import MaildirHandler
from twisted_smtpd.web import CatcherHandler, CatcherResource, CatcherSite, MessageStore

PROBE_HTML = (
    "<html><body><h1>Welcome</h1>"
    '<p id="probe">script did not run</p>'
    "<script>document.getElementById('probe').textContent = 'script ran';"
    " document.title = 'script ran';</script>"
    "</body></html>"
)


@dataclass
class Catcher:
    store: MessageStore
    smtp_port: int
    web_port: int
    maildir: Optional[str]
    resource: CatcherResource
    _ports: list[Any]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for port in self._ports:
            yield port.stopListening()
        yield self.store.stop()


@defer.inlineCallbacks
def start_catcher(
    maildir: Optional[str], delegate: Any = None, **resource_kwargs: Any
) -> Any:
    """Store + SMTP listener + web listener, all on free loopback ports.

    A Deferred firing with a L{Catcher}; C{yield catcher.stop()} after."""
    store = MessageStore(maildir, **resource_kwargs.pop("store_kwargs", {}))
    yield store.start()
    if delegate is None:
        delegate = MaildirHandler(maildir)
    factory = SMTPFactory(CatcherHandler(delegate, store), hostname="mx.test")
    smtp = reactor.listenTCP(0, factory, interface="127.0.0.1")
    resource = CatcherResource(store, **resource_kwargs)
    web = reactor.listenTCP(0, CatcherSite(resource), interface="127.0.0.1")
    return Catcher(
        store, smtp.getHost().port, web.getHost().port, maildir, resource, [smtp, web]
    )


def make_message(
    subject: str,
    *,
    sender: str = "Alice Example <alice@example.org>",
    to: str = "bob@example.org",
    text: str = "Hello Bob, this is the plain text.\n",
    html: Optional[str] = None,
    attachment: Optional[tuple[str, bytes, str]] = None,
    headers: Optional[dict[str, str]] = None,
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    for name, value in (headers or {}).items():
        message[name] = value
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    if attachment is not None:
        name, data, content_type = attachment
        maintype, subtype = content_type.split("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return message


def send_blocking(
    port: int, message: EmailMessage, recipients: Optional[list[str]] = None
) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.send_message(message, to_addrs=recipients)


def send(port: int, message: EmailMessage, recipients: Optional[list[str]] = None):
    """smtplib in a thread (it blocks); a Deferred that fires after the 250."""
    return threads.deferToThread(send_blocking, port, message, recipients)
