# -*- test-case-name: tests.test_protocol -*-
"""
What a handler may look like.

The simple form is any callable taking an L{Envelope}: it is called once the
whole message is in C{envelope.content}.  The full form is an object with any
of the methods of L{Handler}.  Every hook may return a plain value, a
L{Deferred <twisted.internet.defer.Deferred>} or a coroutine; raising
L{SMTPError <twisted_smtpd.SMTPError>} sends that reply, and any other
exception is logged and answered C{451 4.3.0}.

Per-recipient outcomes: C{handle_message} and C{MessageReceiver.finish}
may return (or resolve to) a mapping from each recipient, as it is in
C{envelope.rcpt_tos}, to its own outcome: C{None} or a queue id (stored) or
an C{SMTPError} (refused with that reply).  Under LMTP each accepted
recipient gets its own reply after the data, in RCPT order; a recipient
missing from the mapping gets C{451 4.3.0}.  A plain result (or a raised
exception) applies to every recipient.  Under SMTP a mapping folds into the
one reply: C{250} only if every recipient was stored, else the first
refusal (see L{twisted_smtpd._outcomes}).

Deadlines: every hook is bounded by the factory's C{handler_timeout}
(C{--handler-timeout}, 120 s by default).  When it passes, the hook's
Deferred is cancelled (a coroutine gets C{CancelledError}), a receiver is
aborted, and the client gets C{451 4.3.0} (C{421} and the connection closed
for C{check_client}); nothing is reported stored and the session goes on.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

from ._session import Envelope

__all__ = ["Handler", "MessageReceiver"]


@runtime_checkable
class MessageReceiver(Protocol):
    """Takes one message chunk by chunk.

    A receiver may also provide C{registerProducer(producer, streaming)} and
    C{unregisterProducer()} (Twisted's C{IConsumer}); it then gets the
    connection as a producer and may pause it to apply back-pressure.
    """

    def write(self, data: bytes) -> None:
        """The next bytes of the message (CRLF line endings, unstuffed)."""

    def finish(self) -> Any:
        """The message is complete.

        Return (or resolve to) C{None} or a queue id for the 250 reply once the
        message is safely stored; raise for a 4xx/5xx.  Or a mapping from
        each recipient to C{None}, a queue id or an C{SMTPError}: its own
        outcome (one reply each under LMTP).
        """

    def abort(self) -> None:
        """The message will not complete (too big, connection lost): drop it."""


class Handler(Protocol):
    """The full handler.  Every method is optional."""

    #: True if the handler honours DSN (RFC 3461) requests: only then is DSN
    #: advertised and RET, ENVID, NOTIFY and ORCPT accepted (default False)
    supports_dsn: bool

    def check_client(self, peer: Any) -> Any:
        """A client connected (C{peer} is its address); refuse it by raising,
        e.g. C{SMTPError(554, "5.7.1", "...")}: it gets that reply instead of
        the greeting and is disconnected."""

    def check_sender(self, envelope: Envelope) -> Any:
        """MAIL: C{envelope.mail_from} and C{mail_options} are filled in."""

    def check_recipient(
        self, envelope: Envelope, address: str, options: dict[str, Optional[str]]
    ) -> Any:
        """RCPT: accept or refuse one recipient."""

    def handle_message(self, envelope: Envelope) -> Any:
        """The whole message, in C{envelope.content}.

        Like C{MessageReceiver.finish}: C{None}, a queue id, or a mapping
        recipient -> outcome for per-recipient results."""

    def open_message(self, envelope: Envelope) -> MessageReceiver:
        """Stream the message instead: return a L{MessageReceiver}."""

    def transaction_abandoned(self, envelope: Envelope) -> Any:
        """The transaction of C{envelope} ended before its message was handed over.

        Called exactly once for each transaction that began (MAIL accepted:
        C{check_sender} returned) and ended before the handler was given its
        message, i.e. before C{open_message(envelope)} was called or, for a
        handler with C{handle_message} instead, before C{handle_message}.
        The ends: RSET, HELO/EHLO/LHLO, the connection closing (QUIT, idle or
        session timeout, too many errors, shutdown, lost); for the
        whole-message form also a message dropped on the way (too big, the
        connection lost during DATA or between BDAT chunks, RSET or a new
        greeting between BDAT chunks).  A streaming receiver learns of these
        from its C{abort()} instead, so this is not called once
        C{open_message} was.  Never called after a message was handed over,
        whatever its outcome.  (STARTTLS, AUTH and XCLIENT are refused inside
        a transaction, so they never end one.)

        Called at once, before the command that ended the transaction is
        answered (so before the next C{check_sender} of the session).  A
        notice: the return value is ignored, a returned Deferred or
        coroutine runs on its own and is not waited for; a failure is
        logged and never reaches the client.
        """
