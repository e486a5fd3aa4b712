# -*- test-case-name: tests.test_deliver_broker -*-
"""
C{--spool DIR}: keep mail flowing while the broker is down.

With a spool, a message the engine does not take (down, refusing, too
slow) is written to C{DIR/tmp}, fsynced, renamed into C{DIR/queue} and the
directory fsynced; only then does the client get its 250.  A forwarder
publishes the queue oldest first, one message at a time, deleting each file
once the engine has acknowledged it, and backs off (0.5 s doubling to 30 s)
while the engine keeps failing.  While anything waits in the queue, new
messages join its end instead of overtaking it, so the engine sees them in
the order they were accepted.

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

from twisted.internet.defer import Deferred
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

    Args:
        path: the spool directory (created, with C{tmp/} and C{queue/}).
        reactor: for the thread pool and the retry timer.
        retry_initial, retry_max: the forwarder's back-off bounds (seconds).

    Raises:
        ValueError: the directory cannot be used or another process holds it.
    """

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
            self._forward(self._pending[0])

    def _forward(self, name: str) -> None:
        path = os.path.join(self._queue_dir, name)
        assert self._publish is not None
        publish = self._publish
        read = self._in_thread(_read_message, path)
        read.addCallback(publish)
        read.addCallback(lambda _: self._in_thread(os.unlink, path))
        read.addCallbacks(
            self._forwarded,
            self._forward_failed,
            callbackArgs=(name,),
            errbackArgs=(name,),
        )

    def _forwarded(self, _: Any, name: str) -> None:
        self._pending.remove(name)
        self.forwarded += 1
        self._delay = self.retry_initial
        self._forwarding = False
        if not self._pending:
            _log.info("smtpd: spool {path} is empty again", path=self.path)
        self._kick()

    def _forward_failed(self, failure: Failure, name: str) -> None:
        self._forwarding = False
        if failure.check(_Unreadable):
            # Not one of ours (or truncated by hand): keep it, out of the way.
            bad_dir = os.path.join(self.path, "bad")
            os.makedirs(bad_dir, exist_ok=True)
            os.rename(os.path.join(self._queue_dir, name), os.path.join(bad_dir, name))
            self._pending.remove(name)
            _log.error(
                "smtpd: spool file {name} is unreadable; moved to {bad}",
                name=name,
                bad=bad_dir,
            )
            self._kick()
            return
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


class _Unreadable(Exception):
    """A spool file that does not parse."""


def _read_message(path: str) -> OutboundMessage:
    with open(path, "rb") as file:
        data = file.read()
    try:
        return OutboundMessage.from_bytes(data)
    except (ValueError, KeyError, TypeError) as error:
        raise _Unreadable(str(error)) from error
