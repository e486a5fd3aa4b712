"""The handler adapter and the message in flight, without a protocol."""

from __future__ import annotations

import pytest

from twisted_smtpd._delivery import HandlerHooks, Message, ReceiverProducer
from twisted_smtpd._session import Envelope


def envelope() -> Envelope:
    return Envelope(
        session_id="S", peer=None, helo="c.example", esmtp=True, tls=None, auth=None
    )


class Owner:
    def __init__(self) -> None:
        self.calls: list = []

    def receiver_paused(self, paused: bool) -> None:
        self.calls.append(("paused", paused))

    def receiver_stopped(self) -> None:
        self.calls.append(("stopped",))


class Consumer:
    def __init__(self) -> None:
        self.producer = None
        self.unregistered = 0

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.unregistered += 1

    def write(self, data):
        pass

    def finish(self):
        return None

    def abort(self):
        pass


class TestReceiverProducer:
    def test_passes_wishes_to_the_owner(self) -> None:
        """Pause, resume and stop reach the owner, not the transport."""
        owner = Owner()
        producer = ReceiverProducer(owner)
        producer.pauseProducing()
        producer.resumeProducing()
        producer.stopProducing()
        assert [("paused", True), ("paused", False), ("stopped",)] == owner.calls

    def test_revoked(self) -> None:
        """After stop_proxying the producer does nothing."""
        owner = Owner()
        producer = ReceiverProducer(owner)
        producer.stop_proxying()
        producer.pauseProducing()
        producer.resumeProducing()
        producer.stopProducing()
        assert [] == owner.calls


class TestMessage:
    def test_consumer_is_registered_and_revoked(self) -> None:
        """A receiver that is a consumer gets a producer, revoked on detach."""
        owner, consumer = Owner(), Consumer()
        message = Message(consumer, envelope(), owner)
        consumer.producer.pauseProducing()
        message.detach()
        consumer.producer.resumeProducing()
        assert [("paused", True)] == owner.calls
        assert 1 == consumer.unregistered
        message.detach()
        assert 1 == consumer.unregistered

    def test_plain_receiver_gets_no_producer(self) -> None:
        """A receiver without registerProducer is left alone."""

        class Plain:
            def write(self, data):
                pass

        message = Message(Plain(), envelope(), Owner())
        assert message.producer is None
        message.detach()


class TestHandlerHooks:
    def test_callable_collects_the_message(self) -> None:
        """A plain callable gets the whole content once the receiver finishes."""
        seen = []
        hooks = HandlerHooks(lambda e: seen.append(e.content) or "Q")
        env = envelope()
        receiver = hooks.open_message(env)
        receiver.write(b"a")
        receiver.write(b"b")
        assert "Q" == receiver.finish()
        assert [b"ab"] == seen
        assert hooks.check_sender is None

    def test_streaming_handler_is_used_as_is(self) -> None:
        """open_message wins over handle_message."""

        class Both:
            def open_message(self, envelope):
                return "receiver"

            def handle_message(self, envelope):
                raise AssertionError("not called")

        assert "receiver" == HandlerHooks(Both()).open_message(envelope())

    def test_unusable_handler(self) -> None:
        """Neither callable nor hooks: a TypeError at once."""
        with pytest.raises(TypeError):
            HandlerHooks(object())
