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

This module imports nothing from Twisted.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ._session import Envelope

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


class HandlerHooks:
    """A user's handler reduced to the hooks the protocol calls."""

    __slots__ = ("check_client", "check_sender", "check_recipient", "open_message")

    def __init__(self, handler: Any) -> None:
        self.check_client = getattr(handler, "check_client", None)
        self.check_sender = getattr(handler, "check_sender", None)
        self.check_recipient = getattr(handler, "check_recipient", None)
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

            def open_message(envelope: Envelope) -> _CollectingReceiver:
                return _CollectingReceiver(envelope, whole)

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
    """One message in flight, from C{open_message} to the end of its data.

    Args:
        receiver: what C{open_message} returned.
        envelope: the transaction's envelope.
        owner: told of the receiver's pause and resume (see
            L{ReceiverProducer}); only if the receiver registers for them.
    """

    __slots__ = ("receiver", "envelope", "producer", "failure")

    def __init__(self, receiver: Any, envelope: Envelope, owner: Any) -> None:
        if not callable(getattr(receiver, "write", None)):
            raise TypeError(f"open_message returned {receiver!r}, not a receiver")
        self.receiver = receiver
        self.envelope = envelope
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
