# -*- test-case-name: tests.test_fastlog -*-
"""
A cheaper twistd log observer, line for line the same text as twistd's.

C{twistd smtpd} logs through it by default: the plugin's service sets it on
the application as its L{ILogObserver} (which twistd uses when no
C{--logger} is given), opened on the file twistd itself would have chosen
(L{twistd_observer}).  With C{--logger} or C{--syslog} twistd's choice wins.

twistd's text observer (C{formatEventAsClassicLogText}) formats every
event's C{log_format} with C{string.Formatter} and its timestamp with
C{datetime.strftime}: about 11 µs per event, a tenth of a small message's
CPU.  twisted_smtpd's per-message and per-session events already carry
their text, made once in an f-string (C{log_format} is C{"{summary}"}), so
this observer writes that text as it is, with the timestamp formatted once
per second.  Every other event (Twisted's own, failures with their
tracebacks) goes through C{formatEventAsClassicLogText} unchanged.  The
events keep all their fields for any other observer.

Like twistd's own observer it writes each line and flushes it, as UTF-8
bytes to a file object that takes bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from time import time
from typing import IO, Any, Optional

from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
)
from twisted.logger import formatTime as _format_time
from twisted.python.compat import ioType
from twisted.python.logfile import LogFile
from zope.interface import implementer

__all__ = [
    "FastLogObserver",
    "PREFORMATTED",
    "emit_summary",
    "observer",
    "twistd_observer",
]

#: the C{log_format} of an event whose text is its C{summary} field
PREFORMATTED = "{summary}"


#: formats whose text is one field, written as it is: the plugin's lines
#: (C{"{summary}"}) and the lines relayed from C{--workers} (C{"{text}"})
_TEXT_FIELDS = {PREFORMATTED: "summary", "{text}": "text"}


@implementer(ILogObserver)
class FastLogObserver:
    """Write events to a text file the way twistd's text observer does."""

    def __init__(self, out: IO[Any]) -> None:
        self._out = out
        # As twisted.logger.FileLogObserver: text unless the file wants bytes.
        self._encoding = None if ioType(out) is str else "utf-8"
        self._second: Optional[int] = None
        self._stamp = "-"

    def __call__(self, event: LogEvent) -> None:
        field = _TEXT_FIELDS.get(event.get("log_format", ""))
        text = None if field is None else event.get(field)
        if text.__class__ is not str or "log_failure" in event:
            line = formatEventAsClassicLogText(event)
            if not line:
                return
        elif not text:
            return
        else:
            line = self._line(event, text)
        if self._encoding is None:
            self._out.write(line)
        else:
            self._out.write(line.encode(self._encoding))
        self._out.flush()

    def _line(self, event: LogEvent, text: str) -> str:
        """What C{formatEventAsClassicLogText} makes of C{event}, whose text
        is C{text}: stamp, system, text."""
        when = event.get("log_time")
        if when is None:
            stamp = "-"
        else:
            second = int(when)
            if second == self._second:
                stamp = self._stamp
            else:
                # RFC 3339 to the second: the same text for the whole second.
                stamp = self._stamp = _format_time(when)
                self._second = second
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            name = "-" if level is None else level.name
            system = f"{event.get('log_namespace', '-')}#{name}"
        if "\n" in text:
            text = text.replace("\n", "\n\t")
        return f"{stamp} [{system}] {text}\n"


def emit_summary(
    logger: Logger, event: dict[str, Any], level: LogLevel = LogLevel.info
) -> None:
    """C{logger.emit(level, "{summary}", **event)}, for less CPU.

    The same event reaches the same observers (C{event}'s fields, its
    C{summary} and the C{log_*} keys C{Logger.emit} adds), without
    C{Logger.emit}'s own work: a check of the level that sorts
    C{LogLevel}'s constants on every call, the keyword arguments, a dict
    update.  About 4 µs less per line in the server (bench/README.rst).

    Args:
        logger: the logger whose observer gets the event.
        event: the fields, C{summary} (the whole text) among them; taken,
            not copied.
        level: a L{LogLevel} constant.
    """
    event["log_logger"] = logger
    event["log_level"] = level
    event["log_namespace"] = logger.namespace
    event["log_source"] = logger.source
    event["log_format"] = PREFORMATTED
    event["log_time"] = time()
    logger.observer(event)


def observer() -> FastLogObserver:
    """The C{twistd --logger} factory: lines to standard output (as C{-n} does)."""
    return FastLogObserver(sys.stdout)


def twistd_observer(server_options: Mapping[str, Any]) -> Optional[FastLogObserver]:
    """The observer for where twistd's own options say the log goes.

    The same choice as C{UnixAppLogger._getLogObserver}: C{--logfile PATH}
    (a L{LogFile}, rotated by size like twistd's), C{-l -} or C{-n} without a
    log file: standard output, a daemon without C{--logfile}: C{twistd.log}.
    Unlike twistd, SIGUSR1 is not set to rotate the file: C{twistd smtpd}
    uses it to drain (see C{SMTPService}).

    Args:
        server_options: twistd's parsed C{ServerOptions}.

    Returns:
        None where twistd's own choice must win: C{--logger}, C{--syslog},
        or C{-l -} without C{-n} (which twistd refuses with its own message).

    Raises:
        OSError: the log file cannot be opened.
    """
    if server_options.get("logger") or server_options.get("syslog"):
        return None
    logfile = server_options.get("logfile") or ""
    if "nodaemon" not in server_options:
        # Not twistd's Unix options (Windows): AppLogger's choice.
        if logfile in ("", "-"):
            return FastLogObserver(sys.stdout)
        return FastLogObserver(LogFile.fromFullPath(logfile))
    nodaemon = bool(server_options.get("nodaemon"))
    if logfile == "-":
        return FastLogObserver(sys.stdout) if nodaemon else None
    if nodaemon and not logfile:
        return FastLogObserver(sys.stdout)
    return FastLogObserver(LogFile.fromFullPath(logfile or "twistd.log"))
