# -*- test-case-name: tests.test_handlers -*-
"""
Built-in handlers: Maildir delivery, an in-memory collector, and discard.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._session import Envelope

__all__ = ["MaildirHandler", "MemoryHandler", "DiscardHandler", "discard"]

_log = Logger()
#: one counter per process: names stay unique across MaildirHandler instances
_DELIVERIES = itertools.count()


class DiscardHandler:
    """Accept every message and drop it (benchmarks, smoke tests)."""

    def open_message(self, envelope: Envelope) -> DiscardHandler:
        return self

    def write(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        return None

    def abort(self) -> None:
        pass


#: the handler for C{--handler twisted_smtpd.handlers.discard}
discard = DiscardHandler()


class MemoryHandler:
    """Keep every accepted L{Envelope} in C{messages} (tests and embedding).

    C{next_message()} gives a Deferred that fires with the next envelope to
    arrive, for tests that wait for delivery.
    """

    def __init__(self) -> None:
        self.messages: list[Envelope] = []
        self._waiting: list[Deferred[Envelope]] = []

    def handle_message(self, envelope: Envelope) -> None:
        self.messages.append(envelope)
        waiting, self._waiting = self._waiting, []
        for deferred in waiting:
            deferred.callback(envelope)

    def next_message(self) -> Deferred[Envelope]:
        deferred: Deferred[Envelope] = Deferred()
        self._waiting.append(deferred)
        return deferred


def _return_path(envelope: Envelope) -> bytes:
    return f"Return-Path: <{envelope.mail_from}>\r\n".encode("utf-8", "surrogateescape")


class MaildirHandler:
    """Deliver into a Maildir: tmp/ -> write -> fsync -> rename into new/.

    The message streams to disk in a worker thread once it outgrows
    C{spool_threshold}, so memory stays bounded; the file only appears in
    new/ after its data is on disk, and only then does the client get 250.

    Args:
        path: the Maildir (created with tmp/, new/ and cur/ if missing).
        fsync: flush file and directory to disk before answering 250.
        reactor: for the thread pool; default the global reactor.
    """

    spool_threshold = 256 * 1024
    #: pause the client when this many bytes wait for the disk
    max_in_flight = 1024 * 1024

    def __init__(self, path: str, *, fsync: bool = True, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.path = os.path.abspath(path)
        self.fsync = fsync
        self._reactor = reactor
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._pid = os.getpid()

    def unique_name(self) -> str:
        """A Maildir file name unique to this process (maildir(5) style)."""
        now = time.time()
        seconds = int(now)
        micro = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micro}P{self._pid}Q{next(_DELIVERIES)}.{self._host}"

    def open_message(self, envelope: Envelope) -> _MaildirReceiver:
        return _MaildirReceiver(self, envelope)

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        pool = self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, fn, *args)


class _MaildirReceiver:
    """One message on its way into the Maildir."""

    def __init__(self, maildir: MaildirHandler, envelope: Envelope) -> None:
        self._maildir = maildir
        self._name = maildir.unique_name()
        self._tmp_path = os.path.join(maildir.path, "tmp", self._name)
        self._new_path = os.path.join(maildir.path, "new", self._name)
        self._chunks: list[bytes] = [_return_path(envelope), envelope.received_header]
        self._buffered = sum(len(c) for c in self._chunks)
        self._in_flight = 0
        self._file: Any = None
        self._tail: Optional[Deferred[Any]] = None  # the last disk operation
        self._producer: Any = None
        self._paused = False

    # IConsumer, for back-pressure
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer

    def unregisterProducer(self) -> None:
        if self._paused and self._producer is not None:
            self._producer.resumeProducing()
        self._paused = False
        self._producer = None

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= self._maildir.spool_threshold:
            self._spool()

    def _spool(self) -> None:
        data = b"".join(self._chunks)
        self._chunks = []
        self._buffered = 0
        self._in_flight += len(data)
        self._then(self._write_blocking, data).addBoth(self._written, len(data))
        if self._in_flight > self._maildir.max_in_flight and self._producer is not None:
            if not self._paused:
                self._paused = True
                self._producer.pauseProducing()

    def _written(self, result: Any, size: int) -> Any:
        # Also after a failed write: a producer left paused would hang the client.
        self._in_flight -= size
        if self._paused and (
            self._in_flight <= self._maildir.max_in_flight // 2
            or isinstance(result, Failure)
        ):
            self._paused = False
            if self._producer is not None:
                self._producer.resumeProducing()
        return result

    def _then(
        self, fn: Callable[..., Any], *args: Any, always: bool = False
    ) -> Deferred[Any]:
        """Run C{fn} in a thread after every earlier disk operation.

        With C{always}, run it even if an earlier operation failed (clean-up).
        """
        if self._tail is None:
            self._tail = self._maildir._in_thread(fn, *args)
        elif always:
            self._tail.addBoth(lambda _: self._maildir._in_thread(fn, *args))
        else:
            self._tail.addCallback(lambda _: self._maildir._in_thread(fn, *args))
        return self._tail

    def _write_blocking(self, data: bytes) -> None:
        if self._file is None:
            self._file = open(self._tmp_path, "xb")
        self._file.write(data)

    def _commit_blocking(self, data: bytes) -> str:
        self._write_blocking(data)
        file = self._file
        file.flush()
        if self._maildir.fsync:
            os.fsync(file.fileno())
        file.close()
        self._file = None
        os.rename(self._tmp_path, self._new_path)
        if self._maildir.fsync:
            fd = os.open(os.path.dirname(self._new_path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self._name

    def _discard_blocking(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            os.unlink(self._tmp_path)
        except OSError:
            pass  # never written, or tmp/ itself is broken: nothing to undo

    def finish(self) -> Deferred[str]:
        data = b"".join(self._chunks)
        self._chunks = []
        done = self._then(self._commit_blocking, data)
        done.addErrback(self._failed)
        return done

    def _failed(self, failure: Any) -> Any:
        self._tail = None
        self._maildir._in_thread(self._discard_blocking).addErrback(_log_cleanup)
        return failure

    def abort(self) -> None:
        self._chunks = []
        if self._tail is None:
            if self._file is None:
                return
            self._tail = succeed(None)
        self._then(self._discard_blocking, always=True).addErrback(_log_cleanup)


def _log_cleanup(failure: Failure) -> None:
    _log.failure("smtpd: Maildir clean-up failed", failure)
