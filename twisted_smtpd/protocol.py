# -*- test-case-name: tests.test_protocol -*-
"""
The wire: a L{LineReceiver} that drives the pure L{Session} and talks to the
handler.

Lines are split on CRLF only (never on a bare CR or LF).  After C{354} the
protocol switches to raw mode and feeds whole reads to the L{DataReader}.
While a handler hook is pending, input is held, so pipelined commands are
answered strictly in order.
"""

from __future__ import annotations

import functools
import inspect
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Callable, Optional

from OpenSSL.SSL import Error as TLSError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from ._commands import parse_command, parse_helo, parse_mail, parse_rcpt
from ._data import DataReader
from ._fastwrite import can_write_directly, write_directly
from ._session import Envelope, Session, State, TLSInfo
from .replies import (
    R214_HELP,
    R220_STARTTLS,
    R221_BYE,
    R250_CHUNK_OK,
    R250_HELO,
    R250_OK,
    R250_QUEUED,
    R250_RECIPIENT_OK,
    R250_RESET,
    R250_SENDER_OK,
    R252_CANNOT_VRFY,
    R354_START_INPUT,
    R421_SHUTTING_DOWN,
    R421_TIMEOUT,
    R451_LOCAL_ERROR,
    R500_AUTH_LINE_TOO_LONG,
    R500_LINE_TOO_LONG,
    R500_UNKNOWN_COMMAND,
    R501_NO_ARGUMENTS,
    R501_SYNTAX_BDAT,
    R501_SYNTAX_VRFY,
    R502_NOT_IMPLEMENTED,
    R503_ALREADY_TLS,
    R552_TOO_BIG,
    Reply,
    SMTPError,
    fill,
)

if TYPE_CHECKING:
    from .factory import SMTPFactory

__all__ = ["SMTPServerProtocol"]

# A module logger: a Logger class attribute builds a new Logger on every access.
_log = Logger(namespace="twisted_smtpd.protocol")

#: replies that count against the bad-command budget
_BAD_COMMAND_CODES = frozenset({500, 501, 502, 503, 504, 530, 555})
#: pause reading from the socket when this much input waits behind a hook
_MAX_HELD_INPUT = 256 * 1024


class _CollectingReceiver:
    """Gathers the message for handlers that want it whole."""

    __slots__ = ("_chunks", "_envelope", "_handle")

    def __init__(self, envelope: Envelope, handle: Callable[[Envelope], Any]) -> None:
        self._envelope = envelope
        self._handle = handle
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._chunks.append(data)

    def finish(self) -> Any:
        self._envelope.content = b"".join(self._chunks)
        self._chunks = []
        return self._handle(self._envelope)

    def abort(self) -> None:
        self._chunks = []


class HandlerHooks:
    """A user's handler reduced to the hooks the protocol calls."""

    __slots__ = ("check_client", "check_sender", "check_recipient", "open_message")

    def __init__(self, handler: Any) -> None:
        self.check_client = getattr(handler, "check_client", None)
        self.check_sender = getattr(handler, "check_sender", None)
        self.check_recipient = getattr(handler, "check_recipient", None)
        open_message = getattr(handler, "open_message", None)
        handle = getattr(handler, "handle_message", None)
        if open_message is None:
            if handle is None:
                if not callable(handler):
                    raise TypeError(
                        f"{handler!r} is neither callable nor has"
                        " handle_message/open_message"
                    )
                handle = handler
            whole: Callable[[Envelope], Any] = handle

            def open_message(envelope: Envelope) -> _CollectingReceiver:
                return _CollectingReceiver(envelope, whole)

        self.open_message = open_message


def _as_deferred_or_value(result: Any) -> Any:
    if inspect.iscoroutine(result):
        return Deferred.fromCoroutine(result)
    return result


