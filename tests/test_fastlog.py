"""twisted_smtpd.fastlog: the same lines as twistd's text observer, cheaper."""

from __future__ import annotations

import io
import signal
import smtplib
import subprocess
import sys

from twisted.internet.task import Clock
from twisted.logger import (
    LogLevel,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.failure import Failure

from twisted_smtpd import SMTPFactory
from twisted_smtpd.fastlog import FastLogObserver, observer
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.testing import connect

from .helpers import ROOT, free_port, twistd_env, wait_for_port


def _session_events(factory: SMTPFactory, mail: bool = True) -> list[dict]:
    """The protocol's events for one session (one message if C{mail})."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client = connect(factory)
        if mail:
            client.command(b"EHLO c.example")
            client.command(b"MAIL FROM:<a@example.org>")
            client.command(b"RCPT TO:<b@example.org>")
            client.command(b"DATA")
            client.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
        client.command(b"QUIT")
        client.protocol.connectionLost(None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [e for e in events if e.get("log_namespace") == "twisted_smtpd.protocol"]


def _written(events: list[dict]) -> str:
    out = io.StringIO()
    fast = FastLogObserver(out)
    for event in events:
        fast(event)
    return out.getvalue()


def _classic(events: list[dict]) -> str:
    return "".join(formatEventAsClassicLogText(e) or "" for e in events)


def _factory(**options) -> SMTPFactory:
    return SMTPFactory(MemoryHandler(), hostname="mx.test", reactor=Clock(), **options)


def test_message_line_is_twistds_line() -> None:
    """The per-message line is exactly what twistd's text observer writes."""
    events = _session_events(_factory())
    text = _written(events)
    assert text == _classic(events)
    assert 1 == text.count("\n")
    assert "[twisted_smtpd.protocol#info] smtpd " in text
    assert "from <a@example.org> (192.0.2.1:40000) to 1 recipients" in text
    assert text.rstrip("\n").endswith("bytes: accepted")


def test_session_line_is_twistds_line() -> None:
    """A session without mail: its one line, the same as twistd's."""
    events = _session_events(_factory(), mail=False)
    text = _written(events)
    assert text == _classic(events)
    assert "closed after 0 messages" in text


def test_fields_stay_in_the_event() -> None:
    """Other observers still get every structured field of the message event."""
    events = _session_events(_factory())
    [message] = [e for e in events if "outcome" in e]
    _written(events)
    assert "{summary}" == message["log_format"]
    assert "a@example.org" == message["mail_from"]
    assert "192.0.2.1:40000" == message["peer"]
    assert 1 == message["rcpt_count"]
    assert "accepted" == message["outcome"]
    assert message["summary"] in _written([message])


def test_quiet_writes_nothing_for_accepted_mail() -> None:
    """--quiet still means no line per session or accepted message."""
    assert "" == _written(_session_events(_factory(quiet=True)))


def test_debug_wire_lines_are_twistds_lines() -> None:
    """--debug's wire log (formatted events) goes through twistd's formatter."""
    events = _session_events(_factory(debug=True))
    text = _written(events)
    assert text == _classic(events)
    assert "<<< b'MAIL FROM:<a@example.org>'" in text
    assert ">>> b'250 2.1.0" in text


def test_other_events_and_failures_fall_back() -> None:
    """Events with a format of their own, or a traceback, are formatted by Twisted."""
    failure = Failure(ZeroDivisionError("division by zero"))
    events = [
        {
            "log_format": "hello {name}",
            "name": "world",
            "log_time": 1_700_000_000.25,
            "log_level": LogLevel.warn,
            "log_namespace": "x",
        },
        {
            "log_format": "{summary}",
            "summary": "it broke",
            "log_failure": failure,
            "log_time": 1_700_000_001.0,
            "log_system": "sys",
        },
        {"log_format": "{summary}", "summary": "two\nlines", "log_time": None},
        {"log_format": "{summary}", "summary": 7},
    ]
    text = _written(events)
    assert text == _classic(events)
    assert "ZeroDivisionError" in text
    assert "- [-#-] two\n\tlines\n" in text


def test_timestamp_follows_the_clock() -> None:
    """The per-second cache never reuses a stamp from another second."""
    events = [
        {"log_format": "{summary}", "summary": "a", "log_time": 1_700_000_000.1},
        {"log_format": "{summary}", "summary": "b", "log_time": 1_700_000_000.9},
        {"log_format": "{summary}", "summary": "c", "log_time": 1_700_000_001.0},
        {"log_format": "{summary}", "summary": "d", "log_time": 1_700_000_000.5},
    ]
    assert _written(events) == _classic(events)


def test_observer_writes_to_stdout(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    observer()({"log_format": "{summary}", "summary": "hi", "log_system": "s"})
    assert "- [s] hi\n" == out.getvalue()


def test_twistd_logger_option(tmp_path) -> None:
    """C{twistd --logger twisted_smtpd.fastlog.observer smtpd} logs each message."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "--logger",
            "twisted_smtpd.fastlog.observer",
            "smtpd",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--handler",
            "twisted_smtpd.handlers.discard",
            "--hostname",
            "mx.test",
        ],
        cwd=tmp_path,
        env=twistd_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, proc)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.sendmail("a@b.example", ["c@d.example"], b"Subject: x\r\n\r\nok\r\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    assert ROOT.exists()
    lines = [line for line in output.splitlines() if "message" in line]
    assert any(
        "[twisted_smtpd.protocol#info] smtpd " in line
        and "from <a@b.example>" in line
        and line.endswith(": accepted")
        for line in lines
    ), output
