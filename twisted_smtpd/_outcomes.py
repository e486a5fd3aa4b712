# -*- test-case-name: tests.test_outcomes -*-
"""
What a handler's result means for each recipient.

C{handle_message} and C{receiver.finish()} may give one result for the whole
message (C{None}, a queue id, or an exception) or a mapping from each
recipient to its own outcome: C{None} or a queue id (stored), or an
L{SMTPError} (refused, with that reply).  LMTP (RFC 2033) sends one reply
per accepted recipient after the data; SMTP has a single reply, so a mapping
folds into one: C{250} only if every recipient was stored, else the first
refusal.  Folding picks the refusal rather than a 250 because a 250 would
lose the refused recipients' copies; the client's retry may deliver the
message twice to those already stored, which LMTP avoids.

This module imports nothing from Twisted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from .replies import (
    R250_QUEUED,
    R250_RECIPIENT_DELIVERED,
    R250_RECIPIENT_QUEUED,
    R451_LOCAL_ERROR,
    Reply,
    SMTPError,
    fill,
)

__all__ = [
    "Outcome",
    "RecipientOutcome",
    "outcome_summary",
    "recipient_outcomes",
    "single_reply",
]

#: what a handler may give for one recipient
Outcome = Union[None, str, SMTPError]


@dataclass(frozen=True)
class RecipientOutcome:
    """One recipient's result of one message.

    @ivar stored: whether it was safely taken (its reply is a 250).
    @ivar unexpected: an error that is not an L{SMTPError}, for the log
        (its reply is C{451 4.3.0}).
    """

    recipient: str
    reply: Reply
    stored: bool
    queue_id: str = ""
    unexpected: Optional[BaseException] = None


class MissingOutcome(Exception):
    """The handler's mapping has no entry for an accepted recipient."""


def recipient_outcomes(
    result: Any, recipients: Sequence[str], default_id: str = ""
) -> list[RecipientOutcome]:
    """One L{RecipientOutcome} per entry of C{recipients}, in order.

    Args:
        result: what the handler gave: a mapping (recipient -> outcome) or one
            outcome for all (C{None}, a queue id, an exception).
        recipients: the accepted recipients in RCPT order (repeats allowed:
            each gets the same outcome).
        default_id: the queue id to report when the handler gave none.
    """
    if isinstance(result, Mapping):
        outcomes = []
        for recipient in recipients:
            try:
                outcome = result[recipient]
            except KeyError:
                outcome = MissingOutcome(
                    f"handler gave no outcome for recipient {recipient!r}"
                )
            outcomes.append(_one(recipient, outcome, default_id))
        return outcomes
    return [_one(recipient, result, default_id) for recipient in recipients]


def _one(recipient: str, outcome: Any, default_id: str) -> RecipientOutcome:
    if isinstance(outcome, SMTPError):
        return RecipientOutcome(recipient, outcome.reply, False)
    if isinstance(outcome, BaseException):
        return RecipientOutcome(recipient, R451_LOCAL_ERROR, False, unexpected=outcome)
    queue_id = str(outcome) if outcome else default_id
    if queue_id:
        reply = fill(R250_RECIPIENT_QUEUED, recipient=recipient, queue_id=queue_id)
    else:
        reply = fill(R250_RECIPIENT_DELIVERED, recipient=recipient)
    return RecipientOutcome(recipient, reply, True, queue_id)


def single_reply(outcomes: Sequence[RecipientOutcome], default_id: str = "") -> Reply:
    """The one SMTP reply for a message: 250 if all stored, else the first refusal."""
    for outcome in outcomes:
        if not outcome.stored:
            return outcome.reply
    queue_id = next((o.queue_id for o in outcomes if o.queue_id), default_id)
    return fill(R250_QUEUED, queue_id=queue_id)


def outcome_summary(stored: int, total: int, per_recipient: bool) -> tuple[str, str]:
    """What the log line and the events say of a message stored for
    C{stored} of C{total} recipients; only with C{per_recipient} replies
    (LMTP) is a partial delivery accepted."""
    if stored == total:
        return "accepted", "accepted"
    if stored and per_recipient:
        return f"accepted for {stored} of {total}", "accepted"
    return "refused", "refused"
