# -*- test-case-name: tests.test_deliver_broker -*-
"""
C{--spool DIR}: keep mail flowing while the broker is down.

With a spool, a message the engine does not take (down, refusing, too
slow) is written to C{DIR/tmp}, fsynced, renamed into C{DIR/queue} and the
directory fsynced; only then does the client get its 250.  A forwarder
publishes the queue oldest first, in batches of up to 64 published in order
(one at a time would cost an ack round trip each), deleting each file once
the engine has acknowledged it, and backs off (0.5 s doubling to 30 s) while
the engine keeps failing.  While anything waits in the queue, new messages
join its end instead of overtaking it, so the engine sees them in the order
they were accepted.  The one exception: when the engine refuses a message
but takes later ones of the same batch, the refused one follows them on the
retry.

A file is deleted only after the engine's ack, so a crash (SIGKILL, power)
between ack and delete publishes that message again after the restart: at
least once, with the same id, which consumers deduplicate on.  Files left in
C{DIR/tmp} never got a 250 and are removed at start-up.  One process owns a
spool at a time (an exclusive lock on C{DIR/lock}).

File names are C{<sequence>-<id>.msg}; a file holds one JSON line (the id
and the envelope) followed by the message.
"""

from __future__ import annotations

import bisect
import fcntl
import os
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..replies import SMTPError
from ._broker import OutboundMessage

__all__ = ["Spool"]

