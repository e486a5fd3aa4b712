# -*- test-case-name: tests.test_handler_timeout -*-
"""
What a handler hook's outcome means on the wire: its deadline, the reply to
its failure, its reply or queue id made safe.

Functions only, no state: the protocol's hook runner (L{_Wire._run}) calls
them.  Each one that changes what the handler said leaves a log line.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import CoroutineType
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._outcomes import RecipientOutcome, recipient_outcomes
from ._peer import address_text
from ._sanitize import safe_queue_id, safe_reply
from ._session import Envelope
from .fastlog import emit_summary
from .replies import R451_HANDLER_TIMEOUT, R451_LOCAL_ERROR, Reply, SMTPError

__all__ = [
    "HandlerTimedOut",
    "abort_receiver",
    "deadline_over",
    "failure_reply",
    "handler_reply",
    "log_message",
    "message_outcomes",
    "queue_id",
    "tell_abandoned",
]

_log = Logger(namespace="twisted_smtpd.protocol")


class HandlerTimedOut(Exception):
    """A handler hook did not answer within C{Limits.handler_timeout}."""

    def __init__(self, hook: str, timeout: float) -> None:
        super().__init__(f"handler hook {hook} timed out after {timeout} s")
        self.hook = hook
        self.timeout = timeout


def deadline_over(result: Any, deadline: Any, hook: str, timeout: float) -> Any:
    """The hook ended: stop its deadline; if the deadline ended it, say so.

    Once the deadline has fired the hook is over whatever its Deferred then
    gives (its canceller may even succeed): nothing is reported stored.
    """
    if deadline.active():
        deadline.cancel()
        return result
    if isinstance(result, Failure) and not result.check(CancelledError):
        result.cleanFailure()
    return Failure(HandlerTimedOut(hook, timeout))


def handler_reply(reply: Reply, session_id: str) -> Reply:
    """A handler's reply made safe for the wire, a log line if changed."""
    safe, changes = safe_reply(reply)
    if changes:
        _log.warn(
            "smtpd {session_id}: handler reply changed: {changes}",
            session_id=session_id,
            changes="; ".join(changes),
        )
    return safe


def failure_reply(failure: Failure, session_id: str) -> Reply:
    """The handler's SMTPError reply (made safe), or 451 with the failure logged."""
    if failure.check(SMTPError):
        return handler_reply(failure.value.reply, session_id)
    if failure.check(HandlerTimedOut):
        _log.warn(
            "smtpd {session_id}: handler hook {hook} timed out after"
            " {timeout} s: cancelled, answered 451",
            session_id=session_id,
            hook=failure.value.hook,
            timeout=failure.value.timeout,
        )
        return R451_HANDLER_TIMEOUT
    _log.failure(
        "smtpd {session_id}: handler failed",
        failure,
        session_id=session_id,
    )
    return R451_LOCAL_ERROR


def queue_id(value: Any, envelope: Envelope, session_id: str) -> str:
    """The handler's queue id made safe for the 250, or the message id."""
    if not value:
        return envelope.message_id
    value, changes = safe_queue_id(value)
    if changes:
        _log.warn(
            "smtpd {session_id}: handler's queue id changed: {changes}",
            session_id=session_id,
            changes="; ".join(changes),
        )
    return value


def message_outcomes(
    result: Any, envelope: Envelope, session_id: str
) -> list[RecipientOutcome]:
    """The handler's result for each recipient, made safe for the wire.

    A per-recipient failure that is not an L{SMTPError} is logged here.
    """
    if isinstance(result, Mapping):
        result = {
            recipient: _safe_outcome(outcome, envelope, session_id)
            for recipient, outcome in result.items()
        }
    elif result:
        result = queue_id(result, envelope, session_id)
    outcomes = recipient_outcomes(result, envelope.rcpt_tos, envelope.message_id)
    for outcome in outcomes:
        if outcome.unexpected is not None:
            _log.failure(
                "smtpd {session_id}: handler failed for {recipient}",
                Failure(outcome.unexpected),
                session_id=session_id,
                recipient=outcome.recipient,
            )
    return outcomes


def _safe_outcome(outcome: Any, envelope: Envelope, session_id: str) -> Any:
    """One recipient's outcome with its refusal or queue id made safe."""
    if isinstance(outcome, SMTPError):
        return SMTPError(handler_reply(outcome.reply, session_id))
    if isinstance(outcome, BaseException) or not outcome:
        return outcome
    return queue_id(outcome, envelope, session_id)


def abort_receiver(receiver: Any) -> None:
    """C{receiver.abort()}; its failure is logged, not raised."""
    try:
        receiver.abort()
    except Exception:
        _log.failure("smtpd: receiver.abort failed")


def log_message(session_id: str, envelope: Envelope, outcome: str) -> None:
    """The one line per message."""
    rcpt_count = len(envelope.rcpt_tos)
    peer = address_text(envelope.peer)
    # The text is made here in one f-string: twisted.logger's formatter
    # costs about 10 us per {field}. The fields stay in the event.
    emit_summary(
        _log,
        {
            "summary": f"smtpd {session_id} message {envelope.message_id} from"
            f" <{envelope.mail_from}> ({peer}) to {rcpt_count} recipients,"
            f" {envelope.size} bytes: {outcome}",
            "session_id": session_id,
            "peer": peer,
            "message_id": envelope.message_id,
            "mail_from": envelope.mail_from,
            "rcpt_count": rcpt_count,
            "size": envelope.size,
            "outcome": outcome,
        },
    )


def tell_abandoned(hook: Callable[[Envelope], Any], envelope: Envelope) -> None:
    """C{hook(envelope)}: the handler's C{transaction_abandoned}.

    A notice, not a question: nothing waits for it (a Deferred or coroutine
    it returns runs on its own) and nothing it does reaches the client; its
    failure, raised or asynchronous, is logged.
    """
    try:
        result = hook(envelope)
        if isinstance(result, CoroutineType):
            result = Deferred.fromCoroutine(result)
    except Exception:
        _abandon_failed(Failure(), envelope)
        return
    if isinstance(result, Deferred):
        result.addErrback(_abandon_failed, envelope)


def _abandon_failed(failure: Failure, envelope: Envelope) -> None:
    _log.failure(
        "smtpd {session_id}: handler transaction_abandoned failed",
        failure,
        session_id=envelope.session_id,
    )
