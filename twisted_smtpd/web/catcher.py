# -*- test-case-name: tests.test_web_api -*-
"""
The handler wrapper that feeds the catcher.

L{CatcherHandler} delegates every hook to the real handler.  Once the
delegate's C{finish()} has succeeded (the message is safely held), it indexes
the message and notifies live clients, and only then lets the 250 go: a test
that has just sent a message finds it in the API.  Indexing never turns a
delivered message into an error: a failure is logged and the 250 stands.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from .._delivery import HandlerHooks
from .._session import Envelope
from ..handlers import MaildirHandler
from .store import MessageStore

__all__ = ["CatcherHandler"]

_log = Logger()


class CatcherHandler:
    """Wrap C{delegate} so that every message it accepts is also caught.

    With a L{MaildirHandler} delegate the store indexes the file the handler
    wrote (no second copy); with any other delegate (C{--handler},
    C{--deliver}) the receiver keeps a copy of the bytes for the store.

    Args:
        delegate: any handler form L{twisted_smtpd.interfaces} allows.
        store: where caught messages go.
    """

    def __init__(self, delegate: Any, store: MessageStore) -> None:
        self.delegate = delegate
        self.store = store
        self._hooks = HandlerHooks(delegate)
        # Expose only the checks the delegate has: the protocol skips absent ones.
        for name in ("check_client", "check_sender", "check_recipient"):
            hook = getattr(self._hooks, name)
            if hook is not None:
                setattr(self, name, hook)
        self._from_maildir = isinstance(delegate, MaildirHandler) and (
            store.maildir is not None and delegate.path == store.maildir
        )

    def __getattr__(self, name: str) -> Any:
        # Anything else the server asks of a handler (supports_dsn, ...) is
        # the delegate's business: the catcher must not change behaviour.
        if name.startswith("__") or name == "delegate":
            raise AttributeError(name)
        return getattr(self.delegate, name)

    def open_message(self, envelope: Envelope) -> _CatchingReceiver:
        receiver = self._hooks.open_message(envelope)
        return _CatchingReceiver(self, envelope, receiver, keep=not self._from_maildir)


class _CatchingReceiver:
    def __init__(
        self, catcher: CatcherHandler, envelope: Envelope, receiver: Any, keep: bool
    ) -> None:
        self._catcher = catcher
        self._envelope = envelope
        self._receiver = receiver
        self._copy: Optional[list[bytes]] = [] if keep else None

    # IConsumer: the delegate's back-pressure passes through.
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        register = getattr(self._receiver, "registerProducer", None)
        if register is not None:
            register(producer, streaming)

    def unregisterProducer(self) -> None:
        unregister = getattr(self._receiver, "unregisterProducer", None)
        if unregister is not None:
            unregister()

    def write(self, data: bytes) -> None:
        self._receiver.write(data)
        if self._copy is not None:
            self._copy.append(data)

    def abort(self) -> None:
        self._copy = None
        self._receiver.abort()

    def finish(self) -> Deferred[Any]:
        done = maybeDeferred(self._receiver.finish)
        done.addCallback(self._index)
        return done

    def _index(self, result: Any) -> Deferred[Any]:
        store = self._catcher.store
        if self._copy is not None:
            raw = b"".join(self._copy)
            self._copy = None
            indexed = store.add_raw(raw, self._envelope)
        else:
            indexed = store.add_maildir_file(str(result), self._envelope)

        def failed(failure: Any) -> None:
            # The delegate holds the message; the catcher just won't show it.
            _log.failure("smtpd web: could not index a delivered message", failure)

        indexed.addCallbacks(lambda _: None, failed)
        return indexed.addCallback(lambda _: result)
