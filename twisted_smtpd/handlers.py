# -*- test-case-name: tests.test_handlers -*-
"""
Built-in handlers: Maildir delivery, an in-memory collector, and discard.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import stat
import string
import time
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._session import Envelope
from .replies import R451_LOCAL_ERROR, R452_INSUFFICIENT_STORAGE, SMTPError

__all__ = [
    "MaildirHandler",
    "MemoryHandler",
    "DiscardHandler",
    "discard",
    "maildir_component",
]

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


#: errno values that mean "the disk is full": answered 452 4.3.1
_STORAGE_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
#: errno values of a refusing disk or a broken Maildir that we understand: one
#: log line each, no traceback (anything else is a bug worth a traceback)
_UNDERSTOOD = _STORAGE_FULL | frozenset(
    {
        errno.EROFS,
        errno.EIO,
        errno.EACCES,
        errno.EPERM,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.EMFILE,
        errno.ENFILE,
        errno.EFBIG,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.ESTALE,
    }
)


def _describe(error: OSError) -> str:
    """C{ENOSPC (No space left on device)}: the errno by name, then its text."""
    name = errno.errorcode.get(error.errno or 0, str(error.errno))
    return f"{name} ({error.strerror or error})"


class _RateLimitedLog:
    """At most one line per C{interval} seconds per kind; the rest are counted.

    A full disk refuses every message; one line per refusal would fill the
    log (and the disk it is on) as fast as clients retry.
    """

    def __init__(self, clock: Any, interval: float) -> None:
        self._clock = clock
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def error(self, kind: str, format: str, **fields: Any) -> None:
        now = self._clock.seconds()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        _log.error(format + "{more}", more=more, **fields)


#: what C{--maildir} may contain, filled from each recipient
MAILDIR_PLACEHOLDERS = ("local", "domain", "recipient")
#: kept as they are in a path component; everything else is %XX-encoded
_SAFE_CHARACTERS = frozenset(
    string.ascii_letters + string.digits + "!#$&'*+-=?^_`{|}~.@"
)


def maildir_component(value: str) -> str:
    """C{value} (part of a recipient address) as one safe path component.

    It can't name another directory: C{/}, NUL, control characters, C{%}
    and anything outside the printable characters of an address become
    C{%XX} (their UTF-8 bytes), a leading dot too (so never C{.}, C{..} or a
    hidden name), and the empty string is C{%}.  The mapping is one to one:
    distinct values never share a Maildir.  Printable non-ASCII (an
    SMTPUTF8 address) is kept.
    """
    if not value:
        return "%"
    out = []
    for index, char in enumerate(value):
        if (char in _SAFE_CHARACTERS and not (index == 0 and char == ".")) or (
            char > "\x7f" and char.isprintable()
        ):
            out.append(char)
        else:
            out.extend(
                f"%{byte:02X}" for byte in char.encode("utf-8", "surrogateescape")
            )
    return "".join(out)


def _template_fields(template: str) -> set[str]:
    """The placeholders in C{template}; C{ValueError} for any other."""
    fields = set()
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if name not in MAILDIR_PLACEHOLDERS or spec or conversion:
            raise ValueError(
                f"unknown placeholder {{{name}}} in Maildir path {template!r}"
                " (use {local}, {domain} or {recipient}; {{ and }} for braces)"
            )
        fields.add(name)
    return fields


class MaildirHandler:
    """Deliver into a Maildir: tmp/ -> write -> fsync -> rename into new/.

    The message streams to disk in a worker thread once it outgrows
    C{spool_threshold}, so memory stays bounded; the file only appears in
    new/ after its data is on disk, and only then does the client get 250.

    The rename into new/ is the commit point: once it has happened the
    client gets 250, even if the following fsync of new/ fails (that is
    logged as an error: the message is stored and visible, but its
    directory entry may not survive a crash of the machine).  Answering 451
    there would make the client send again a message that is already in
    new/.  Any failure before the rename removes the file in tmp/ (whatever
    C{close()} does) before the client is answered: 452 4.3.1 for a full
    disk or quota, 451 4.3.0 otherwise.  tmp/, new/ and cur/ are created
    again when they have gone missing, and files left in tmp/ (by a killed
    process) are removed once untouched for C{stale_tmp_age} seconds, at
    start-up and every C{sweep_interval} seconds.

    A C{path} containing C{{local}}, C{{domain}} or C{{recipient}} gives
    one Maildir per recipient (C{/var/mail/{domain}/{local}}), each created
    when first delivered to; the values pass through L{maildir_component}
    (so no recipient escapes the directory) and the domain is lower-cased.
    Each Maildir gets its own atomic delivery (one per Maildir: recipients
    that share one get one copy) and C{finish()} returns a mapping from each
    recipient to its own outcome, so under LMTP a recipient whose Maildir
    can't be written gets its own 4xx while the others get 250.

    Args:
        path: the Maildir (created with tmp/, new/ and cur/ if missing), or a
            template as above.
        fsync: flush file and directory to disk before answering 250.
        reactor: for the thread pool and the clock; default the global
            reactor.
    """

    spool_threshold = 256 * 1024
    #: pause the client when this many bytes wait for the disk
    max_in_flight = 1024 * 1024
    #: maildir(5): a reader deletes tmp/ files untouched for 36 hours
    stale_tmp_age = 36 * 3600
    #: seconds between sweeps of tmp/ while running
    sweep_interval = 3600.0
    #: at most one log line per this many seconds for each kind of refusal
    log_interval = 10.0

    def __init__(self, path: str, *, fsync: bool = True, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        #: the template with placeholders, or None for one Maildir
        self.template: Optional[str] = None
        if _template_fields(path):
            self.template = os.path.abspath(path)
        self.path = os.path.abspath(path)
        self.fsync = fsync
        self._reactor = reactor
        #: per-recipient Maildirs delivered into since start (swept too)
        self._known_paths: set[str] = set()
        if self.template is None:
            self.make_directories()
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._refusals = _RateLimitedLog(reactor, self.log_interval)
        self._sweeper: Optional[LoopingCall] = None
        # Not now: twistd may still daemonise (a new pid, maybe a new
        # working directory) before the reactor runs.  A test's stand-in
        # reactor may have no callWhenRunning: then start_sweeping() is the
        # caller's to call.
        when_running = getattr(reactor, "callWhenRunning", None)
        if when_running is not None:
            when_running(self.start_sweeping)

    def make_directories(self, path: Optional[str] = None) -> None:
        """Create tmp/, new/ and cur/ (and the Maildir) where missing."""
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path or self.path, sub), exist_ok=True)

    def maildir_for(self, recipient: str) -> str:
        """The Maildir of C{recipient}: the template filled in (or C{path})."""
        if self.template is None:
            return self.path
        local, at, domain = recipient.rpartition("@")
        if not at:
            local, domain = recipient, ""
        domain = domain.lower()
        return self.template.format(
            local=maildir_component(local),
            domain=maildir_component(domain),
            recipient=maildir_component(f"{local}@{domain}" if at else local),
        )

    def unique_name(self) -> str:
        """A Maildir file name unique to this process (maildir(5) style).

        The pid is read each time: a daemonised twistd forks after the
        handler is made, and two processes must never share names.
        """
        now = time.time()
        seconds = int(now)
        micro = int((now - seconds) * 1_000_000)
        pid = os.getpid()
        return f"{seconds}.M{micro}P{pid}Q{next(_DELIVERIES)}.{self._host}"

    def open_message(self, envelope: Envelope) -> Any:
        if self.template is None:
            return _MaildirReceiver(self, envelope, self.path)
        return _PerRecipientReceiver(self, envelope)

    # -- tmp/ clean-up ---------------------------------------------------------

    def start_sweeping(self) -> None:
        """Sweep tmp/ now and every C{sweep_interval} seconds (in a thread)."""
        if self._sweeper is None:
            self._sweeper = LoopingCall(self._sweep_logged)
            self._sweeper.clock = self._reactor
            self._sweeper.start(self.sweep_interval, now=True)

    def stop_sweeping(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None

    def sweep(self) -> Deferred[list[str]]:
        """Remove tmp/ files untouched for C{stale_tmp_age}; their names.

        With a template: in every Maildir delivered into since start.
        """
        cutoff = time.time() - self.stale_tmp_age
        if self.template is None:
            return self._in_thread(self._sweep_blocking, cutoff, self.path)
        paths = sorted(self._known_paths)

        def sweep_each() -> list[str]:
            removed: list[str] = []
            for path in paths:
                removed += self._sweep_blocking(cutoff, path)
            return removed

        return self._in_thread(sweep_each)

    def _sweep_logged(self) -> Deferred[None]:
        def report(removed: list[str]) -> None:
            if removed:
                _log.info(
                    "smtpd: removed {count} stale files from {tmp}",
                    count=len(removed),
                    tmp=os.path.join(self.path, "tmp"),
                )

        # Never let a failure stop the LoopingCall.
        return self.sweep().addCallbacks(report, self._sweep_failed)

    def _sweep_failed(self, failure: Failure) -> None:
        if failure.check(OSError) and failure.value.errno in _UNDERSTOOD:
            self._refusals.error(
                "sweep",
                "smtpd: cannot clean {tmp}: {reason}",
                tmp=os.path.join(self.path, "tmp"),
                reason=_describe(failure.value),
            )
        else:
            _log.failure("smtpd: Maildir tmp/ clean-up failed", failure)

    def _sweep_blocking(self, cutoff: float, path: str) -> list[str]:
        tmp = os.path.join(path, "tmp")
        removed: list[str] = []
        try:
            entries = os.scandir(tmp)
        except FileNotFoundError:
            return removed
        with entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                    # "Untouched": not written, renamed or read since cutoff.
                    touched = max(info.st_mtime, info.st_ctime, info.st_atime)
                    if not stat.S_ISREG(info.st_mode) or touched >= cutoff:
                        continue
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # gone meanwhile
                removed.append(entry.name)
        return removed

    # -- for receivers ---------------------------------------------------------

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        pool = self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, fn, *args)

    def _refused(self, failure: Failure, path: str) -> Failure:
        """A delivery failed before the commit: the client's reply, one log line.

        Disk errors we understand become an L{SMTPError} with a one-line
        log; anything else keeps its traceback (the protocol logs it).
        """
        error = failure.value
        if not isinstance(error, OSError) or error.errno not in _UNDERSTOOD:
            return failure
        self._refusals.error(
            f"refused-{error.errno}",
            "smtpd: Maildir {path} refused a message: {reason}",
            path=path,
            reason=_describe(error),
        )
        reply = (
            R452_INSUFFICIENT_STORAGE
            if error.errno in _STORAGE_FULL
            else R451_LOCAL_ERROR
        )
        refusal = SMTPError(reply)
        refusal.__cause__ = error
        return Failure(refusal)


class _MaildirReceiver:
    """One message on its way into the Maildir."""

    def __init__(
        self,
        maildir: MaildirHandler,
        envelope: Envelope,
        path: str,
        spool_threshold: int = 0,
    ) -> None:
        self._maildir = maildir
        self._path = path
        self._spool_threshold = spool_threshold or maildir.spool_threshold
        self._name = maildir.unique_name()
        self._tmp_path = os.path.join(path, "tmp", self._name)
        self._new_path = os.path.join(path, "new", self._name)
        self._chunks: list[bytes] = [_return_path(envelope), envelope.received_header]
        self._buffered = sum(len(c) for c in self._chunks)
        self._in_flight = 0
        self._file: Any = None
        self._tail: Optional[Deferred[Any]] = None  # the last disk operation
        self._producer: Any = None
        self._paused = False
        #: set in the thread, logged in the reactor thread
        self._recreated = False
        self._directory_sync_error: Optional[OSError] = None

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
        if self._buffered >= self._spool_threshold:
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

    # -- in the thread -----------------------------------------------------------

    def _open_blocking(self) -> Any:
        # Unbuffered: a refused write leaves nothing behind for close() to
        # flush (and fail on) again.
        try:
            return open(self._tmp_path, "xb", buffering=0)
        except FileNotFoundError:
            # Someone removed the Maildir (or its tmp/): make it again.
            self._maildir.make_directories(self._path)
            # A per-recipient Maildir is made on its first delivery: expected.
            self._recreated = self._maildir.template is None
            return open(self._tmp_path, "xb", buffering=0)

    def _write_blocking(self, data: bytes) -> None:
        if self._file is None:
            self._file = self._open_blocking()
        view = memoryview(data)
        while view:
            view = view[self._file.write(view) :]

    def _commit_blocking(self, data: bytes) -> str:
        self._write_blocking(data)
        file = self._file
        if self._maildir.fsync:
            os.fsync(file.fileno())
        self._file = None
        file.close()
        try:
            os.rename(self._tmp_path, self._new_path)
        except FileNotFoundError:
            if not os.path.exists(self._tmp_path):
                raise  # the Maildir went away with our file in it
            self._maildir.make_directories(self._path)
            self._recreated = True
            os.rename(self._tmp_path, self._new_path)
        # Committed: from here on the message is delivered (see the class).
        if self._maildir.fsync:
            try:
                fd = os.open(os.path.dirname(self._new_path), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as error:
                self._directory_sync_error = error
        return self._name

    def _discard_blocking(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # the descriptor is released anyway; the unlink matters
        try:
            os.unlink(self._tmp_path)
        except (FileNotFoundError, NotADirectoryError):
            pass  # never written, or tmp/ itself is broken: nothing to undo

    # -- in the reactor thread ---------------------------------------------------

    def finish(self) -> Deferred[str]:
        data = b"".join(self._chunks)
        self._chunks = []
        done = self._then(self._commit_blocking, data)
        done.addCallbacks(self._committed, self._failed)
        return done

    def _report_recreated(self) -> None:
        if self._recreated:
            self._recreated = False
            _log.warn(
                "smtpd: Maildir {path} was missing tmp/, new/ or cur/: created again",
                path=self._path,
            )

    def _committed(self, name: str) -> str:
        self._report_recreated()
        error = self._directory_sync_error
        if error is not None:
            self._maildir._refusals.error(
                "directory-fsync",
                "smtpd: {name} is in {new} and answered 250, but the fsync of"
                " new/ failed: {reason}; a crash of the machine may lose it",
                name=name,
                new=os.path.dirname(self._new_path),
                reason=_describe(error),
            )
        return name

    def _failed(self, failure: Failure) -> Deferred[Any]:
        """Clean tmp/ up, then answer: a retry must not find our leftovers."""
        self._report_recreated()
        self._tail = None
        cleaned = self._maildir._in_thread(self._discard_blocking)
        cleaned.addErrback(self._cleanup_failed)
        cleaned.addCallback(lambda _: self._maildir._refused(failure, self._path))
        return cleaned

    def _cleanup_failed(self, failure: Failure) -> None:
        if failure.check(OSError) and failure.value.errno in _UNDERSTOOD:
            self._maildir._refusals.error(
                "cleanup",
                "smtpd: cannot remove {tmp}: {reason} (removed later by the sweep)",
                tmp=self._tmp_path,
                reason=_describe(failure.value),
            )
        else:
            _log.failure("smtpd: Maildir clean-up failed", failure)

    def abort(self) -> None:
        self._chunks = []
        if self._tail is None:
            if self._file is None:
                return
            self._tail = succeed(None)
        self._then(self._discard_blocking, always=True).addErrback(self._cleanup_failed)


class _SharedProducer:
    """The connection as seen by the per-recipient receivers of one message.

    It stays paused while any of them asks for a pause, so one Maildir's
    slow disk holds the client back without another one resuming it.
    """

    def __init__(self) -> None:
        self.producer: Any = None
        self._pausing: set[int] = set()

    def pause(self, key: int) -> None:
        if not self._pausing and self.producer is not None:
            self.producer.pauseProducing()
        self._pausing.add(key)

    def resume(self, key: int) -> None:
        if key not in self._pausing:
            return
        self._pausing.discard(key)
        if not self._pausing and self.producer is not None:
            self.producer.resumeProducing()

    def release(self) -> None:
        if self._pausing and self.producer is not None:
            self.producer.resumeProducing()
        self._pausing.clear()
        self.producer = None


class _ProducerFor:
    """One receiver's handle on a L{_SharedProducer}."""

    def __init__(self, shared: _SharedProducer, key: int) -> None:
        self._shared = shared
        self._key = key

    def pauseProducing(self) -> None:
        self._shared.pause(self._key)

    def resumeProducing(self) -> None:
        self._shared.resume(self._key)

    def stopProducing(self) -> None:
        if self._shared.producer is not None:
            self._shared.producer.stopProducing()


