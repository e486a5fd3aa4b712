"""twisted_smtpd.fastlog: the same lines as twistd's text observer, cheaper."""

from __future__ import annotations

import io
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import pytest
from twisted.internet.task import Clock
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from twisted_smtpd import SMTPFactory
from twisted_smtpd.fastlog import (
    FastLogObserver,
    emit_summary,
    observer,
    twistd_observer,
)
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


def test_bytes_file_gets_utf8() -> None:
    """A file that takes bytes gets UTF-8, as from twistd's FileLogObserver."""
    event = {"log_format": "{summary}", "summary": "caf\u00e9", "log_system": "s"}
    out = io.BytesIO()
    FastLogObserver(out)(event)
    twistds = io.BytesIO()
    FileLogObserver(twistds, formatEventAsClassicLogText)(event)
    assert twistds.getvalue() == out.getvalue() == "- [s] caf\u00e9\n".encode()


def test_relayed_worker_lines_are_twistds_lines() -> None:
    """Lines relayed from --workers ("{text}" events) are written as twistd would."""
    events = [
        {
            "log_format": "{text}",
            "text": "smtpd abc message abc-1 from <a@b> (1.2.3.4:5) ...: accepted",
            "log_level": LogLevel.info,
            "log_namespace": "twisted_smtpd.protocol",
            "log_time": 1_700_000_000.5,
            "log_system": "worker 1",
        },
        {"log_format": "{text}", "text": "", "log_time": 1_700_000_000.5},
        {"log_format": "{text}", "text": b"bytes", "log_time": 1_700_000_000.5},
    ]
    text = _written(events)
    assert text == _classic(events)
    assert "[worker 1] smtpd abc message" in text


def test_emit_summary_is_logger_emit() -> None:
    """emit_summary gives the observers the event Logger.emit would give them."""
    from twisted.logger import Logger

    got: list[dict] = []
    logger = Logger(namespace="twisted_smtpd.protocol", observer=got.append)
    logger.info("{summary}", summary="the text", peer="192.0.2.1:25", size=3)
    before = time.time()
    emit_summary(logger, {"summary": "the text", "peer": "192.0.2.1:25", "size": 3})
    after = time.time()
    emit_summary(logger, {"summary": "warned"}, LogLevel.warn)
    emitted, fast, warned = got
    assert before <= fast.pop("log_time") <= after
    emitted.pop("log_time")
    assert emitted == fast
    assert LogLevel.warn is warned["log_level"]
    assert "- [twisted_smtpd.protocol#warn] warned\n" == _classic(
        [{**warned, "log_time": None}]
    )


# twistd's own choice of observer, with this plugin


SMTPD_ARGS = ("--handler", "twisted_smtpd.handlers.discard", "--no-reverse-dns")


def _server_options(*twistd_args: str, smtpd_args: tuple[str, ...] = ()) -> Any:
    """twistd's parsed command line: C{twistd ARGS smtpd ...}."""
    from twisted.scripts._twistd_unix import ServerOptions

    config = ServerOptions()
    config.parseOptions(
        [
            *twistd_args,
            "smtpd",
            "--port",
            "tcp:0:interface=127.0.0.1",
            *SMTPD_ARGS,
            *smtpd_args,
        ]
    )
    return config


class _Beginner:
    """Stands in for globalLogBeginner: records what twistd begins logging to."""

    def __init__(self) -> None:
        self.observers: list[Any] = []

    def beginLoggingTo(self, observers: list[Any], *args: Any, **kw: Any) -> None:
        self.observers.extend(observers)


def _twistds_observer(monkeypatch: pytest.MonkeyPatch, config: Any) -> Any:
    """The observer twistd itself would start logging to for C{config}."""
    from twisted.scripts._twistd_unix import UnixApplicationRunner, UnixAppLogger

    application = UnixApplicationRunner(config).createOrGetApplication()
    beginner = _Beginner()
    monkeypatch.setattr("twisted.logger.globalLogBeginner", beginner)
    with warnings.catch_warnings():
        # twistd's own syslog observer is a legacy one: twistd warns about it
        warnings.simplefilter("ignore", DeprecationWarning)
        UnixAppLogger(config).start(application)
    [chosen] = beginner.observers
    return chosen


