"""The built-in handlers: discard, in-memory collection and Maildir delivery.

Maildir tests run the disk work through L{FakeThreads}, a reactor and thread
pool in one that runs each job only when the test says so, so every step of
the tmp/ -> new/ dance can be observed deterministically.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from twisted_smtpd import SMTPError, SMTPFactory, handlers
from twisted_smtpd._session import Envelope
from twisted_smtpd.handlers import (
    DiscardHandler,
    MaildirHandler,
    MemoryHandler,
    discard,
)
from twisted_smtpd.testing import FakeClient, connect

RECEIVED = b"Received: from client.example ([192.0.2.1])\r\n\tby mx.test; now\r\n"


def make_envelope(mail_from: str = "a@example.org") -> Envelope:
    """An envelope as the protocol hands it over at DATA, with a fixed trace."""
    envelope = Envelope(
        session_id="S1",
        peer=IPv4Address("TCP", "192.0.2.1", 40000),
        helo="client.example",
        esmtp=True,
        tls=None,
        auth=None,
        mail_from=mail_from,
        rcpt_tos=["b@example.net"],
        message_id="S1-1",
    )
    envelope.received_header = RECEIVED
    return envelope


class FakeThreads(Clock):
    """A reactor and its thread pool: jobs wait in C{jobs} until run.

    Its clock moves only on C{advance()}; C{callWhenRunning} calls wait in
    C{when_running} until C{start()}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.when_running: list[Any] = []
        self.jobs: list[tuple[Any, Any, tuple[Any, ...]]] = []
        self.ran: list[str] = []
        self._deferreds: list[Deferred[Any]] = []

    # the reactor
    def getThreadPool(self) -> FakeThreads:
        return self

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        self.when_running.append((f, args))

    def start(self) -> None:
        """Run what waits for the reactor to start, as reactor.run() would."""
        waiting, self.when_running = self.when_running, []
        for f, args in waiting:
            f(*args)

    def callFromThread(self, f: Any, *args: Any) -> None:
        owner = getattr(f, "__self__", None)
        if isinstance(owner, Deferred):
            self._deferreds.append(owner)
        f(*args)

    # the pool
    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any) -> None:
        self.jobs.append((on_result, f, args))

    def run_one(self) -> None:
        """Run the oldest job, as a worker thread would."""
        on_result, f, args = self.jobs.pop(0)
        self.ran.append(f.__name__)
        try:
            result = f(*args)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def run_all(self) -> None:
        """Run jobs until none is left, including those queued meanwhile."""
        while self.jobs:
            self.run_one()

    def unhandled(self) -> list[Failure]:
        """Failures of thread jobs that nobody has handled (so far)."""
        return [d.result for d in self._deferreds if isinstance(d.result, Failure)]

    def forget_unhandled(self) -> None:
        for deferred in self._deferreds:
            if isinstance(deferred.result, Failure):
                deferred.addErrback(lambda _: None)


class FakeProducer:
    """Records what a consumer asks of its producer."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class FullDisk:
    """C{open} for handlers.py: each file takes C{room} bytes, then ENOSPC.

    Writes are short when the room runs out, as write(2)'s are.  With
    C{close_fails}, close() releases the file and then raises ENOSPC, as a
    buffered file's close() does when its flush is refused again.
    """

    def __init__(self) -> None:
        self.room = 10**9
        self.close_fails = False
        self.files: list[Any] = []

    def __call__(self, path: str, mode: str, buffering: int = -1) -> Any:
        file = open(path, mode, buffering=0)
        self.files.append(file)
        return _LimitedFile(file, self)


class _LimitedFile:
    def __init__(self, file: Any, disk: FullDisk) -> None:
        self._file = file
        self._disk = disk

    def write(self, data: bytes) -> int:
        room = self._disk.room - self._file.tell()
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(data[:room])

    def close(self) -> None:
        self._file.close()
        if self._disk.close_fails:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


@pytest.fixture
def threads() -> Any:
    fake = FakeThreads()
    yield fake
    # Tests that care assert on unhandled(); keep the log free of leftovers.
    fake.forget_unhandled()


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Files the Maildir handler opens fill up after C{full_disk.room} bytes."""
    disk = FullDisk()
    monkeypatch.setattr(handlers, "open", disk, raising=False)
    yield disk
    for file in disk.files:  # a receiver that never cleaned up
        file.close()


@pytest.fixture
def maildir(tmp_path: Path, threads: FakeThreads) -> MaildirHandler:
    return MaildirHandler(str(tmp_path / "Maildir"), fsync=False, reactor=threads)


def listing(handler: MaildirHandler) -> dict[str, list[str]]:
    """The file names in tmp/, new/ and cur/."""
    return {
        sub: sorted(os.listdir(os.path.join(handler.path, sub)))
        for sub in ("tmp", "new", "cur")
    }


def empty() -> dict[str, list[str]]:
    return {"tmp": [], "new": [], "cur": []}


def delivered(handler: MaildirHandler, name: str) -> bytes:
    return Path(handler.path, "new", name).read_bytes()


def break_subdirectory(handler: MaildirHandler, sub: str) -> None:
    """Replace tmp/ or new/ with a regular file (root ignores permissions)."""
    path = os.path.join(handler.path, sub)
    os.rmdir(path)
    Path(path).write_bytes(b"")


