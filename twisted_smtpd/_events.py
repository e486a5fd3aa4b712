# -*- test-case-name: tests.test_metrics -*-
"""
What happens in a session, told to whoever watches (metrics, tracing).

The protocol and factory call these methods on C{factory.events} when it is
not C{None}; the default is C{None}, so an unobserved server pays one
attribute check per event.  L{SessionEvents} does nothing: subclass it and
override what you need (L{twisted_smtpd.metrics} does, for Prometheus).
Methods must be cheap and must not raise; they run on the reactor thread.
"""

from __future__ import annotations

__all__ = ["SessionEvents"]


class SessionEvents:
    """Every event the server reports; each method's default does nothing."""

    def connection_refused(self, reason: str) -> None:
        """A client was turned away before a session began.

        C{reason}: C{"max_connections"}, C{"max_connections_per_ip"},
        C{"shutting_down"}, C{"check_client"} or C{"auth_rate_limit"}.
        """

    def session_started(self) -> None:
        """A session began (the greeting was sent)."""

    def session_ended(self, how: str, seconds: float) -> None:
        """A session ended after C{seconds}.

        C{how}: C{"quit"}, C{"timeout"} (idle, a deadline, the TLS handshake
        or the session time limit), C{"lost"} (the client went away),
        C{"closed"} (we closed it: too many errors, AUTH failures, limits),
        C{"shutdown"}.
        """

    def reply_sent(self, code: int) -> None:
        """A reply with this code was sent (once per reply, not per line)."""

    def message_received(self, outcome: str, size: int) -> None:
        """A message transaction ended.

        C{outcome}: C{"accepted"}, C{"refused"} (the handler said 4xx/5xx),
        C{"too_big"}, C{"failed"} (the handler raised or timed out),
        C{"aborted"} (the client went away during DATA/BDAT).  C{size}: the
        bytes of message content received.
        """

    def hook_finished(self, hook: str, seconds: float, ok: bool) -> None:
        """A handler hook completed after C{seconds}.

        C{hook}: C{"check_client"}, C{"check_sender"}, C{"check_recipient"},
        C{"message"} (the receiver's C{finish}, or C{handle_message}).
        C{ok}: it accepted (False: it refused, raised or timed out).
        """

    def tls_handshake(self, ok: bool) -> None:
        """A TLS handshake (STARTTLS or implicit) succeeded or failed."""

    def auth_attempt(self, ok: bool) -> None:
        """An AUTH exchange ended in success or failure."""