def test_twistd_logs_through_fastlog_by_default(monkeypatch) -> None:
    """C{twistd -n smtpd}: twistd itself picks the fast observer, on stdout."""
    chosen = _twistds_observer(monkeypatch, _server_options("-n"))
    assert isinstance(chosen, FastLogObserver)
    assert chosen._out is sys.stdout


def test_twistd_logfile_through_fastlog(monkeypatch, tmp_path) -> None:
    """C{--logfile PATH}: the fast observer writes twistd's rotating LogFile."""
    path = tmp_path / "smtpd.log"
    chosen = _twistds_observer(monkeypatch, _server_options("-n", "-l", str(path)))
    assert isinstance(chosen, FastLogObserver)
    assert isinstance(chosen._out, LogFile)
    chosen._out.close()
    assert str(path) == chosen._out.path
    assert 1_000_000 == chosen._out.rotateLength  # twistd's default rotation


@pytest.mark.parametrize(
    ("twistd_args", "smtpd_args"),
    [
        (("-n", "--logger", "tests.test_fastlog.marked_observer"), ()),
        (("-n", "--syslog"), ()),
        (("-n",), ("--twistd-log",)),
    ],
    ids=["logger", "syslog", "twistd-log"],
)
def test_twistds_choice_wins(monkeypatch, twistd_args, smtpd_args) -> None:
    """--logger, --syslog and smtpd's --twistd-log: no observer set by the plugin."""
    from twisted.scripts._twistd_unix import UnixApplicationRunner

    config = _server_options(*twistd_args, smtpd_args=smtpd_args)
    application = UnixApplicationRunner(config).createOrGetApplication()
    assert application.getComponent(ILogObserver, None) is None
    chosen = _twistds_observer(monkeypatch, config)
    assert not isinstance(chosen, FastLogObserver)
    if "--twistd-log" in smtpd_args:
        # twistd's own text observer, to standard output
        assert isinstance(chosen, FileLogObserver)
        assert chosen._outFile is sys.stdout


@pytest.mark.parametrize(
    ("twistd_args", "where"),
    [
        (("-n",), "stdout"),
        (("-n", "-l", "-"), "stdout"),
        (("-n", "-l", "x.log"), "x.log"),
        (("-l", "x.log"), "x.log"),
        ((), "twistd.log"),  # a daemon without --logfile
        (("-l", "-"), None),  # twistd refuses: "Daemons cannot log to stdout"
        (("-n", "--logger", "twisted_smtpd.fastlog.observer"), None),
        (("--syslog",), None),
    ],
)
def test_twistd_observer_goes_where_twistd_would(
    monkeypatch, tmp_path, twistd_args, where
) -> None:
    monkeypatch.chdir(tmp_path)
    chosen = twistd_observer(_server_options(*twistd_args))
    if where is None:
        assert chosen is None
    elif where == "stdout":
        assert chosen is not None and chosen._out is sys.stdout
    else:
        assert chosen is not None and isinstance(chosen._out, LogFile)
        chosen._out.close()
        assert str(tmp_path / where) == chosen._out.path


# Real twistd processes


def _twistd(
    cwd: Path, twistd_args: tuple[str, ...], smtpd_args: tuple[str, ...] = ()
) -> tuple[list[str], int]:
    command = [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        *twistd_args,
        "smtpd",
        *SMTPD_ARGS,
        "--hostname",
        "mx.test",
        *smtpd_args,
    ]
    port = free_port()
    command += ["--port", f"tcp:{port}:interface=127.0.0.1"]
    return command, port


def _send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("a@b.example", ["c@d.example"], b"Subject: x\r\n\r\nok\r\n")


def _one_message(
    cwd: Path, *twistd_args: str, smtpd_args: tuple[str, ...] = ()
) -> tuple[str, str]:
    """Run C{twistd -n ARGS smtpd}, send one message, stop it: (stdout, stderr)."""
    command, port = _twistd(cwd, ("-n", "--pidfile=", *twistd_args), smtpd_args)
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=twistd_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, proc)
        _send(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    # twistd ends by the signal that stopped it
    assert -signal.SIGTERM == proc.returncode, err
    return out, err


def _message_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " message " in line]


def _is_message_line(line: str) -> bool:
    return (
        re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"
            r" \[twisted_smtpd\.protocol#info\] smtpd (\w+) message \1-1"
            r" from <a@b\.example> \(127\.0\.0\.1:\d+\) to 1 recipients,"
            r" 18 bytes: accepted",
            line,
        )
        is not None
    )


