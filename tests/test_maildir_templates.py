"""One Maildir per recipient: C{--maildir /mail/{domain}/{local}}."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_smtpd.handlers import MaildirHandler, maildir_component
from twisted_smtpd.replies import SMTPError

from .test_handlers import FakeProducer, FakeThreads, make_envelope, results


@pytest.fixture
def threads() -> Any:
    fake = FakeThreads()
    yield fake
    fake.forget_unhandled()


def per_recipient(tmp_path: Path, threads: FakeThreads, template: str) -> Any:
    return MaildirHandler(str(tmp_path / template), fsync=False, reactor=threads)


def deliver(handler: MaildirHandler, threads: FakeThreads, recipients: list[str]):
    envelope = make_envelope()
    envelope.rcpt_tos = list(recipients)
    receiver = handler.open_message(envelope)
    receiver.write(b"Subject: hi\r\n\r\nbody\r\n")
    outcome = results(receiver.finish())
    threads.run_all()
    assert 1 == len(outcome), "finish() did not fire"
    return outcome[0]


def messages(maildir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((maildir / "new").iterdir())]


class TestComponent:
    @pytest.mark.parametrize(
        "value, expected",
        [
            ("alice", "alice"),
            ("Alice.Smith+tag", "Alice.Smith+tag"),
            ("a/b", "a%2Fb"),
            ("..", "%2E."),
            (".", "%2E"),
            (".hidden", "%2Ehidden"),
            ("", "%"),
            ("a\x00b", "a%00b"),
            ("100%", "100%25"),
            ('"john doe"', "%22john%20doe%22"),
            ("a\\b", "a%5Cb"),
            ("jörg", "jörg"),
            ("\udcff", "%FF"),  # an undecodable byte, surrogate-escaped
            ("tab\there", "tab%09here"),
        ],
    )
    def test_mapping(self, value: str, expected: str) -> None:
        """Unsafe characters become %XX; a leading dot too; empty is %."""
        assert expected == maildir_component(value)

    @given(st.text(), st.text())
    def test_one_safe_component_per_value(self, first: str, second: str) -> None:
        """Never a separator, never . or .. or hidden; distinct stays distinct."""
        for value in (first, second):
            name = maildir_component(value)
            assert name and "/" not in name and "\x00" not in name
            assert not name.startswith(".")
        if first != second:
            assert maildir_component(first) != maildir_component(second)


class TestTemplate:
    def test_unknown_placeholder(self, tmp_path: Path, threads: FakeThreads) -> None:
        with pytest.raises(ValueError, match=r"unknown placeholder \{user\}"):
            per_recipient(tmp_path, threads, "{user}")

    def test_nothing_made_at_start(self, tmp_path: Path, threads: FakeThreads) -> None:
        """A template names no Maildir yet: nothing is created up front."""
        per_recipient(tmp_path, threads, "mail/{domain}/{local}")
        assert not (tmp_path / "mail").exists()

    def test_paths(self, tmp_path: Path, threads: FakeThreads) -> None:
        """The domain is lower-cased; the local part keeps its case."""
        handler = per_recipient(tmp_path, threads, "{domain}/{local}:{recipient}")
        assert str(
            tmp_path / "example.net" / "Bob:Bob@example.net"
        ) == handler.maildir_for("Bob@Example.NET")
        assert str(tmp_path / "%" / "postmaster:postmaster") == handler.maildir_for(
            "postmaster"
        )

    def test_one_maildir_each(self, tmp_path: Path, threads: FakeThreads) -> None:
        """Each recipient's Maildir gets one atomic copy; finish() maps each."""
        handler = per_recipient(tmp_path, threads, "{domain}/{local}")
        outcome = deliver(handler, threads, ["alice@example.net", "bob@Example.NET"])
        assert {"alice@example.net", "bob@Example.NET"} == set(outcome)
        for user, recipient in (
            ("alice", "alice@example.net"),
            ("bob", "bob@Example.NET"),
        ):
            maildir = tmp_path / "example.net" / user
            (message,) = messages(maildir)
            assert message.startswith(b"Return-Path: <a@example.org>\r\nReceived: ")
            assert message.endswith(b"Subject: hi\r\n\r\nbody\r\n")
            assert [outcome[recipient]] == os.listdir(maildir / "new")
            assert [] == os.listdir(maildir / "tmp")

    def test_shared_maildir_gets_one_copy(
        self, tmp_path: Path, threads: FakeThreads
    ) -> None:
        """{domain} alone: two recipients there share one delivery."""
        handler = per_recipient(tmp_path, threads, "{domain}")
        outcome = deliver(
            handler,
            threads,
            ["alice@example.net", "bob@example.net", "alice@example.net"],
        )
        (name,) = os.listdir(tmp_path / "example.net" / "new")
        assert {"alice@example.net": name, "bob@example.net": name} == outcome

    def test_unwritable_maildir_refuses_only_its_recipient(
        self, tmp_path: Path, threads: FakeThreads
    ) -> None:
        """bob's Maildir can't be made (a file is in the way): bob gets 451
        4.3.0, alice's copy is stored."""
        handler = per_recipient(tmp_path, threads, "{local}")
        (tmp_path / "bob").write_bytes(b"not a directory")
        outcome = deliver(handler, threads, ["alice@example.net", "bob@example.net"])
        assert isinstance(outcome["bob@example.net"], SMTPError)
        assert (451, "4.3.0") == (
            outcome["bob@example.net"].reply.code,
            outcome["bob@example.net"].reply.enhanced,
        )
        assert [outcome["alice@example.net"]] == os.listdir(tmp_path / "alice" / "new")
        assert b"not a directory" == (tmp_path / "bob").read_bytes()

    def test_no_escape_from_the_base(
        self, tmp_path: Path, threads: FakeThreads
    ) -> None:
        """A local part of ../../x or with a slash stays inside the base."""
        base = tmp_path / "base"
        handler = MaildirHandler(str(base / "{local}"), fsync=False, reactor=threads)
        evil = ["../../escaped@example.net", "a/../../b@example.net", "..@example.net"]
        outcome = deliver(handler, threads, evil)
        assert all(isinstance(name, str) for name in outcome.values())
        assert sorted(os.listdir(base)) == sorted(
            ["%2E.%2F..%2Fescaped", "a%2F..%2F..%2Fb", "%2E."]
        )
        assert ["base"] == os.listdir(tmp_path)

    def test_abort_leaves_nothing(self, tmp_path: Path, threads: FakeThreads) -> None:
        handler = per_recipient(tmp_path, threads, "{local}")
        handler.spool_threshold = 64
        envelope = make_envelope()
        envelope.rcpt_tos = ["alice@example.net", "bob@example.net"]
        receiver = handler.open_message(envelope)
        receiver.write(b"x" * 100_000)
        threads.run_all()
        assert os.listdir(tmp_path / "alice" / "tmp")
        receiver.abort()
        threads.run_all()
        for user in ("alice", "bob"):
            assert [] == os.listdir(tmp_path / user / "tmp")
            assert [] == os.listdir(tmp_path / user / "new")

    def test_back_pressure_until_every_maildir_caught_up(
        self, tmp_path: Path, threads: FakeThreads
    ) -> None:
        """The client is paused while any Maildir is behind, resumed once all
        are: one Maildir draining does not resume it for the other."""
        handler = per_recipient(tmp_path, threads, "{local}")
        handler.spool_threshold = 32
        handler.max_in_flight = 10_000
        envelope = make_envelope()
        envelope.rcpt_tos = ["alice@example.net", "bob@example.net"]
        receiver = handler.open_message(envelope)
        producer = FakeProducer()
        receiver.registerProducer(producer, True)
        receiver.write(b"x" * 40_000)
        assert ["pause"] == producer.calls
        threads.run_one()  # the first Maildir's write is done, not the second's
        assert ["pause"] == producer.calls
        threads.run_all()
        assert ["pause", "resume"] == producer.calls
        receiver.unregisterProducer()
        assert ["pause", "resume"] == producer.calls
        results(receiver.finish())
        threads.run_all()
        assert 1 == len(os.listdir(tmp_path / "bob" / "new"))

    def test_unregister_resumes_a_paused_client(
        self, tmp_path: Path, threads: FakeThreads
    ) -> None:
        handler = per_recipient(tmp_path, threads, "{local}")
        handler.spool_threshold = 32
        handler.max_in_flight = 10_000
        envelope = make_envelope()
        envelope.rcpt_tos = ["alice@example.net", "bob@example.net"]
        receiver = handler.open_message(envelope)
        producer = FakeProducer()
        receiver.registerProducer(producer, True)
        receiver.write(b"x" * 40_000)
        receiver.unregisterProducer()
        assert ["pause", "resume"] == producer.calls
        receiver.abort()
        threads.run_all()

    def test_sweep_covers_delivered_maildirs(
        self, tmp_path: Path, threads: FakeThreads, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Stale tmp/ files go from each per-recipient Maildir delivered to."""
        from twisted_smtpd import handlers

        handler = per_recipient(tmp_path, threads, "{local}")
        deliver(handler, threads, ["alice@example.net"])
        stale = tmp_path / "alice" / "tmp" / "stale"
        stale.write_bytes(b"left by a killed process")
        now = handlers.time.time()
        monkeypatch.setattr(
            handlers.time, "time", lambda: now + handler.stale_tmp_age + 60
        )
        removed = results(handler.sweep())
        threads.run_all()
        assert [["stale"]] == removed