class SMTPServerProtocol(LineReceiver, TimeoutMixin):
    """One SMTP session.  Built by L{SMTPFactory}; holds no policy of its own."""

    delimiter = b"\r\n"
    #: replies collected while a read is processed (None: send at once)
    _out: Optional[list[bytes]] = None
    # A TCP, TLS or test transport: the protocol uses what they all provide.
    transport: Any

    def __init__(self, factory: SMTPFactory) -> None:
        self.factory = factory
        self.limits = factory.limits
        self.session: Session = None  # type: ignore[assignment]
        self._hooks: HandlerHooks = factory.hooks
        self._buffer = b""
        self._busy = False
        self._held = False  # a hook is pending: input waits
        self._transport_paused = False
        self._closing = False
        self._discard_line = False  # dropping the rest of an overlong line
        self._drop_input = False  # STARTTLS: forget buffered plaintext
        self._close_when_idle = False  # shutting down once the work in flight ends
        # a partial line or the DATA phase must be complete by then
        self._deadline: Optional[float] = None
        self._reader: Optional[DataReader] = None
        # BDAT: bytes of the current chunk still to come, and what to do with them
        self._chunk_left = 0
        self._chunk_discard = False
        self._chunk_too_big = False
        self._chunk_last = False
        self._chunk_size = 0
        self._sasl: Optional[Callable[[str], None]] = None  # AUTH continuation
        self._receiver: Any = None
        self._envelope: Optional[Envelope] = None
        self._debug = factory.debug
        # Output: replies made while a read is processed are sent as one
        # write at its end (_out), straight to the socket when possible.
        self._direct_write = False

    # -- Twisted plumbing ------------------------------------------------------
    def callLater(  # type: ignore[override]
        self, delay: float, fn: Callable[..., Any], *a: Any, **kw: Any
    ) -> Any:
        """TimeoutMixin's clock: the factory's reactor, so tests can use a Clock."""
        return self.factory.reactor.callLater(delay, fn, *a, **kw)

    def connectionMade(self) -> None:
        self._direct_write = can_write_directly(self.transport)
        if getattr(self.transport, "awaiting_proxy_header", False):
            # Behind a PROXY-protocol listener: greet once the real peer is known.
            self.setTimeout(self.limits.line_timeout)
            return
        self._start_session()

    def proxyHeaderReceived(self) -> None:
        """The PROXY header is in: C{transport.getPeer()} is the real client."""
        if self.session is None:
            self._start_session()

    def _start_session(self) -> None:
        peer = self.transport.getPeer()
        tls = self._current_tls() if ISSLTransport.providedBy(self.transport) else None
        self.session = Session(
            self.factory.new_session_id(),
            peer,
            self.limits,
            tls_info=tls,
            tls_required=self.factory.tls_required,
            auth_required=self.factory.auth_required,
        )
        if self._debug:
            _log.info(
                "smtpd session {session_id} connected from {peer}",
                session_id=self.session.session_id,
                peer=_address_text(peer),
            )
        refusal = self.factory.admit(self)
        if refusal is not None:
            self.reply(refusal)
            self._close()
            return
        self.setTimeout(self.limits.timeout)
        # The greeting waits for the handler's verdict on the client (and any
        # early talker's bytes wait with it).
        self._run(
            self._hooks.check_client,
            (self.session.peer,),
            lambda _: self.reply(self.factory.greeting),
            self._close,
        )

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        self._closing = True
        if self._receiver is not None:
            self._abort_receiver()
        self.factory.release(self)
        if reason is not None and self.session is not None:
            self._log_tls_failure(reason)
        # Sessions that sent mail are in the per-message lines already.
        if (
            self.session is not None
            and not self.factory.quiet
            and (self.session.messages == 0 or self._debug)
        ):
            session = self.session
            peer = _address_text(session.peer)
            _log.info(
                "{summary}",
                summary=f"smtpd session {session.session_id} from {peer} closed"
                f" after {session.messages} messages",
                session_id=session.session_id,
                peer=peer,
                messages=session.messages,
            )

    def _log_tls_failure(self, reason: Failure) -> None:
        """A failed TLS handshake is one log line, never a traceback."""
        if reason.check(TLSError):
            _log.info(
                "smtpd session {session_id}: TLS failed: {error}",
                session_id=self.session.session_id,
                error=_tls_error_text(reason.value),
            )

    def timeoutConnection(self) -> None:
        if self.session is None:  # no PROXY header in time
            self._close()
            return
        _log.info(
            "smtpd session {session_id} idle timeout",
            session_id=self.session.session_id,
        )
        self.reply(fill(R421_TIMEOUT, hostname=self.factory.hostname))
        self._close()

    def shutdown(self) -> None:
        """Server going down: 421 now, or once the message in flight is answered."""
        if self._closing:
            return
        if self.busy:
            self._close_when_idle = True
            return
        self.close_with(fill(R421_SHUTTING_DOWN, hostname=self.factory.hostname))

    def force_close(self) -> None:
        """Grace period over: 421 and drop the connection, whatever it is doing."""
        if not self._closing:
            self.reply(fill(R421_SHUTTING_DOWN, hostname=self.factory.hostname))
        self._closing = True
        self._flush()
        self.transport.abortConnection()

    @property
    def busy(self) -> bool:
        """Reading a message, or waiting for a handler: closing now loses work."""
        return (
            self._reader is not None
            or self._held
            or bool(self._chunk_left)
            or (self.session is not None and self.session.state is State.CHUNKING)
        )

    def _close_if_draining(self) -> None:
        if self._close_when_idle and not self.busy and not self._closing:
            self.close_with(fill(R421_SHUTTING_DOWN, hostname=self.factory.hostname))

    # -- input -----------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        """Split on CRLF without re-copying the buffer per line."""
        if self.session is None:  # bytes right behind a PROXY header
            self._start_session()
        if self._deadline is not None and self._deadline_passed():
            return
        if data and self.timeOut is not None:
            self.resetTimeout()
        if self._busy or self._held or self._closing:
            if not self._closing:
                self._buffer += data
                self._limit_held_input()
            return
        self._busy = True
        self._out = []
        try:
            buffer = self._buffer + data if self._buffer else data
            self._buffer = b""
            pos = 0
            size = len(buffer)
            while pos < size and not self._held and not self._closing:
                if self._close_when_idle and not self.busy:
                    break  # shutting down: the message in flight is answered
                if self._chunk_left:
                    pos = self._chunk_data(buffer, pos)
                    continue
                if self._reader is not None:
                    pos = self._raw_data(buffer, pos)
                    continue
                end = buffer.find(b"\r\n", pos)
                if end < 0:
                    if size - pos >= self.limits.max_line:
                        self._start_discarding()
                    if self._discard_line:
                        # Keep a trailing CR: it may begin the CRLF.
                        pos = size - 1 if buffer.endswith(b"\r") else size
                    break
                line = buffer[pos:end]
                pos = end + 2
                if self._discard_line:
                    self._discard_line = False
                    continue
                self.lineReceived(line)
                if self._drop_input:
                    self._drop_input = False
                    pos = size
            arrived_meanwhile = self._buffer
            if not self._closing:
                self._buffer = buffer[pos:] + arrived_meanwhile
                if self._reader is None and not self._chunk_left:
                    self._line_deadline(bool(self._buffer) and not self._held)
        finally:
            self._busy = False
            self._flush()
            self._out = None
        if self._close_when_idle:
            self._close_if_draining()
        if arrived_meanwhile and not self._held and not self._closing:
            self.dataReceived(b"")

    def _line_deadline(self, partial_line: bool) -> None:
        """Bound the time to finish a command line once its first byte is in."""
        if partial_line:
            if self._deadline is None:
                self._deadline = (
                    self.factory.reactor.seconds() + self.limits.line_timeout
                )
        else:
            self._deadline = None

    def _deadline_passed(self) -> bool:
        """Checked as bytes arrive: silence is the idle timer's job, not this."""
        if self.factory.reactor.seconds() <= self._deadline:
            return False
        self._deadline = None
        _log.info(
            "smtpd session {session_id}: too slow, closing",
            session_id=self.session.session_id,
        )
        self.close_with(fill(R421_TIMEOUT, hostname=self.factory.hostname))
        return True

    def _start_discarding(self) -> None:
        if not self._discard_line:
            self._discard_line = True
            self.reply(R500_LINE_TOO_LONG)
            self._count_bad(R500_LINE_TOO_LONG)

    def _limit_held_input(self) -> None:
        if len(self._buffer) > _MAX_HELD_INPUT and not self._transport_paused:
            self._transport_paused = True
            self.transport.pauseProducing()

    def hold_input(self) -> None:
        """Answer nothing more until L{release_input}: keeps replies in order.

        The idle timer stops meanwhile: the wait is the server's, and a 421
        while a handler stores the message would make the client send it again.
        """
        self._held = True
        if self.timeOut is not None:
            self.setTimeout(None)

    def release_input(self, _: Any = None) -> Any:
        self._held = False
        if not self._closing:
            self.setTimeout(self.limits.timeout)
        if self._close_when_idle:
            self._close_if_draining()
        if self._transport_paused:
            self._transport_paused = False
            self.transport.resumeProducing()
        if self._buffer and not self._busy and not self._closing:
            self.dataReceived(b"")
        return _

    def lineReceived(self, line: bytes) -> None:
        if self._sasl is not None:
            self._sasl_line(line)
            return
        command = parse_command(line)
        verb = command.verb
        if self._debug:
            _log.info(
                "smtpd {session_id} <<< {line}",
                session_id=self.session.session_id,
                line=_mask(line),
            )
        if len(line) + 2 > self.limits.line_limit(verb):
            self._reply_bad(R500_LINE_TOO_LONG)
            return
        if verb == "BDAT":
            self._bdat(command.argument)
            return
        method = self._COMMANDS.get(verb)
        if method is None:
            self._reply_bad(R500_UNKNOWN_COMMAND)
            return
        refusal = self.session.check(verb)
        if refusal is not None:
            self._reply_bad(refusal)
            return
        try:
            method(self, command.argument)
        except SMTPError as error:
            self._reply_bad(error.reply)

    def _sasl_line(self, line: bytes) -> None:
        if self._debug:
            _log.info("smtpd {session_id} <<< ****", session_id=self.session.session_id)
        answer = self._sasl
        assert answer is not None
        if len(line) + 2 > self.limits.max_auth_line:
            self.sasl_done()
            self.reply(R500_AUTH_LINE_TOO_LONG)
            return
        answer(line.decode("ascii", "replace").strip())

    def sasl_continue(self, answer: Callable[[str], None]) -> None:
        """Send the client's next line to C{answer} instead of the command parser."""
        self._sasl = answer

    def sasl_done(self) -> None:
        self._sasl = None

    # -- output ----------------------------------------------------------------
    def reply(self, reply: Reply) -> None:
        """Send one reply (enhanced status codes only after EHLO)."""
        self._reply_bytes(
            reply.encoded(self.session is not None and self.session.esmtp)
        )

    def _reply_bytes(self, data: bytes) -> None:
        """Send encoded reply lines, logging them with --debug."""
        if self._debug:
            _log.info(
                "smtpd {session_id} >>> {line}",
                session_id=self.session.session_id if self.session else "-",
                line=data.rstrip(b"\r\n"),
            )
        out = self._out
        if out is None:
            self._send(data)
        else:
            out.append(data)

    def _flush(self) -> None:
        """Send the replies collected so far (before the transport changes state)."""
        out = self._out
        if out:
            self._send(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _send(self, data: bytes) -> None:
        if self._direct_write:
            write_directly(self.transport, data)
        else:
            self.transport.write(data)

    def _reply_bad(self, reply: Reply) -> None:
        self.reply(reply)
        self._count_bad(reply)

    def _count_bad(self, reply: Reply) -> None:
        if reply.code in _BAD_COMMAND_CODES:
            closing = self.session.bad_command()
            if closing is not None:
                self.reply(fill(closing, hostname=self.factory.hostname))
                self._close()

    def close_with(self, reply: Reply) -> None:
        """Send C{reply} (a 421) and close."""
        self.reply(reply)
        self._close()

    def _close(self) -> None:
        self._closing = True
        self.setTimeout(None)
        self._flush()
        self.transport.loseConnection()

    # -- hooks -----------------------------------------------------------------
    def _run(
        self,
        hook: Optional[Callable[..., Any]],
        args: tuple[Any, ...],
        succeeded: Callable[[Any], None],
        failed: Optional[Callable[[], None]] = None,
    ) -> None:
        """Call C{hook(*args)}, then C{succeeded(result)}, holding input meanwhile.

        On failure the error's reply is sent, then C{failed()} runs.

        A synchronous hook is answered at once; a Deferred or coroutine holds
        later commands until it fires.
        """
        if hook is None:
            succeeded(None)
            return
        try:
            result = _as_deferred_or_value(hook(*args))
        except Exception:
            self._hook_failed(Failure(), failed)
            return
        if not isinstance(result, Deferred):
            succeeded(result)
            return
        self.hold_input()
        result.addCallbacks(succeeded, self._hook_failed, errbackArgs=(failed,))
        result.addErrback(self._unexpected)
        result.addBoth(self.release_input)

    def _hook_failed(
        self, failure: Failure, failed: Optional[Callable[[], None]]
    ) -> None:
        if failure.check(SMTPError):
            reply = failure.value.reply
        else:
            _log.failure(
                "smtpd {session_id}: handler failed",
                failure,
                session_id=self.session.session_id,
            )
            reply = R451_LOCAL_ERROR
        self.reply(reply)
        if failed is not None:
            failed()

    def _unexpected(self, failure: Failure) -> None:
        _log.failure("smtpd internal error", failure)
        self.reply(R451_LOCAL_ERROR)

    # -- commands --------------------------------------------------------------
    def do_HELO(self, argument: str) -> None:
        name = parse_helo(argument)
        self._abort_chunked_message()
        self.session.greeted(name, esmtp=False)
        self.reply(fill(R250_HELO, hostname=self.factory.hostname, name=name))

    def do_EHLO(self, argument: str) -> None:
        name = parse_helo(argument)
        self._abort_chunked_message()
        self.session.greeted(name, esmtp=True)
        hello = fill(R250_HELO, hostname=self.factory.hostname, name=name)
        # Only the first line varies per client; the keywords are cached bytes.
        self._reply_bytes(
            b"250-%s\r\n%s"
            % (
                hello.text.encode("utf-8", "surrogateescape"),
                self.factory.ehlo_keywords(self.session),
            )
        )

    def do_MAIL(self, argument: str) -> None:
        sender, params = parse_mail(argument)
        self.session.check_size(params)
        if self.session.tls is not None:
            self.session.tls = self._current_tls()
        envelope = self.session.new_envelope()
        envelope.mail_from = sender
        envelope.mail_options = params

        def accepted(_: Any) -> None:
            self.session.mail(envelope)
            self.reply(R250_SENDER_OK)

        self._run(self._hooks.check_sender, (envelope,), accepted)

    def do_RCPT(self, argument: str) -> None:
        envelope = self.session.envelope
        assert envelope is not None
        address, params = parse_rcpt(argument, envelope.smtputf8)
        self.session.check_recipient_count()

        def accepted(_: Any) -> None:
            self.session.rcpt(address, params)
            self.reply(R250_RECIPIENT_OK)

        self._run(self._hooks.check_recipient, (envelope, address, params), accepted)

    def do_DATA(self, argument: str) -> None:
        if argument:
            raise SMTPError(fill(R501_NO_ARGUMENTS, verb="DATA"))
        if not self._open_message(chunked=False):
            return
        self._reader = DataReader(self.limits.max_message_size)
        self._deadline = self.factory.reactor.seconds() + self.limits.data_timeout
        self.reply(R354_START_INPUT)

    def _open_message(self, chunked: bool) -> bool:
        """Start the message (DATA or first BDAT); False if the handler failed."""
        envelope = self.session.start_data(chunked)
        envelope.received_at = self.factory.reactor.seconds()
        envelope._trace_builder = self.factory.received_header
        try:
            self._receiver = self._hooks.open_message(envelope)
        except Exception:
            self._hook_failed(Failure(), None)
            self.session.reset()
            return False
        self._envelope = envelope
        register = getattr(self._receiver, "registerProducer", None)
        if register is not None:
            register(_BodyProducer(self), True)
        return True

    # -- BDAT (RFC 3030 CHUNKING) ----------------------------------------------
    def _bdat(self, argument: str) -> None:
        """BDAT size [LAST]: the chunk's bytes follow, whatever the answer is."""
        parts = argument.split()
        if (
            not 1 <= len(parts) <= 2
            or not parts[0].isdigit()
            or len(parts[0]) > 18
            or (len(parts) == 2 and parts[1].upper() != "LAST")
        ):
            # The chunk size is unknown, so what follows is read as commands.
            self._reply_bad(R501_SYNTAX_BDAT)
            return
        size, last = int(parts[0]), len(parts) == 2
        refusal = self.session.check("BDAT")
        if refusal is not None:
            self._reply_bad(refusal)
            self._expect_chunk(size, discard=True)
            return
        if self.session.state is not State.CHUNKING and not self._open_message(
            chunked=True
        ):
            # The handler's failure is answered; the chunk is dropped.
            self._expect_chunk(size, discard=True)
            return
        envelope = self._envelope
        assert envelope is not None
        envelope.size += size
        limit = self.limits.max_message_size
        self._chunk_too_big = self._chunk_too_big or bool(
            limit and envelope.size > limit
        )
        self._chunk_size, self._chunk_last = size, last
        self._expect_chunk(size, discard=False)
        if size == 0:
            self._chunk_complete()

    def _expect_chunk(self, size: int, discard: bool) -> None:
        """The next C{size} bytes are a chunk; reading it is bounded like DATA."""
        self._chunk_left, self._chunk_discard = size, discard
        if size:
            now = self.factory.reactor.seconds()
            self._deadline = now + self.limits.data_timeout

    def _chunk_data(self, buffer: bytes, pos: int) -> int:
        """Take this chunk's bytes from C{buffer[pos:]}; return where they end."""
        take = min(self._chunk_left, len(buffer) - pos)
        if not (self._chunk_discard or self._chunk_too_big):
            end = pos + take
            self._receiver.write(
                buffer if pos == 0 and end == len(buffer) else buffer[pos:end]
            )
        self._chunk_left -= take
        if self._chunk_left == 0:
            self._deadline = None
            if not self._chunk_discard:
                self._chunk_complete()
        return pos + take

    def _chunk_complete(self) -> None:
        if self._chunk_too_big:
            self._chunk_too_big = False
            self._end_of_data(self._envelope.size, too_big=True)  # type: ignore[union-attr]
        elif self._chunk_last:
            self._end_of_data(self._envelope.size, too_big=False)  # type: ignore[union-attr]
        else:
            self.reply(fill(R250_CHUNK_OK, size=self._chunk_size))

    def _abort_chunked_message(self) -> None:
        """RSET or a new greeting between BDAT chunks drops the message."""
        if self.session.state is State.CHUNKING and self._receiver is not None:
            self._abort_receiver()
            self._chunk_too_big = False

    def _raw_data(self, buffer: bytes, pos: int) -> int:
        """Feed DATA bytes from C{buffer[pos:]}; return where line mode resumes."""
        reader = self._reader
        assert reader is not None
        body, leftover = reader.feed(buffer[pos:] if pos else buffer)
        if body:
            self._receiver.write(body)
        if leftover is None:
            return len(buffer)
        self._reader = None
        self._deadline = None
        self._end_of_data(reader.size, reader.too_big)
        return len(buffer) - len(leftover)

    def _end_of_data(self, size: int, too_big: bool) -> None:
        envelope = self._envelope
        assert envelope is not None
        envelope.size = size
        if too_big:
            self._abort_receiver()
            self._message_done(envelope, "too big")
            self.reply(R552_TOO_BIG)
            return
        receiver = self._receiver

        def stored(queue_id: Any) -> None:
            self._receiver_done(receiver)
            self._message_done(envelope, "accepted")
            self.reply(
                fill(
                    R250_QUEUED, queue_id=queue_id if queue_id else envelope.message_id
                )
            )

        def refused() -> None:
            self._receiver_done(receiver)
            self._message_done(envelope, "refused")

        self._run(receiver.finish, (), stored, refused)

    def _receiver_done(self, receiver: Any) -> None:
        unregister = getattr(receiver, "unregisterProducer", None)
        if unregister is not None:
            unregister()
        if self._receiver is receiver:
            self._receiver = None
            self._envelope = None

    def _abort_receiver(self) -> None:
        receiver = self._receiver
        self._receiver_done(receiver)
        try:
            receiver.abort()
        except Exception:
            _log.failure("smtpd: receiver.abort failed")

    def _message_done(self, envelope: Envelope, outcome: str) -> None:
        self.session.reset()
        if self.factory.quiet and outcome == "accepted":
            return
        session_id = self.session.session_id
        rcpt_count = len(envelope.rcpt_tos)
        peer = _address_text(envelope.peer)
        # The text is made here in one f-string: twisted.logger's formatter
        # costs about 10 us per {field}. The fields stay in the event.
        _log.info(
            "{summary}",
            summary=f"smtpd {session_id} message {envelope.message_id} from"
            f" <{envelope.mail_from}> ({peer}) to {rcpt_count} recipients,"
            f" {envelope.size} bytes: {outcome}",
            session_id=session_id,
            peer=peer,
            message_id=envelope.message_id,
            mail_from=envelope.mail_from,
            rcpt_count=rcpt_count,
            size=envelope.size,
            outcome=outcome,
        )

    def do_RSET(self, argument: str) -> None:
        if argument:
            raise SMTPError(fill(R501_NO_ARGUMENTS, verb="RSET"))
        self._abort_chunked_message()
        self.session.reset()
        self.reply(R250_RESET)

    def do_NOOP(self, argument: str) -> None:
        self.reply(R250_OK)

    def do_QUIT(self, argument: str) -> None:
        self.reply(R221_BYE)
        self._close()

    def do_VRFY(self, argument: str) -> None:
        if not argument:
            raise SMTPError(R501_SYNTAX_VRFY)
        self.reply(R252_CANNOT_VRFY)

    def do_HELP(self, argument: str) -> None:
        self.reply(R214_HELP)

    def do_EXPN(self, argument: str) -> None:
        raise SMTPError(R502_NOT_IMPLEMENTED)

    def do_STARTTLS(self, argument: str) -> None:
        if self.session.tls is not None:
            raise SMTPError(R503_ALREADY_TLS)
        context = self.factory.tls_context
        if context is None:
            raise SMTPError(R502_NOT_IMPLEMENTED)
        if argument:
            raise SMTPError(fill(R501_NO_ARGUMENTS, verb="STARTTLS"))
        self.reply(R220_STARTTLS)
        # Anything the client sent after STARTTLS in plaintext is an injection
        # attempt (CVE-2011-0411 class): drop it before the handshake.
        self._drop_input = True
        self._buffer = b""
        self._flush()  # the 220 goes out in plaintext, before the handshake
        self._direct_write = False
        self.transport.startTLS(context)
        self.session.tls_started(TLSInfo("", ""))

    def do_AUTH(self, argument: str) -> None:
        auth = self.factory.auth
        if auth is None:
            raise SMTPError(R502_NOT_IMPLEMENTED)
        auth.begin(self, argument)

    # -- TLS facts -------------------------------------------------------------
    def _current_tls(self) -> TLSInfo:
        connection = None
        get_handle = getattr(self.transport, "getHandle", None)
        if get_handle is not None:
            try:
                connection = get_handle()
            except Exception:
                connection = None
        if connection is None or not hasattr(connection, "get_cipher_name"):
            return TLSInfo("", "")
        return TLSInfo(
            protocol=connection.get_protocol_version_name() or "",
            cipher=connection.get_cipher_name() or "",
            peer_certificate=connection.get_peer_certificate(as_cryptography=True),
        )

    _COMMANDS: dict[str, Callable[[SMTPServerProtocol, str], None]] = {}


SMTPServerProtocol._COMMANDS = {
    name[3:]: method
    for name, method in vars(SMTPServerProtocol).items()
    if name.startswith("do_")
}


class _BodyProducer:
    """The connection as seen by a streaming receiver: pause and resume reading."""

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._protocol.transport.resumeProducing()

    def stopProducing(self) -> None:
        self._protocol.transport.loseConnection()


def _address_text(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _tls_error_text(error: Exception) -> str:
    """OpenSSL's error list as one short line."""
    parts = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        parts.append(item[-1] if isinstance(item, tuple) else str(item))
    return "; ".join(parts) or repr(error)


def _mask(line: bytes) -> bytes:
    """AUTH payloads never reach a log."""
    if line[:5].upper() == b"AUTH ":
        parts = line.split(b" ", 2)
        return b" ".join(parts[:2] + ([b"****"] if len(parts) > 2 else []))
    return line


@functools.lru_cache(maxsize=4)
def _rfc5322_date(seconds: int) -> str:
    """The date for Received: headers; formatted once per second, not per message."""
    return formatdate(seconds, localtime=True)


def received_header(
    envelope: Envelope, hostname: str, app_name: str, when: float
) -> bytes:
    """The C{Received:} trace field for a message (RFC 5321 4.4)."""
    peer = envelope.peer
    ip = getattr(peer, "host", None) or str(peer)
    literal = f"IPv6:{ip}" if ":" in ip else ip
    tls = envelope.tls
    lines = [f"Received: from {envelope.helo or 'unknown'} ([{literal}])"]
    if tls is not None and tls.protocol:
        lines.append(f"\t(using {tls.protocol} with cipher {tls.cipher})")
    lines.append(
        f"\tby {hostname} ({app_name}) with {envelope.protocol_name}"
        f" id {envelope.message_id}"
    )
    if len(envelope.rcpt_tos) == 1:
        lines.append(f"\tfor <{envelope.rcpt_tos[0]}>")
    lines[-1] += f"; {_rfc5322_date(int(when))}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