def _masked(text: str) -> list[str]:
    """Log lines without what differs between two runs (times, ids, ports)."""
    lines = []
    for line in text.splitlines():
        line = re.sub(r"\b[0-9A-Z]{14}\b", "ID", line.split(" ", 1)[1])
        lines.append(re.sub(r"\d+|0x[0-9a-f]+", "N", line))
    return lines


def test_real_twistd_default_logs_to_stdout(tmp_path) -> None:
    """C{twistd -n smtpd}: twistd's start-up lines and the message line, on stdout."""
    out, err = _one_message(tmp_path)
    [line] = _message_lines(out)
    assert _is_message_line(line), line
    assert "[twisted.scripts._twistd_unix.UnixAppLogger#info] twistd " in out
    assert "Server Shut Down." in out
    assert "" == err
    assert [] == os.listdir(tmp_path)  # no twistd.log


def test_real_twistd_lines_are_its_text_observers(tmp_path) -> None:
    """The default's lines are the lines of twistd's own text observer."""
    fast, _ = _one_message(tmp_path)
    text, _ = _one_message(tmp_path, smtpd_args=("--twistd-log",))
    assert 1 == len(_message_lines(fast)) == len(_message_lines(text))
    assert _masked(text) == _masked(fast)


def test_real_twistd_logfile(tmp_path) -> None:
    """C{--logfile PATH}: every line goes to the file, none to stdout."""
    path = tmp_path / "logs" / "smtpd.log"
    path.parent.mkdir()
    out, err = _one_message(tmp_path, "--logfile", str(path))
    assert "" == out + err
    text = path.read_text()
    [line] = _message_lines(text)
    assert _is_message_line(line), line
    assert "Server Shut Down." in text


def test_real_twistd_bad_logfile_is_one_line(tmp_path) -> None:
    """An unwritable --logfile stops twistd with one line, not a traceback."""
    command, _ = _twistd(
        tmp_path, ("-n", "--pidfile=", "-l", str(tmp_path / "missing" / "x.log"))
    )
    proc = subprocess.run(
        command, cwd=tmp_path, env=twistd_env(), capture_output=True, text=True
    )
    assert 1 == proc.returncode
    assert [
        f"twistd smtpd: error: cannot open the log file"
        f" {tmp_path / 'missing' / 'x.log'}: No such file or directory"
    ] == (proc.stdout + proc.stderr).splitlines()


def marked_observer() -> Any:
    """A C{--logger} factory for the test below: twistd's lines, marked."""
    return FileLogObserver(
        sys.stdout, lambda event: "MARK " + (formatEventAsClassicLogText(event) or "")
    )


def test_real_twistd_logger_wins(tmp_path) -> None:
    """C{--logger X}: X gets the events, as twistd alone would do."""
    out, _ = _one_message(tmp_path, "--logger", "tests.test_fastlog.marked_observer")
    [line] = _message_lines(out)
    assert line.startswith("MARK ") and _is_message_line(line[5:]), line
    assert all(line.startswith("MARK ") for line in out.splitlines() if line), out


def test_real_twistd_quiet(tmp_path) -> None:
    """C{--quiet}: twistd's own lines, no line for the accepted message."""
    out, _ = _one_message(tmp_path, smtpd_args=("--quiet",))
    assert [] == _message_lines(out)
    assert "smtpd: listening on 127.0.0.1:" in out
    assert "Server Shut Down." in out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_real_twistd_daemon_logs_to_twistd_log(tmp_path) -> None:
    """A daemonised C{twistd smtpd} without C{--logfile} writes ./twistd.log."""
    command, port = _twistd(tmp_path, ("--pidfile", "twistd.pid"))
    started = subprocess.run(
        command, cwd=tmp_path, env=twistd_env(), capture_output=True, text=True
    )
    assert 0 == started.returncode, started.stdout + started.stderr
    pid: Optional[int] = int((tmp_path / "twistd.pid").read_text())
    try:
        _send(port)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
        pid = None
    finally:
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
    text = (tmp_path / "twistd.log").read_text()
    [line] = _message_lines(text)
    assert _is_message_line(line), line
    assert "Server Shut Down." in text