_log = Logger()


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """An fsynced directory queue in front of a broker.

    The forwarder publishes up to C{batch} messages at a time, in order, and
    waits for all their acks before the next batch.

    Args:
        path: the spool directory (created, with C{tmp/} and C{queue/}).
        reactor: for the thread pool and the retry timer.
        retry_initial, retry_max: the forwarder's back-off bounds (seconds).

    Raises:
        ValueError: the directory cannot be used or another process holds it.
    """

    #: messages published together while the spool drains
    batch = 64

    def __init__(
        self,
        path: str,
        *,
        reactor: Any,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        self.path = os.path.abspath(path)
        self._queue_dir = os.path.join(self.path, "queue")
        self._tmp_dir = os.path.join(self.path, "tmp")
        self._reactor = reactor
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        try:
            for directory in (self._queue_dir, self._tmp_dir):
                os.makedirs(directory, exist_ok=True)
            self._lock_fd: Optional[int] = os.open(
                os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT, 0o600
            )
        except OSError as error:
            raise ValueError(f"cannot use --spool {path!r}: {error.strerror}")
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise ValueError(f"--spool {path!r} is in use by another process")
        # Start-up, before the reactor runs: blocking disk access is fine here.
        for name in os.listdir(self._tmp_dir):
            os.unlink(os.path.join(self._tmp_dir, name))
        self._pending: list[str] = sorted(
            n for n in os.listdir(self._queue_dir) if n.endswith(".msg")
        )
        last = max((int(n.split("-", 1)[0]) for n in self._pending), default=0)
        self._next_sequence = last + 1
        self._writing = 0
        self._publish: Optional[Callable[[OutboundMessage], Deferred[Any]]] = None
        self._name = "the broker"
        self._running = False
        self._forwarding = False
        self._retry_call: Any = None
        self._delay = retry_initial
        #: messages forwarded from the spool since start-up
        self.forwarded = 0

    @property
    def pending(self) -> int:
        """Messages in the spool waiting for the engine."""
        return len(self._pending) + self._writing

    def attach(
        self, publish: Callable[[OutboundMessage], Deferred[Any]], name: str
    ) -> None:
        """Forward through C{publish} (which applies the timeout)."""
        self._publish = publish
        self._name = name

    def start(self) -> None:
        self._running = True
        if self._pending:
            _log.info(
                "smtpd: spool {path} holds {count} messages for {name}",
                path=self.path,
                count=len(self._pending),
                name=self._name,
            )
        self._kick()

    def stop(self) -> None:
        self._running = False
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None

    def close(self) -> None:
        """Stop and release the directory for another process."""
        self.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- accepting ---------------------------------------------------------------
    def accept(self, message: OutboundMessage) -> Deferred[str]:
        """Fires with the message id once the engine or the spool holds it."""
        assert self._publish is not None, "Spool.attach was not called"
        if self.pending:
            return self._store(message)
        published = self._publish(message)
        published.addCallbacks(
            lambda _: message.message_id,
            lambda failure: self._store(message, failure),
        )
        return published

    def _store(
        self, message: OutboundMessage, reason: Optional[Failure] = None
    ) -> Deferred[str]:
        sequence = self._next_sequence
        self._next_sequence += 1
        name = f"{sequence:012d}-{message.message_id}.msg"
        self._writing += 1
        if reason is not None:
            _log.warn(
                "smtpd: {name} did not take message {id} ({reason}); spooling it",
                name=self._name,
                id=message.message_id,
                reason=reason.getErrorMessage(),
            )
        stored = self._in_thread(self._write_blocking, name, message.to_bytes())

        def written(_: Any) -> str:
            self._writing -= 1
            bisect.insort(self._pending, name)
            self._kick()
            return message.message_id

        def failed(failure: Failure) -> Failure:
            self._writing -= 1
            _log.failure("smtpd: spool write failed", failure)
            return Failure(SMTPError(451, "4.3.0", "Local spool failed; try later"))

        return stored.addCallbacks(written, failed)

    def _write_blocking(self, name: str, data: bytes) -> None:
        tmp_path = os.path.join(self._tmp_dir, name)
        try:
            with open(tmp_path, "xb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.rename(tmp_path, os.path.join(self._queue_dir, name))
        except BaseException:
            try:
                os.unlink(tmp_path)
            except OSError:
                pass
            raise
        _fsync_directory(self._queue_dir)

    # -- forwarding --------------------------------------------------------------
    def _kick(self) -> None:
        if (
            self._running
            and self._publish is not None
            and self._pending
            and not self._forwarding
            and self._retry_call is None
        ):
            self._forwarding = True
            names = self._pending[: self.batch]
            paths = [os.path.join(self._queue_dir, name) for name in names]
            bad_dir = os.path.join(self.path, "bad")
            read = self._in_thread(_read_messages, paths, bad_dir)
            read.addCallback(self._publish_batch, names)
            read.addErrback(self._batch_failed)

    def _publish_batch(self, messages: list[Any], names: list[str]) -> Deferred[Any]:
        publish = self._publish
        assert publish is not None
        sent: list[str] = []
        acks: list[Deferred[Any]] = []
        for name, message in zip(names, messages):
            if message is None:
                self._pending.remove(name)
                _log.error(
                    "smtpd: spool file {name} is unreadable; moved to {bad}",
                    name=name,
                    bad=os.path.join(self.path, "bad"),
                )
                continue
            # Published in order; the engine sees them in this order.
            sent.append(name)
            acks.append(publish(message))
        return DeferredList(acks, consumeErrors=True).addCallback(
            self._batch_done, sent
        )

    def _batch_done(self, outcomes: list[tuple[bool, Any]], names: list[str]) -> Any:
        done = [name for name, (ok, _) in zip(names, outcomes) if ok]
        failures = [value for ok, value in outcomes if not ok]
        paths = [os.path.join(self._queue_dir, name) for name in done]

        def deleted(_: Any) -> None:
            for name in done:
                self._pending.remove(name)
            self.forwarded += len(done)
            self._forwarding = False
            if failures:
                self._back_off(failures[0])
                return
            self._delay = self.retry_initial
            if not self._pending:
                _log.info("smtpd: spool {path} is empty again", path=self.path)
            self._kick()

        return self._in_thread(_unlink_all, paths).addCallback(deleted)

    def _batch_failed(self, failure: Failure) -> None:
        # Reading or deleting failed: what is left is sent again later.
        self._forwarding = False
        self._back_off(failure)

    def _back_off(self, failure: Failure) -> None:
        if not self._running:
            return
        delay = self._delay
        self._delay = min(self._delay * 2, self.retry_max)
        _log.warn(
            "smtpd: forwarding {count} spooled messages to {name} failed"
            " ({reason}); retrying in {delay:g}s",
            count=len(self._pending),
            name=self._name,
            reason=failure.getErrorMessage(),
            delay=delay,
        )
        self._retry_call = self._reactor.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        self._kick()

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        pool = self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, fn, *args)


def _read_messages(paths: list[str], bad_dir: str) -> list[Optional[OutboundMessage]]:
    """The messages in C{paths}; C{None} for a file that does not parse,
    which is moved to C{bad_dir} (not one of ours, or truncated by hand)."""
    messages: list[Optional[OutboundMessage]] = []
    for path in paths:
        with open(path, "rb") as file:
            data = file.read()
        try:
            messages.append(OutboundMessage.from_bytes(data))
        except (ValueError, KeyError, TypeError):
            os.makedirs(bad_dir, exist_ok=True)
            os.rename(path, os.path.join(bad_dir, os.path.basename(path)))
            messages.append(None)
    return messages


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        os.unlink(path)
