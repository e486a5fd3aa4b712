"""Tests for L{twisted_smtpd._outcomes}: per-recipient results of a message."""

from __future__ import annotations

from twisted_smtpd._outcomes import recipient_outcomes, single_reply
from twisted_smtpd.replies import (
    R451_LOCAL_ERROR,
    R452_INSUFFICIENT_STORAGE,
    Reply,
    SMTPError,
)

RCPTS = ["alice@example.net", "bob@example.net", "carol@example.net"]


def replies(outcomes) -> list[tuple[int, str, str]]:
    return [(o.reply.code, o.reply.enhanced, o.reply.text) for o in outcomes]


def test_plain_none_applies_to_all() -> None:
    outcomes = recipient_outcomes(None, RCPTS, default_id="S1-1")
    assert [(250, "2.0.0", f"<{r}> OK: queued as S1-1") for r in RCPTS] == replies(
        outcomes
    )
    assert all(o.stored for o in outcomes)


def test_plain_queue_id_applies_to_all() -> None:
    outcomes = recipient_outcomes("Q7", RCPTS[:1], default_id="S1-1")
    assert [(250, "2.0.0", "<alice@example.net> OK: queued as Q7")] == replies(outcomes)


def test_plain_refusal_applies_to_all() -> None:
    outcomes = recipient_outcomes(SMTPError(550, "5.7.1", "No"), RCPTS)
    assert [(550, "5.7.1", "No")] * 3 == replies(outcomes)
    assert not any(o.stored for o in outcomes)


def test_mapping_in_rcpt_order() -> None:
    """Each recipient its own reply, in the order given, repeats included."""
    result = {
        "bob@example.net": SMTPError(R452_INSUFFICIENT_STORAGE),
        "alice@example.net": None,
        "carol@example.net": "name-3",
    }
    order = [
        "carol@example.net",
        "bob@example.net",
        "alice@example.net",
        "carol@example.net",
    ]
    outcomes = recipient_outcomes(result, order)
    assert [
        (250, "2.0.0", "<carol@example.net> OK: queued as name-3"),
        (452, "4.3.1", "Insufficient system storage"),
        (250, "2.0.0", "<alice@example.net> OK: delivered"),
        (250, "2.0.0", "<carol@example.net> OK: queued as name-3"),
    ] == replies(outcomes)
    assert [True, False, True, True] == [o.stored for o in outcomes]


def test_missing_and_unexpected_are_451_with_the_error() -> None:
    """A recipient left out, or a value that is some other exception: 451
    4.3.0 (retried, never lost) and the error kept for the log."""
    boom = RuntimeError("boom")
    outcomes = recipient_outcomes({"alice@example.net": boom}, RCPTS[:2])
    assert [R451_LOCAL_ERROR, R451_LOCAL_ERROR] == [o.reply for o in outcomes]
    assert boom is outcomes[0].unexpected
    assert "bob@example.net" in str(outcomes[1].unexpected)


def test_single_reply_all_stored() -> None:
    outcomes = recipient_outcomes({r: f"id-{i}" for i, r in enumerate(RCPTS)}, RCPTS)
    assert Reply(250, "2.0.0", "OK: queued as id-0") == single_reply(outcomes, "S1")


def test_single_reply_first_refusal_wins() -> None:
    """SMTP has one reply: any refused recipient makes it that refusal."""
    result = {
        "alice@example.net": None,
        "bob@example.net": SMTPError(451, "4.2.0", "later"),
        "carol@example.net": SMTPError(550, "5.1.1", "no"),
    }
    reply = single_reply(recipient_outcomes(result, RCPTS), "S1")
    assert Reply(451, "4.2.0", "later") == reply