def refusal(failure: Any) -> tuple[int, str, type]:
    """(code, enhanced code, cause) of a Maildir refusal: an SMTPError."""
    assert isinstance(failure, Failure) and failure.check(SMTPError), failure
    reply = failure.value.reply
    return reply.code, reply.enhanced, type(failure.value.__cause__)


def results(deferred: Deferred[Any]) -> list[Any]:
    """A list that receives the result of C{deferred} when it fires."""
    seen: list[Any] = []
    deferred.addBoth(seen.append)
    return seen


class TestDiscard:
    def test_accepts_and_drops(self) -> None:
        """discard is a DiscardHandler whose receiver is itself and keeps nothing."""
        assert isinstance(discard, DiscardHandler)
        receiver = discard.open_message(make_envelope())
        assert discard is receiver
        assert None is receiver.write(b"Subject: x\r\n\r\nbody\r\n")
        assert None is receiver.finish()
        assert None is receiver.abort()

    def test_through_the_protocol(self, client_for: Any) -> None:
        """A message to discard gets 250 with the message id as the queue id."""
        client = client_for(discard)
        reply = send_message(client, b"Subject: x\r\n\r\nbody\r\n.\r\n")
        session_id = client.protocol.session.session_id
        assert [f"250 2.0.0 OK: queued as {session_id}-1".encode()] == reply


class TestMemory:
    def test_collects_envelopes(self) -> None:
        """handle_message keeps every envelope in arrival order."""
        memory = MemoryHandler()
        first, second = make_envelope("a@example.org"), make_envelope("")
        memory.handle_message(first)
        memory.handle_message(second)
        assert [first, second] == memory.messages
        assert first is memory.messages[0]

    def test_next_message_waits_for_the_next_one(self) -> None:
        """next_message fires with the next envelope, not one that came earlier."""
        memory = MemoryHandler()
        memory.handle_message(make_envelope("old@example.org"))
        waiting = memory.next_message()
        seen = results(waiting)
        assert [] == seen
        envelope = make_envelope("new@example.org")
        memory.handle_message(envelope)
        assert 1 == len(seen)
        assert envelope is seen[0]

    def test_every_waiter_fires_once(self) -> None:
        """All waiters get the next envelope; a later waiter gets the one after."""
        memory = MemoryHandler()
        first, second = results(memory.next_message()), results(memory.next_message())
        one = make_envelope("one@example.org")
        memory.handle_message(one)
        third = results(memory.next_message())
        two = make_envelope("two@example.org")
        memory.handle_message(two)
        assert ([one], [one], [two]) == (first, second, third)

    def test_through_the_protocol(self, client_for: Any) -> None:
        """The protocol hands MemoryHandler the whole dot-unstuffed message."""
        memory = MemoryHandler()
        client = client_for(memory)
        seen = results(memory.next_message())
        reply = send_message(client, b"Subject: x\r\n\r\n..dot\r\n.\r\n")
        assert reply[0].startswith(b"250 2.0.0 OK: queued as ")
        assert b"Subject: x\r\n\r\n.dot\r\n" == seen[0].content
        assert "a@example.org" == seen[0].mail_from