class _PerRecipientReceiver:
    """One message into one Maildir per recipient (a template C{--maildir}).

    Every Maildir gets its own L{_MaildirReceiver} (its own tmp -> fsync ->
    rename); C{finish()} fires with a mapping from each recipient to its
    Maildir file name or to the L{SMTPError} its Maildir gave.  It never
    fails as a whole: one full disk refuses only the recipients on it.
    """

    def __init__(self, maildir: MaildirHandler, envelope: Envelope) -> None:
        self._maildir = maildir
        self._recipients: dict[str, list[str]] = {}
        for recipient in envelope.rcpt_tos:
            path = maildir.maildir_for(recipient)
            self._recipients.setdefault(path, [])
            if recipient not in self._recipients[path]:
                self._recipients[path].append(recipient)
        # Together they buffer no more than one Maildir receiver would.
        threshold = max(16 * 1024, maildir.spool_threshold // len(self._recipients))
        self._receivers = {
            path: _MaildirReceiver(maildir, envelope, path, threshold)
            for path in self._recipients
        }
        self._shared = _SharedProducer()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._shared.producer = producer
        for key, receiver in enumerate(self._receivers.values()):
            receiver.registerProducer(_ProducerFor(self._shared, key), streaming)

    def unregisterProducer(self) -> None:
        for receiver in self._receivers.values():
            receiver.unregisterProducer()
        self._shared.release()

    def write(self, data: bytes) -> None:
        for receiver in self._receivers.values():
            receiver.write(data)

    def finish(self) -> Deferred[dict[str, Any]]:
        outcomes: dict[str, Any] = {}
        pending = []
        for path, receiver in self._receivers.items():
            done = receiver.finish()
            done.addCallbacks(
                self._stored,
                self._refused,
                callbackArgs=(path, outcomes),
                errbackArgs=(path, outcomes),
            )
            pending.append(done)
        return gatherResults(pending).addCallback(lambda _: outcomes)

    def _stored(self, name: str, path: str, outcomes: dict[str, Any]) -> None:
        self._maildir._known_paths.add(path)
        for recipient in self._recipients[path]:
            outcomes[recipient] = name

    def _refused(self, failure: Failure, path: str, outcomes: dict[str, Any]) -> None:
        if failure.check(SMTPError):
            refusal = failure.value
        else:
            _log.failure(
                "smtpd: delivery into Maildir {path} failed", failure, path=path
            )
            refusal = SMTPError(R451_LOCAL_ERROR)
        for recipient in self._recipients[path]:
            outcomes[recipient] = refusal

    def abort(self) -> None:
        for receiver in self._receivers.values():
            receiver.abort()
