# -*- test-case-name: tests.test_delivery -*-
"""
The handler as the protocol sees it, and the message in flight.

L{HandlerHooks} reduces any handler (a callable, or an object with some of
the hooks of L{twisted_smtpd.interfaces.Handler}) to the hooks the protocol
calls.  L{Message} is one message between C{open_message} and its end: the
receiver, the envelope, and the receiver's handle on
the connection, a L{ReceiverProducer} that is revoked when the message ends
(the model is Twisted's C{TransportProxyProducer.stopProxying}): a receiver
that keeps it can't pause a later message, and only the protocol ever
pauses or resumes the transport.

The message's end (its reply, event and log line) runs here too; the
protocol keeps thin entry points.  Twisted is used only through L{_hooks}
(the hook outcome's reply and the log lines).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

from ._hooks import (
    HandlerTimedOut,
    abort_receiver,
    log_message,
    message_outcomes,
    queue_id,
    tell_abandoned,
)
from ._outcomes import outcome_summary, single_reply
from ._session import Envelope
from .replies import R552_TOO_BIG, Reply, SMTPError

__all__ = ["HandlerHooks", "Message", "ReceiverProducer"]


class _CollectingReceiver:
    """Gathers the message for handlers that want it whole."""

    __slots__ = ("_chunks", "_envelope", "_handle")
    #: not a consumer; saves a failing getattr per message
    registerProducer = None

    def __init__(self, envelope: Envelope, handle: Callable[[Envelope], Any]) -> None:
        self._envelope = envelope
        self._handle = handle
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._chunks.append(data)

    def finish(self) -> Any:
        self._envelope.content = b"".join(self._chunks)
        self._chunks = []
        return self._handle(self._envelope)

    def abort(self) -> None:
        self._chunks = []


class _AbandoningReceiver(_CollectingReceiver):
    """The whole-message form for a handler with C{transaction_abandoned}:
    a message dropped before C{handle_message} abandons its transaction."""

    __slots__ = ("_abandoned",)

    def __init__(
        self,
        envelope: Envelope,
        handle: Callable[[Envelope], Any],
        abandoned: Callable[[Envelope], Any],
    ) -> None:
        super().__init__(envelope, handle)
        self._abandoned: Optional[Callable[[Envelope], Any]] = abandoned

    def finish(self) -> Any:
        self._abandoned = None  # handed over: an abort now is no abandonment
        return super().finish()

    def abort(self) -> None:
        self._chunks = []
        abandoned, self._abandoned = self._abandoned, None
        if abandoned is not None:
            tell_abandoned(abandoned, self._envelope)


class HandlerHooks:
    """A user's handler reduced to the hooks the protocol calls."""

    __slots__ = (
        "check_client",
        "check_sender",
        "check_recipient",
        "open_message",
        "transaction_abandoned",
    )

    def __init__(self, handler: Any) -> None:
        self.check_client = getattr(handler, "check_client", None)
        self.check_sender = getattr(handler, "check_sender", None)
        self.check_recipient = getattr(handler, "check_recipient", None)
        abandoned = getattr(handler, "transaction_abandoned", None)
        self.transaction_abandoned = abandoned
        open_message = getattr(handler, "open_message", None)
        handle = getattr(handler, "handle_message", None)
        if open_message is None:
            if handle is None:
                if not callable(handler):
                    raise TypeError(
                        f"{handler!r} is neither callable nor has"
                        " handle_message/open_message"
                    )
                handle = handler
            whole: Callable[[Envelope], Any] = handle
            if abandoned is None:

                def open_message(envelope: Envelope) -> _CollectingReceiver:
                    return _CollectingReceiver(envelope, whole)

            else:
                # (a separate receiver: no cost for handlers without the hook)
                tell: Callable[[Envelope], Any] = abandoned

                def open_message(envelope: Envelope) -> _CollectingReceiver:
                    return _AbandoningReceiver(envelope, whole, tell)

        self.open_message = open_message


class ReceiverProducer:
    """The connection as a streaming receiver sees it: pause, resume, stop.

    It asks its owner (the protocol) rather than touching the transport, so
    the owner can combine the receiver's wish with its own reasons to pause.
    After L{stop_proxying} every call is ignored.
    """

    __slots__ = ("_owner",)

    def __init__(self, owner: Any) -> None:
        self._owner = owner

    def pauseProducing(self) -> None:
        if self._owner is not None:
            self._owner.receiver_paused(True)

    def resumeProducing(self) -> None:
        if self._owner is not None:
            self._owner.receiver_paused(False)

    def stopProducing(self) -> None:
        if self._owner is not None:
            self._owner.receiver_stopped()

    def stop_proxying(self) -> None:
        self._owner = None