class TestMaildirLayout:
    def test_creates_subdirectories(self, tmp_path: Path) -> None:
        """A new Maildir gets tmp/, new/ and cur/; an existing one is reused."""
        path = tmp_path / "deep" / "Maildir"
        MaildirHandler(str(path), reactor=FakeThreads())
        MaildirHandler(str(path), reactor=FakeThreads())
        assert ["cur", "new", "tmp"] == sorted(os.listdir(path))

    def test_path_is_absolute(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A relative path is resolved once, against the current directory."""
        monkeypatch.chdir(tmp_path)
        handler = MaildirHandler("Maildir", reactor=FakeThreads())
        assert str(tmp_path / "Maildir") == handler.path

    def test_unique_names(self, maildir: MaildirHandler) -> None:
        """unique_name never repeats, even many times within one microsecond."""
        names = [maildir.unique_name() for _ in range(20_000)]
        assert len(names) == len(set(names))
        assert all("/" not in name for name in names)

    def test_unique_name_escapes_hostname(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A / or : in the host name is escaped as maildir(5) asks."""
        monkeypatch.setattr(handlers.socket, "gethostname", lambda: "a/b:c")
        handler = MaildirHandler(str(tmp_path / "M"), reactor=FakeThreads())
        name = handler.unique_name()
        assert name.endswith(".a\\057b\\072c")
        assert re.search(rf"P{os.getpid()}Q[0-9]+\.", name)


class TestMaildirSmallMessage:
    def test_finish_fires_after_the_file_is_in_new(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """finish() fires with the file name only once the file is in new/."""
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"Subject: hi\r\n\r\n")
        receiver.write(b"body\r\n")
        done = receiver.finish()
        in_new_when_fired: list[bool] = []

        def check(name: str) -> str:
            path = os.path.join(maildir.path, "new", name)
            in_new_when_fired.append(os.path.exists(path))
            return name

        done.addCallback(check)
        seen = results(done)
        assert ([], empty()) == (seen, listing(maildir))
        threads.run_all()
        assert ["_commit_blocking"] == threads.ran
        assert [True] == in_new_when_fired
        name = seen[0]
        assert {"tmp": [], "new": [name], "cur": []} == listing(maildir)
        assert (
            b"Return-Path: <a@example.org>\r\n"
            + RECEIVED
            + b"Subject: hi\r\n\r\nbody\r\n"
        ) == delivered(maildir, name)

    def test_null_sender(self, maildir: MaildirHandler, threads: FakeThreads) -> None:
        """The null reverse-path becomes Return-Path: <>."""
        receiver = maildir.open_message(make_envelope(""))
        receiver.write(b"bounce\r\n")
        seen = results(receiver.finish())
        threads.run_all()
        assert b"Return-Path: <>\r\n" + RECEIVED + b"bounce\r\n" == delivered(
            maildir, seen[0]
        )

    def test_with_fsync(self, tmp_path: Path, threads: FakeThreads) -> None:
        """With fsync on (the default) delivery works the same."""
        handler = MaildirHandler(str(tmp_path / "M"), reactor=threads)
        assert True is handler.fsync
        receiver = handler.open_message(make_envelope())
        receiver.write(b"x\r\n")
        seen = results(receiver.finish())
        threads.run_all()
        assert {"tmp": [], "new": seen, "cur": []} == listing(handler)

    def test_each_message_its_own_file(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """Two messages become two files with their own contents."""
        names = []
        for body in (b"one\r\n", b"two\r\n"):
            receiver = maildir.open_message(make_envelope())
            receiver.write(body)
            names.append(results(receiver.finish()))
        threads.run_all()
        (first,), (second,) = names
        assert first != second
        assert delivered(maildir, first).endswith(RECEIVED + b"one\r\n")
        assert delivered(maildir, second).endswith(RECEIVED + b"two\r\n")

    def test_empty_message(self, maildir: MaildirHandler, threads: FakeThreads) -> None:
        """An empty body still yields the Return-Path and Received lines."""
        receiver = maildir.open_message(make_envelope())
        seen = results(receiver.finish())
        threads.run_all()
        assert b"Return-Path: <a@example.org>\r\n" + RECEIVED == delivered(
            maildir, seen[0]
        )

    def test_abort_before_spooling(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """Aborting a message that never reached the disk touches nothing."""
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"small\r\n")
        receiver.abort()
        threads.run_all()
        assert ([], empty()) == (threads.ran, listing(maildir))


def spooling(handler: MaildirHandler, threshold: int = 64, in_flight: int = 10**9):
    handler.spool_threshold = threshold
    handler.max_in_flight = in_flight
    return handler


class TestMaildirSpooling:
    def test_small_writes_stay_in_memory(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """Below spool_threshold nothing goes to a thread."""
        spooling(maildir, threshold=len(RECEIVED) + 200)
        receiver = maildir.open_message(make_envelope())
        for _ in range(10):
            receiver.write(b"0123456789")
        assert ([], empty()) == (threads.jobs, listing(maildir))

    def test_big_message_written_in_pieces(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """A message over the threshold goes to tmp/ in thread writes, in order."""
        spooling(maildir, threshold=64)
        receiver = maildir.open_message(make_envelope())
        pieces = [bytes([65 + i]) * 100 + b"\r\n" for i in range(5)]
        receiver.write(pieces[0])
        assert 1 == len(threads.jobs)
        threads.run_one()
        assert 1 == len(listing(maildir)["tmp"])
        for piece in pieces[1:]:
            receiver.write(piece)
        receiver.write(b"tail\r\n")  # below the threshold: waits for finish
        seen = results(receiver.finish())
        assert [] == seen
        threads.run_all()
        assert ["_write_blocking"] * 5 + ["_commit_blocking"] == threads.ran
        assert {"tmp": [], "new": seen, "cur": []} == listing(maildir)
        assert (
            b"Return-Path: <a@example.org>\r\n"
            + RECEIVED
            + b"".join(pieces)
            + b"tail\r\n"
        ) == delivered(maildir, seen[0])

    def test_nothing_in_new_while_writes_are_pending(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """finish() waits for every earlier write before the rename."""
        spooling(maildir, threshold=64)
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"x" * 100)
        receiver.write(b"y" * 100)
        seen = results(receiver.finish())
        threads.run_one()
        threads.run_one()
        assert ([], []) == (seen, listing(maildir)["new"])
        threads.run_one()
        assert ([], ["_write_blocking"] * 2 + ["_commit_blocking"]) == (
            threads.jobs,
            threads.ran,
        )
        assert listing(maildir)["new"] == seen

    def test_producer_paused_while_in_flight(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """Over max_in_flight the producer is paused once, and resumed when done."""
        spooling(maildir, threshold=1, in_flight=300)
        receiver = maildir.open_message(make_envelope())
        producer = FakeProducer()
        receiver.registerProducer(producer, True)
        receiver.write(b"a" * 10)
        assert [] == producer.calls  # headers + 10 bytes: under the limit
        receiver.write(b"b" * 400)
        assert ["pause"] == producer.calls
        receiver.write(b"c" * 400)  # data already on its way: no second pause
        assert ["pause"] == producer.calls
        threads.run_one()
        threads.run_one()
        assert ["pause"] == producer.calls  # 400 bytes still waiting
        threads.run_all()
        assert ["pause", "resume"] == producer.calls
        receiver.write(b"d" * 400)
        assert ["pause", "resume", "pause"] == producer.calls
        threads.run_all()
        assert ["pause", "resume", "pause", "resume"] == producer.calls
        receiver.abort()
        threads.run_all()
        assert empty() == listing(maildir)

    def test_unregister_resumes_a_paused_producer(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """unregisterProducer resumes a paused producer, and only once."""
        spooling(maildir, threshold=1, in_flight=10)
        receiver = maildir.open_message(make_envelope())
        producer = FakeProducer()
        receiver.registerProducer(producer, True)
        receiver.write(b"x" * 100)
        receiver.unregisterProducer()
        assert ["pause", "resume"] == producer.calls
        threads.run_all()
        assert ["pause", "resume"] == producer.calls
        receiver.abort()
        threads.run_all()

    def test_unregister_leaves_a_running_producer_alone(
        self, maildir: MaildirHandler
    ) -> None:
        """unregisterProducer does not resume a producer that was never paused."""
        receiver = maildir.open_message(make_envelope())
        producer = FakeProducer()
        receiver.registerProducer(producer, True)
        receiver.write(b"x")
        receiver.unregisterProducer()
        assert [] == producer.calls

    def test_abort_after_spooling(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """abort() removes the partly written tmp file; nothing reaches new/."""
        spooling(maildir, threshold=64)
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"x" * 100)
        threads.run_all()
        assert 1 == len(listing(maildir)["tmp"])
        receiver.abort()
        threads.run_all()
        assert ["_write_blocking", "_discard_blocking"] == threads.ran
        assert (empty(), []) == (listing(maildir), threads.unhandled())

    def test_abort_while_a_write_is_pending(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """abort() during a thread write cleans up after that write."""
        spooling(maildir, threshold=64)
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"x" * 100)
        receiver.abort()
        threads.run_all()
        assert ["_write_blocking", "_discard_blocking"] == threads.ran
        assert empty() == listing(maildir)

    @pytest_twisted.inlineCallbacks
    def test_real_threads(self, tmp_path: Path) -> Any:
        """With the real reactor and thread pool a big message is delivered whole."""
        handler = spooling(MaildirHandler(str(tmp_path / "M")), threshold=4096)
        receiver = handler.open_message(make_envelope())
        body = b"".join(b"%06d " % i + b"z" * 73 + b"\r\n" for i in range(1000))
        for start in range(0, len(body), 1000):
            receiver.write(body[start : start + 1000])
        name = yield receiver.finish()
        assert {"tmp": [], "new": [name], "cur": []} == listing(handler)
        assert b"Return-Path: <a@example.org>\r\n" + RECEIVED + body == delivered(
            handler, name
        )


class TestMaildirFailures:
    def test_tmp_not_a_directory(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """If tmp/ cannot hold files, finish() fails and new/ stays empty."""
        break_subdirectory(maildir, "tmp")
        receiver = maildir.open_message(make_envelope(""))
        receiver.write(b"x\r\n")
        seen = results(receiver.finish())
        threads.run_all()
        assert 1 == len(seen)
        assert (451, "4.3.0", NotADirectoryError) == refusal(seen[0])
        assert [] == os.listdir(os.path.join(maildir.path, "new"))

    def test_tmp_not_a_directory_while_spooling(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """A failed spool write makes finish() fail without touching the disk."""
        spooling(maildir, threshold=64)
        break_subdirectory(maildir, "tmp")
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"x" * 100)
        receiver.write(b"y" * 100)
        seen = results(receiver.finish())
        threads.run_all()
        assert (451, "4.3.0", NotADirectoryError) == refusal(seen[0])
        assert ["_write_blocking"] == threads.ran[:1]
        assert "_commit_blocking" not in threads.ran
        assert [] == os.listdir(os.path.join(maildir.path, "new"))

    def test_rename_fails(self, maildir: MaildirHandler, threads: FakeThreads) -> None:
        """If the rename into new/ fails, finish() fails and tmp/ is cleaned up."""
        break_subdirectory(maildir, "new")
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"x\r\n")
        seen = results(receiver.finish())
        threads.run_all()
        assert (451, "4.3.0", NotADirectoryError) == refusal(seen[0])
        assert ["_commit_blocking", "_discard_blocking"] == threads.ran
        assert ([], []) == (
            os.listdir(os.path.join(maildir.path, "tmp")),
            threads.unhandled(),
        )

    def test_disk_full_while_spooling(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        full_disk: FullDisk,
    ) -> None:
        """ENOSPC on a spool write fails finish() and leaves tmp/ and new/ empty."""
        full_disk.room = 500
        spooling(maildir, threshold=64)
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"x" * 300)
        threads.run_all()
        receiver.write(b"y" * 300)
        receiver.write(b"z" * 300)
        seen = results(receiver.finish())
        threads.run_all()
        assert (452, "4.3.1", OSError) == refusal(seen[0])
        assert errno.ENOSPC == seen[0].value.__cause__.errno
        assert (empty(), []) == (listing(maildir), threads.unhandled())

    def test_cleanup_after_failure_is_quiet(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """The tmp/ cleanup after a failed delivery leaves no unhandled error."""
        break_subdirectory(maildir, "tmp")
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"x\r\n")
        results(receiver.finish())
        threads.run_all()
        assert [] == threads.unhandled()

    def test_abort_after_a_failed_write(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        full_disk: FullDisk,
    ) -> None:
        """abort() after a failed spool write still removes the tmp file."""
        full_disk.room = 500
        spooling(maildir, threshold=64)
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"x" * 300)
        threads.run_all()
        receiver.write(b"y" * 300)  # does not fit
        threads.run_all()
        receiver.abort()
        threads.run_all()
        assert empty() == listing(maildir)

    def test_failed_write_resumes_the_producer(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        full_disk: FullDisk,
    ) -> None:
        """A paused producer is resumed when the write it waits for fails."""
        full_disk.room = 100
        spooling(maildir, threshold=1, in_flight=50)
        receiver = maildir.open_message(make_envelope())
        producer = FakeProducer()
        receiver.registerProducer(producer, True)
        receiver.write(b"x" * 300)
        threads.run_all()
        assert ["pause", "resume"] == producer.calls


@pytest.fixture
def logged() -> Any:
    """The log events emitted during the test."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def lines(events: list[dict[str, Any]], text: str) -> list[str]:
    """The formatted log lines containing C{text}."""
    from twisted.logger import formatEvent

    return [line for line in map(formatEvent, events) if text in line]


def fail_directory_fsync(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os.fsync fails with EIO on directories; returns the fds it refused."""
    real_fsync = os.fsync
    refused: list[int] = []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            refused.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return refused


def fail_file_fsync(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os.fsync fails with EIO on regular files; returns the fds it refused."""
    real_fsync = os.fsync
    refused: list[int] = []

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            refused.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return refused


def deliver(handler: MaildirHandler, threads: FakeThreads, body: bytes) -> Any:
    """One message through C{handler}: the result of finish()."""
    receiver = handler.open_message(make_envelope())
    receiver.write(body)
    seen = results(receiver.finish())
    threads.run_all()
    assert 1 == len(seen)
    return seen[0]


class TestMaildirFullDisk:
    def test_cleanup_survives_a_failing_close(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        full_disk: FullDisk,
    ) -> None:
        """A refused message leaves no file in tmp/ even when close() raises too.

        Before: the clean-up's close() raised ENOSPC again and the unlink
        never ran, so every refusal left an empty file (and took an inode).
        """
        full_disk.room = 0
        full_disk.close_fails = True
        for _ in range(3):
            assert (452, "4.3.1", OSError) == refusal(
                deliver(maildir, threads, b"x" * 100)
            )
        assert (empty(), []) == (listing(maildir), threads.unhandled())
        assert all(file.closed for file in full_disk.files)
        full_disk.room = 10**9
        full_disk.close_fails = False
        name = deliver(maildir, threads, b"back\r\n")
        assert {"tmp": [], "new": [name], "cur": []} == listing(maildir)

    def test_abort_survives_a_failing_close(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        full_disk: FullDisk,
    ) -> None:
        """abort() after a refused spool write unlinks although close() raises."""
        full_disk.room = 100
        full_disk.close_fails = True
        spooling(maildir, threshold=64)
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"x" * 300)
        threads.run_all()
        receiver.abort()
        threads.run_all()
        assert empty() == listing(maildir)

    def test_the_reply_waits_for_the_cleanup(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        full_disk: FullDisk,
    ) -> None:
        """finish() fails only after tmp/ is clean, so a retry finds room."""
        full_disk.room = 10
        receiver = maildir.open_message(make_envelope())
        seen = results(receiver.finish())
        threads.run_one()  # the commit fails
        assert ([], 1) == (seen, len(listing(maildir)["tmp"]))
        threads.run_one()  # the clean-up
        assert (452, "4.3.1", OSError) == refusal(seen[0])
        assert empty() == listing(maildir)

    def test_one_line_per_refusal_rate_limited(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        full_disk: FullDisk,
        logged: list[dict[str, Any]],
    ) -> None:
        """A full disk logs one line with the errno per log_interval, no traceback."""
        full_disk.room = 0
        for _ in range(5):
            refusal(deliver(maildir, threads, b"x"))
        threads.advance(maildir.log_interval)
        refusal(deliver(maildir, threads, b"x"))
        refused = lines(logged, "refused a message")
        assert [
            f"smtpd: Maildir {maildir.path} refused a message:"
            " ENOSPC (No space left on device)",
            f"smtpd: Maildir {maildir.path} refused a message:"
            " ENOSPC (No space left on device) (4 more since the last report)",
        ] == refused
        assert [] == [event for event in logged if "log_failure" in event]

    def test_through_the_protocol(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        full_disk: FullDisk,
        client_for: Any,
        logged: list[dict[str, Any]],
    ) -> None:
        """The client gets 452 4.3.1, the session goes on, no traceback is logged."""
        full_disk.room = 0
        client = client_for(maildir)
        send_message(client, b"x\r\n.\r\n")
        threads.run_all()
        assert [b"452 4.3.1 Insufficient system storage"] == client.replies()
        assert [] == [event for event in logged if "log_failure" in event]
        full_disk.room = 10**9
        send_message(client, b"y\r\n.\r\n")
        threads.run_all()
        (name,) = listing(maildir)["new"]
        assert [f"250 2.0.0 OK: queued as {name}".encode()] == client.replies()

    def test_errors_we_do_not_understand_keep_their_traceback(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        monkeypatch: pytest.MonkeyPatch,
        client_for: Any,
        logged: list[dict[str, Any]],
    ) -> None:
        """A bug (not a disk error) is answered 451 and logged with its traceback."""

        def broken(path: str, mode: str, buffering: int = -1) -> Any:
            raise ZeroDivisionError("a bug")

        monkeypatch.setattr(handlers, "open", broken, raising=False)
        client = client_for(maildir)
        send_message(client, b"x\r\n.\r\n")
        threads.run_all()
        assert [b"451 4.3.0 Requested action aborted: local error"] == client.replies()
        failures = [event["log_failure"] for event in logged if "log_failure" in event]
        assert 1 == len(failures) and failures[0].check(ZeroDivisionError)
        assert [] == lines(logged, "refused a message")


class TestMaildirFsyncFailures:
    def test_failed_directory_fsync_still_answers_250(
        self,
        tmp_path: Path,
        threads: FakeThreads,
        monkeypatch: pytest.MonkeyPatch,
        logged: list[dict[str, Any]],
    ) -> None:
        """The rename commits: a failed fsync of new/ is logged, not refused.

        Before: 451 for a message already in new/, so every retry stored
        one more copy.
        """
        handler = MaildirHandler(str(tmp_path / "M"), reactor=threads)
        refused = fail_directory_fsync(monkeypatch)
        name = deliver(handler, threads, b"stored\r\n")
        assert isinstance(name, str) and 1 == len(refused)
        assert {"tmp": [], "new": [name], "cur": []} == listing(handler)
        (line,) = lines(logged, "fsync of new/ failed")
        assert name in line and "EIO" in line and "answered 250" in line

    def test_failed_directory_fsync_through_the_protocol(
        self,
        tmp_path: Path,
        threads: FakeThreads,
        monkeypatch: pytest.MonkeyPatch,
        client_for: Any,
    ) -> None:
        """Three messages, three 250s, three files: no duplicate from a retry."""
        handler = MaildirHandler(str(tmp_path / "M"), reactor=threads)
        fail_directory_fsync(monkeypatch)
        client = client_for(handler)
        replies = []
        for n in range(3):
            send_message(client, f"n={n}\r\n.\r\n".encode())
            threads.run_all()
            replies.extend(client.replies())
        names = listing(handler)["new"]
        assert 3 == len(names)
        assert sorted(f"250 2.0.0 OK: queued as {n}".encode() for n in names) == sorted(
            replies
        )

    def test_failed_file_fsync_is_refused_and_cleaned(
        self,
        tmp_path: Path,
        threads: FakeThreads,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Before the rename nothing is committed: 451, and tmp/ is cleaned."""
        handler = MaildirHandler(str(tmp_path / "M"), reactor=threads)
        refused = fail_file_fsync(monkeypatch)
        assert (451, "4.3.0", OSError) == refusal(deliver(handler, threads, b"x"))
        assert 1 == len(refused)
        assert empty() == listing(handler)

    @pytest_twisted.inlineCallbacks
    def test_real_threads(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
        """In the reactor's own thread pool: 250 after a failed fsync of new/."""
        handler = MaildirHandler(str(tmp_path / "M"))
        refused = fail_directory_fsync(monkeypatch)
        receiver = handler.open_message(make_envelope())
        receiver.write(b"threaded\r\n")
        name = yield receiver.finish()
        assert 1 == len(refused)
        assert {"tmp": [], "new": [name], "cur": []} == listing(handler)
        fail_file_fsync(monkeypatch)
        receiver = handler.open_message(make_envelope())
        receiver.write(b"refused\r\n")
        with pytest.raises(SMTPError):
            yield receiver.finish()
        assert {"tmp": [], "new": [name], "cur": []} == listing(handler)


class TestMaildirRecreated:
    @pytest.mark.parametrize("removed", ["Maildir", "tmp", "new"])
    def test_missing_directories_are_made_again(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        logged: list[dict[str, Any]],
        removed: str,
    ) -> None:
        """A deleted Maildir (or tmp/ or new/) is created again on delivery.

        Before: 451 for every message until someone made it by hand.
        """
        shutil.rmtree(
            maildir.path
            if removed == "Maildir"
            else os.path.join(maildir.path, removed)
        )
        name = deliver(maildir, threads, b"x\r\n")
        assert isinstance(name, str), name
        assert {"tmp": [], "new": [name], "cur": []} == listing(maildir)
        assert 1 == len(lines(logged, "created again"))

    def test_maildir_removed_mid_message(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """A Maildir removed with our tmp/ file in it: 451, then the retry is 250."""
        spooling(maildir, threshold=64)
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"x" * 100)
        threads.run_all()
        shutil.rmtree(maildir.path)
        seen = results(receiver.finish())
        threads.run_all()
        assert (451, "4.3.0", FileNotFoundError) == refusal(seen[0])
        name = deliver(maildir, threads, b"again\r\n")
        assert {"tmp": [], "new": [name], "cur": []} == listing(maildir)


class TestMaildirSweep:
    def make_stale(self, maildir: MaildirHandler, name: str) -> Path:
        path = Path(maildir.path, "tmp", name)
        path.write_bytes(b"left by a killed process")
        return path

    def later(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        """Move the wall clock the sweep reads C{seconds} ahead."""
        now = time.time()
        monkeypatch.setattr(handlers.time, "time", lambda: now + seconds)

    def test_at_start_up_and_periodically(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        monkeypatch: pytest.MonkeyPatch,
        logged: list[dict[str, Any]],
    ) -> None:
        """Once the reactor runs tmp/ is swept, then every sweep_interval.

        Before: leftovers of a SIGKILL stayed in tmp/ for ever.
        """
        self.make_stale(maildir, "old")
        self.later(monkeypatch, maildir.stale_tmp_age + 60)
        assert [] == threads.jobs  # not while twistd may still daemonise
        threads.start()
        assert ["_sweep_blocking"] == [f.__name__ for _, f, _ in threads.jobs]
        threads.run_all()
        assert empty() == listing(maildir)
        assert 1 == len(lines(logged, "removed 1 stale files from"))
        self.make_stale(maildir, "older")
        threads.advance(maildir.sweep_interval - 1)
        assert [] == threads.jobs
        threads.advance(1)
        threads.run_all()
        assert empty() == listing(maildir)
        maildir.stop_sweeping()
        threads.advance(maildir.sweep_interval)
        assert [] == threads.jobs

    def test_recent_and_other_files_are_kept(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Only regular files untouched for stale_tmp_age go; in-flight ones stay."""
        self.make_stale(maildir, "stale")
        touched = self.make_stale(maildir, "touched")
        os.mkdir(os.path.join(maildir.path, "tmp", "a-directory"))
        in_new = Path(maildir.path, "new", "delivered")
        in_new.write_bytes(b"mail")
        future = time.time() + maildir.stale_tmp_age
        os.utime(touched, (future, future))
        self.later(monkeypatch, maildir.stale_tmp_age + 60)
        removed = results(maildir.sweep())
        threads.run_all()
        assert [["stale"]] == removed
        assert ["a-directory", "touched"] == listing(maildir)["tmp"]
        assert in_new.exists()

    def test_a_message_in_flight_survives(
        self, maildir: MaildirHandler, threads: FakeThreads
    ) -> None:
        """A sweep while a big message is being spooled leaves it alone."""
        spooling(maildir, threshold=64)
        receiver = maildir.open_message(make_envelope())
        receiver.write(b"x" * 100)
        threads.run_all()
        removed = results(maildir.sweep())
        threads.run_all()
        assert [[]] == removed
        name = results(receiver.finish())
        threads.run_all()
        assert {"tmp": [], "new": name, "cur": []} == listing(maildir)

    def test_a_failing_sweep_keeps_sweeping(
        self,
        maildir: MaildirHandler,
        threads: FakeThreads,
        logged: list[dict[str, Any]],
    ) -> None:
        """tmp/ unreadable: one line, and the next sweep still runs."""
        break_subdirectory(maildir, "tmp")
        threads.start()
        threads.run_all()
        (line,) = lines(logged, "cannot clean")
        assert "ENOTDIR" in line
        threads.advance(maildir.sweep_interval)
        assert ["_sweep_blocking"] == [f.__name__ for _, f, _ in threads.jobs]
        threads.run_all()
        assert [] == [event for event in logged if "log_failure" in event]


class TestMaildirNames:
    def test_pid_at_write_time(
        self, maildir: MaildirHandler, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A handler made before twistd daemonises names files with the new pid."""
        monkeypatch.setattr(handlers.os, "getpid", lambda: 424242)
        assert "P424242Q" in maildir.unique_name()


@pytest.fixture
def client_for(clock: Clock) -> Any:
    """C{client_for(handler)}: a greeted, EHLO'd client of a factory for it."""

    def make(handler: Any) -> FakeClient:
        client = connect(SMTPFactory(handler, hostname="mx.test", reactor=clock))
        client.replies()
        client.command(b"EHLO client.example")
        return client

    return make


def send_message(client: FakeClient, data: bytes, sender: bytes = b"a@example.org"):
    """MAIL, RCPT, DATA, then C{data}; the replies to C{data}."""
    assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<" + sender + b">")
    assert [b"250 2.1.5 Recipient OK"] == client.command(b"RCPT TO:<b@example.net>")
    assert [b"354 End data with <CR><LF>.<CR><LF>"] == client.command(b"DATA")
    client.send(data)
    return client.replies()


class TestMaildirThroughProtocol:
    def test_250_only_after_the_file_is_in_new(
        self, maildir: MaildirHandler, threads: FakeThreads, client_for: Any
    ) -> None:
        """DATA is answered once the file is in new/; pipelined commands wait."""
        client = client_for(maildir)
        assert [] == send_message(client, b"Subject: s\r\n\r\n..dots\r\n.\r\nNOOP\r\n")
        assert ["_commit_blocking"] == [f.__name__ for _, f, _ in threads.jobs]
        assert empty() == listing(maildir)
        threads.run_all()
        (name,) = listing(maildir)["new"]
        assert [
            f"250 2.0.0 OK: queued as {name}".encode(),
            b"250 2.0.0 OK",
        ] == client.replies()
        content = delivered(maildir, name)
        assert content.startswith(
            b"Return-Path: <a@example.org>\r\n"
            b"Received: from client.example ([192.0.2.1])\r\n"
        )
        assert content.endswith(b"\r\nSubject: s\r\n\r\n.dots\r\n")
        assert [] == listing(maildir)["tmp"]

    def test_null_sender(
        self, maildir: MaildirHandler, threads: FakeThreads, client_for: Any
    ) -> None:
        """A bounce (MAIL FROM:<>) is stored with Return-Path: <>."""
        client = client_for(maildir)
        send_message(client, b"x\r\n.\r\n", sender=b"")
        threads.run_all()
        (name,) = listing(maildir)["new"]
        assert delivered(maildir, name).startswith(b"Return-Path: <>\r\nReceived: ")

    def test_failing_maildir_gives_451(
        self, maildir: MaildirHandler, threads: FakeThreads, client_for: Any
    ) -> None:
        """A delivery that cannot be written is answered 451 4.3.0, no file kept."""
        client = client_for(maildir)
        break_subdirectory(maildir, "tmp")
        assert [] == send_message(client, b"x\r\n.\r\n")
        threads.run_all()
        assert [b"451 4.3.0 Requested action aborted: local error"] == client.replies()
        assert [] == os.listdir(os.path.join(maildir.path, "new"))
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")

    def test_big_message_pauses_the_connection(
        self, maildir: MaildirHandler, threads: FakeThreads, client_for: Any
    ) -> None:
        """While spooled data waits for the disk the transport is paused."""
        spooling(maildir, threshold=256, in_flight=1000)
        client = client_for(maildir)
        line = b"y" * 998 + b"\r\n"
        assert [] == send_message(client, line * 3)
        assert "paused" == client.transport.producerState
        threads.run_all()
        assert "producing" == client.transport.producerState
        client.send(b".\r\n")
        threads.run_all()
        (name,) = listing(maildir)["new"]
        assert [f"250 2.0.0 OK: queued as {name}".encode()] == client.replies()
        assert delivered(maildir, name).endswith(b"\r\n" + line * 3)

    def test_connection_lost_mid_message(
        self, maildir: MaildirHandler, threads: FakeThreads, client_for: Any
    ) -> None:
        """A client that disconnects during DATA leaves no file behind."""
        spooling(maildir, threshold=256)
        client = client_for(maildir)
        send_message(client, b"z" * 2000 + b"\r\n")
        client.protocol.connectionLost(Failure(ConnectionDone()))
        threads.run_all()
        assert "_discard_blocking" == threads.ran[-1]
        assert empty() == listing(maildir)


class HangingRecipientCheck(MemoryHandler):
    """check_recipient waits on an outside service that never answers."""

    def __init__(self, clock: Clock, timeout: Any = None) -> None:
        super().__init__()
        self.clock = clock
        self.timeout = timeout
        self.pending: list[Deferred[None]] = []

    def check_recipient(self, envelope: Any, address: str, options: Any) -> Any:
        lookup: Deferred[None] = Deferred()
        self.pending.append(lookup)
        if self.timeout is not None:
            lookup.addTimeout(self.timeout, self.clock)
        return lookup


class TestHungHooks:
    """docs/handlers.rst, "Testing your handler": what a hook that hangs does."""

    def test_a_hook_that_never_fires_is_cut_off(self, clock: Clock) -> None:
        """The idle timer waits, the hook deadline does not: at
        handler_timeout the hook is cancelled, 451, and the session goes on."""
        handler = HangingRecipientCheck(clock)
        client = connect(SMTPFactory(handler, hostname="mx.test", reactor=clock))
        client.replies()
        client.command(b"EHLO client.example")
        client.command(b"MAIL FROM:<a@example.org>")
        assert [] == client.command(b"RCPT TO:<b@example.net>")
        clock.advance(client.protocol.factory.limits.handler_timeout - 1)
        assert ([], False) == (client.replies(), client.closed)
        clock.advance(1)
        assert [
            b"451 4.3.0 Requested action aborted: handler timed out"
        ] == client.replies()
        assert handler.pending[0].called  # cancelled
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")

    def test_a_hook_with_its_own_timeout_gets_451(self, clock: Clock) -> None:
        """The documented remedy: addTimeout -> 451 4.3.0, the session goes on."""
        handler = HangingRecipientCheck(clock, timeout=30)
        client = connect(SMTPFactory(handler, hostname="mx.test", reactor=clock))
        client.replies()
        client.command(b"EHLO client.example")
        client.command(b"MAIL FROM:<a@example.org>")
        assert [] == client.command(b"RCPT TO:<b@example.net>")
        clock.advance(30)
        assert [b"451 4.3.0 Requested action aborted: local error"] == client.replies()
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")