class Message:
    """One message in flight, from C{open_message} to its reply.

    It owns the receiver, the envelope, the receiver's revocable producer
    and a C{write()} failure, and runs the message's end: the receiver's
    C{finish()} through the owner's hook runner, the reply (in LMTP one per
    recipient), the event and the log line.  The owner (the protocol) holds
    it as C{_message} until then; an abort (RSET, a new greeting, a lost
    connection) clears that, so a C{finish()} that answers later is only
    logged.

    Args:
        receiver: what C{open_message} returned.
        envelope: the transaction's envelope.
        owner: the protocol: told of the receiver's pause and resume (see
            L{ReceiverProducer}) and answering for the message.
    """

    __slots__ = ("receiver", "envelope", "producer", "failure", "_owner")

    def __init__(self, receiver: Any, envelope: Envelope, owner: Any) -> None:
        if not callable(getattr(receiver, "write", None)):
            raise TypeError(f"open_message returned {receiver!r}, not a receiver")
        self.receiver = receiver
        self.envelope = envelope
        self._owner = owner
        #: the receiver's write() raised this (a Failure): answered at the end
        self.failure: Any = None
        register = getattr(receiver, "registerProducer", None)
        if register is None:
            self.producer: Optional[ReceiverProducer] = None
        else:
            self.producer = ReceiverProducer(owner)
            register(self.producer, True)

    def detach(self) -> None:
        """The receiver's part is over: revoke its producer, unregister it."""
        if self.producer is not None:
            self.producer.stop_proxying()
            self.producer = None
            unregister = getattr(self.receiver, "unregisterProducer", None)
            if unregister is not None:
                unregister()

    def _let_go(self) -> None:
        """Detach, and lift the receiver's pause of the connection."""
        if self.producer is not None:
            self.detach()
            self._owner.receiver_paused(False)

    def end_of_data(self, size: int, too_big: bool) -> None:
        """The data is in: C{finish()} it, or answer its size or write failure."""
        # The message stays in flight until finish() answers: a client gone
        # meanwhile aborts it (a 250 it never sees would make it resend).
        owner = self._owner
        if self.producer is not None:
            self._let_go()
        self.envelope.size = size
        failure = self.failure
        if failure is not None:  # the receiver's write() raised
            self._reply_after_data(owner.failure_reply(failure))
            self._done("refused", _failed(failure))
        elif too_big:
            abort_receiver(self.receiver)
            self._reply_after_data(R552_TOO_BIG)
            self._done("too big", "too_big")
        else:
            receiver = self.receiver
            if owner._events is not None:
                owner._run(
                    "message", receiver.finish, (), self._stored, self._not_stored
                )
                return
            # What the hook runner does when there is no timing to take: a
            # message stored at once (finish() gave None) is answered here;
            # an exception or any other result goes to the runner as before.
            try:
                result = receiver.finish()
            except Exception:
                owner._hook_raised("message", self._not_stored)
                return
            if result is None:
                self._stored(None)
            else:
                given = lambda: result  # noqa: E731 - finish() already ran
                owner._run("message", given, (), self._stored, self._not_stored)

    def _stored(self, result: Any) -> None:
        """The handler's result: one reply (in LMTP one per recipient)."""
        owner = self._owner
        envelope = self.envelope
        lmtp = owner.lmtp
        if not lmtp and (result is None or not isinstance(result, Mapping)):
            if result:
                queued = queue_id(result, envelope, owner.session.session_id)
            else:
                queued = envelope.message_id  # what queue_id gives, one call less
            owner._reply_queued(queued)
            owner.session.junk_commands = 0  # like Postfix: mail moved, junk forgiven
            self._done("accepted", "accepted")
            return
        outcomes = message_outcomes(result, envelope, owner.session.session_id)
        if lmtp:
            for outcome in outcomes:
                owner.reply(outcome.reply)
        else:
            owner.reply(single_reply(outcomes, envelope.message_id))
        stored = sum(outcome.stored for outcome in outcomes)
        if stored:
            owner.session.junk_commands = 0
        self._done(*outcome_summary(stored, len(outcomes), lmtp))

    def _not_stored(self, failure: Any) -> None:
        """C{finish()} failed: answered by the hook runner (in LMTP, here)."""
        owner = self._owner
        if failure.check(HandlerTimedOut) and owner._message is self:
            abort_receiver(self.receiver)  # (a lost connection aborted it already)
        if owner.lmtp:
            self._reply_after_data(owner.failure_reply(failure))
        self._done("refused", _failed(failure))

    def _reply_after_data(self, reply: Reply) -> None:
        """C{reply} to the end of the data (in LMTP once per recipient)."""
        owner = self._owner
        for _ in self.envelope.rcpt_tos if owner.lmtp else (None,):
            owner.reply(reply)

    def abort(self) -> None:
        """RSET, a new greeting or a lost connection: the receiver aborts."""
        owner = self._owner
        owner._message = None
        self._let_go()
        abort_receiver(self.receiver)
        if owner._events is not None:
            owner._events.message_received("aborted", self.envelope.size)

    def _done(self, logged: str, outcome: str) -> None:
        owner = self._owner
        aborted = owner._message is not self  # the connection was lost meanwhile
        if not aborted:
            owner._message = None
        session = owner.session
        session.message_done()
        if owner._events is not None and not aborted:
            owner._events.message_received(outcome, self.envelope.size)
        if owner._phase == "draining":  # (protocol._DRAINING) close once answered
            owner._close_if_draining()
        if not (owner.factory.quiet and outcome == "accepted"):
            log_message(session.session_id, self.envelope, logged)


def _failed(failure: Any) -> str:
    """The outcome of a message that failed: refused (an SMTPError) or failed."""
    return "refused" if failure.check(SMTPError) else "failed"
