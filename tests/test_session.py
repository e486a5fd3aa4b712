"""Tests for L{twisted_smtpd._session}: the state table, gates and transitions."""

from __future__ import annotations

from typing import Optional

import pytest

from twisted_smtpd._session import (
    ALLOWED,
    BEFORE_AUTH,
    BEFORE_TLS,
    KNOWN_VERBS,
    Envelope,
    Limits,
    Session,
    State,
    TLSInfo,
)
from twisted_smtpd.replies import (
    R421_TOO_MANY_ERRORS,
    R452_TOO_MANY_RECIPIENTS,
    R503_HELO_FIRST,
    R503_NESTED_MAIL,
    R503_RCPT_FIRST,
    R530_AUTH_REQUIRED,
    R530_TLS_REQUIRED,
    R552_TOO_BIG,
    Reply,
    SMTPError,
    fill,
)

TLS = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384")
VERBS = sorted(KNOWN_VERBS)
ANYTIME = {"NOOP", "QUIT", "RSET", "HELO", "EHLO", "VRFY", "HELP", "EXPN"}


def need_mail(verb: str) -> Reply:
    return Reply(503, "5.5.1", f"Need MAIL before {verb}")


def in_transaction(verb: str) -> Reply:
    return Reply(503, "5.5.1", f"{verb} not allowed during a mail transaction")


def in_bdat(verb: str) -> Reply:
    return Reply(503, "5.5.1", f"{verb} not allowed during BDAT")


BETWEEN_CHUNKS = {"BDAT", "RSET", "NOOP", "QUIT", "HELO", "EHLO"}


#: the expected answer of check() for each state and known verb, written out
#: independently of the module's table: None = may run, else the refusal
EXPECTED: dict[State, dict[str, Optional[Reply]]] = {
    State.CONNECTED: {
        **{verb: None for verb in ANYTIME | {"STARTTLS", "XCLIENT"}},
        "MAIL": R503_HELO_FIRST,
        "RCPT": R503_HELO_FIRST,
        "DATA": R503_HELO_FIRST,
        "BDAT": R503_HELO_FIRST,
        "AUTH": R503_HELO_FIRST,
    },
    State.GREETED: {
        **{verb: None for verb in ANYTIME | {"STARTTLS", "AUTH", "MAIL", "XCLIENT"}},
        "RCPT": need_mail("RCPT"),
        "DATA": need_mail("DATA"),
        "BDAT": need_mail("BDAT"),
    },
    State.MAIL: {
        **{verb: None for verb in ANYTIME | {"RCPT"}},
        "MAIL": R503_NESTED_MAIL,
        "DATA": R503_RCPT_FIRST,
        "BDAT": Reply(503, "5.5.1", "Need RCPT before BDAT"),
        "STARTTLS": in_transaction("STARTTLS"),
        "AUTH": in_transaction("AUTH"),
        # Postfix XCLIENT_README: not between MAIL and the end of the message.
        "XCLIENT": in_transaction("XCLIENT"),
    },
    State.RCPT: {
        **{verb: None for verb in ANYTIME | {"RCPT", "DATA", "BDAT"}},
        "MAIL": R503_NESTED_MAIL,
        "STARTTLS": in_transaction("STARTTLS"),
        "AUTH": in_transaction("AUTH"),
        # Postfix XCLIENT_README: not between MAIL and the end of the message.
        "XCLIENT": in_transaction("XCLIENT"),
    },
    State.CHUNKING: {
        verb: None if verb in BETWEEN_CHUNKS else in_bdat(verb)
        for verb in ANYTIME
        | {"STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "BDAT", "EXPN", "XCLIENT"}
    },
}


def make_session(limits: Optional[Limits] = None, **kwargs: object) -> Session:
    return Session("S1", ("192.0.2.1", 4321), limits or Limits(), **kwargs)  # type: ignore[arg-type]


def session_in(state: State, **kwargs: object) -> Session:
    """A session driven through the public transitions into C{state}."""
    session = make_session(**kwargs)
    if state is not State.CONNECTED:
        session.greeted("client.example", esmtp=True)
    if state in (State.MAIL, State.RCPT, State.DATA, State.CHUNKING):
        session.mail(session.new_envelope())
    if state in (State.RCPT, State.DATA, State.CHUNKING):
        session.rcpt("rcpt@example.com", {})
    if state in (State.DATA, State.CHUNKING):
        session.start_data(chunked=state is State.CHUNKING)
    assert state is session.state
    return session


class TestTable:
    """The ALLOWED table itself."""

    def test_every_state(self) -> None:
        """The table has an entry for every state."""
        assert set(State) == set(ALLOWED)

    def test_only_known_verbs(self) -> None:
        """The table mentions only verbs the server knows."""
        for verbs in ALLOWED.values():
            assert set() == verbs - KNOWN_VERBS

    @pytest.mark.parametrize("verb", VERBS)
    def test_every_verb_reachable(self, verb: str) -> None:
        """Every known verb may run in some state (else its handler is dead code)."""
        assert any(verb in verbs for verbs in ALLOWED.values())

    def test_known_verbs(self) -> None:
        """The server knows the RFC 5321 verbs plus STARTTLS, AUTH, EXPN, XCLIENT."""
        expected = {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT"}
        expected |= {"VRFY", "HELP", "STARTTLS", "AUTH", "EXPN", "BDAT", "XCLIENT"}
        assert expected == set(KNOWN_VERBS)

    def test_nothing_during_data(self) -> None:
        """No command runs while the message is being read."""
        assert frozenset() == ALLOWED[State.DATA]

    def test_gate_sets(self) -> None:
        """The TLS and AUTH exemptions are what RFC 3207 and 4954 call for."""
        # XCLIENT too: a proxy names the client before any TLS (as in Postfix);
        # LHLO is LMTP's EHLO (RFC 2033 4.1).
        before_tls = {"NOOP", "EHLO", "HELO", "LHLO", "STARTTLS", "QUIT", "RSET"}
        assert before_tls | {"XCLIENT"} == set(BEFORE_TLS)
        assert BEFORE_TLS | {"AUTH", "HELP"} == set(BEFORE_AUTH)


class TestCheck:
    """check() for every state and known verb."""

    @pytest.mark.parametrize("verb", VERBS)
    @pytest.mark.parametrize("state", list(State), ids=[s.name for s in State])
    def test_matches_allowed_table(self, state: State, verb: str) -> None:
        """check() lets a verb run exactly when the table allows it, else says 503."""
        reply = session_in(state).check(verb)
        if verb in ALLOWED[state]:
            assert None is reply
        else:
            assert reply is not None
            assert (503, "5.5.1") == (reply.code, reply.enhanced)

    @pytest.mark.parametrize("verb", VERBS)
    @pytest.mark.parametrize(
        "state", [s for s in State if s is not State.DATA], ids=lambda s: s.name
    )
    def test_expected_reply(self, state: State, verb: str) -> None:
        """check() gives the specific reply the spec table expects."""
        assert EXPECTED[state][verb] == session_in(state).check(verb)

    def test_expected_covers_everything(self) -> None:
        """The spec table in this test covers every known verb in each line state."""
        for verbs in EXPECTED.values():
            assert KNOWN_VERBS == set(verbs)

    def test_check_changes_nothing(self) -> None:
        """check() only answers: it does not move the state or count errors."""
        session = session_in(State.GREETED)
        session.check("DATA")
        assert (State.GREETED, 0) == (session.state, session.bad_commands)


class TestTLSRequired:
    """The RFC 3207 gate: 530 5.7.0 before STARTTLS."""

    @pytest.mark.parametrize("verb", VERBS)
    @pytest.mark.parametrize(
        "state", [State.CONNECTED, State.GREETED], ids=lambda s: s.name
    )
    def test_gate(self, state: State, verb: str) -> None:
        """Only the exempt verbs escape 530 5.7.0 before TLS."""
        reply = session_in(state, tls_required=True).check(verb)
        if verb in {"NOOP", "EHLO", "HELO", "STARTTLS", "QUIT", "RSET", "XCLIENT"}:
            assert EXPECTED[state][verb] == reply
        else:
            assert R530_TLS_REQUIRED == reply

    def test_reply(self) -> None:
        """The refusal is 530 5.7.0."""
        reply = session_in(State.GREETED, tls_required=True).check("MAIL")
        assert reply is not None
        assert (530, "5.7.0") == (reply.code, reply.enhanced)

    def test_before_helo(self) -> None:
        """Before HELO the TLS gate speaks first: 530, not 503."""
        assert R530_TLS_REQUIRED == make_session(tls_required=True).check("MAIL")

    @pytest.mark.parametrize("verb", VERBS)
    def test_open_after_starttls(self, verb: str) -> None:
        """After STARTTLS and EHLO the gate is open and the table decides."""
        session = make_session(tls_required=True)
        session.tls_started(TLS)
        session.greeted("client.example", esmtp=True)
        assert EXPECTED[State.GREETED][verb] == session.check(verb)

    def test_open_with_implicit_tls(self) -> None:
        """A connection that is TLS from the start is never gated."""
        session = make_session(tls_required=True, tls_info=TLS)
        session.greeted("client.example", esmtp=True)
        assert None is session.check("MAIL")

    def test_not_required(self) -> None:
        """Without tls_required plaintext commands are allowed."""
        assert None is session_in(State.GREETED).check("MAIL")


class TestAuthRequired:
    """The RFC 4954 gate: 530 5.7.0 before AUTH."""

    @pytest.mark.parametrize("verb", VERBS)
    def test_gate(self, verb: str) -> None:
        """After EHLO only exempt verbs and sequence errors escape 530 5.7.0."""
        reply = session_in(State.GREETED, auth_required=True).check(verb)
        exempt = {"NOOP", "EHLO", "HELO", "STARTTLS", "QUIT", "RSET", "AUTH", "HELP"}
        exempt.add("XCLIENT")
        sequence_error = EXPECTED[State.GREETED][verb]
        if verb in exempt or sequence_error is not None:
            assert sequence_error == reply
        else:
            assert R530_AUTH_REQUIRED == reply

    def test_mail_refused(self) -> None:
        """MAIL before AUTH is 530 5.7.0 Authentication required."""
        reply = session_in(State.GREETED, auth_required=True).check("MAIL")
        assert R530_AUTH_REQUIRED == reply
        assert reply is not None and (530, "5.7.0") == (reply.code, reply.enhanced)

    def test_sequence_first(self) -> None:
        """Before HELO, MAIL is a sequence error (503), not an AUTH one."""
        assert R503_HELO_FIRST == make_session(auth_required=True).check("MAIL")

    def test_open_after_auth(self) -> None:
        """Once authenticated MAIL may run."""
        session = session_in(State.GREETED, auth_required=True)
        session.authenticated("alice")
        assert (None, "alice") == (session.check("MAIL"), session.auth)

    def test_closed_again_after_starttls(self) -> None:
        """STARTTLS forgets the authentication, so the gate closes again."""
        session = session_in(State.GREETED, auth_required=True)
        session.authenticated("alice")
        session.tls_started(TLS)
        session.greeted("client.example", esmtp=True)
        assert R530_AUTH_REQUIRED == session.check("MAIL")

    def test_tls_gate_first(self) -> None:
        """With both required, the TLS gate comes first, even for AUTH."""
        session = session_in(State.GREETED, auth_required=True, tls_required=True)
        assert (R530_TLS_REQUIRED, R530_TLS_REQUIRED) == (
            session.check("MAIL"),
            session.check("AUTH"),
        )

    def test_both_gates_in_turn(self) -> None:
        """After STARTTLS the AUTH gate is the one that answers."""
        session = make_session(auth_required=True, tls_required=True)
        session.tls_started(TLS)
        session.greeted("client.example", esmtp=True)
        assert (R530_AUTH_REQUIRED, None) == (
            session.check("MAIL"),
            session.check("AUTH"),
        )


class TestBadCommands:
    """The budget of bad commands."""

    def test_budget(self) -> None:
        """The last allowed bad command gets the 421 4.7.0 to close with."""
        session = make_session(Limits(max_bad_commands=3))
        assert [None, None, R421_TOO_MANY_ERRORS] == [
            session.bad_command() for _ in range(3)
        ]

    def test_stays_over_budget(self) -> None:
        """Past the budget every further bad command also gets 421."""
        session = make_session(Limits(max_bad_commands=2))
        results = [session.bad_command() for _ in range(4)]
        assert [
            None,
            R421_TOO_MANY_ERRORS,
            R421_TOO_MANY_ERRORS,
            R421_TOO_MANY_ERRORS,
        ] == results

    def test_default_budget(self) -> None:
        """By default the tenth bad command closes the session."""
        session = make_session()
        results = [session.bad_command() for _ in range(10)]
        assert [None] * 9 + [R421_TOO_MANY_ERRORS] == results

    def test_counts(self) -> None:
        """Each bad command is counted."""
        session = make_session()
        for _ in range(4):
            session.bad_command()
        assert 4 == session.bad_commands

    def test_reply(self) -> None:
        """The closing reply is 421 4.7.0 and names the host once filled."""
        reply = fill(R421_TOO_MANY_ERRORS, hostname="mx.test")
        assert (
            Reply(421, "4.7.0", "mx.test Too many errors, closing connection") == reply
        )

    def test_not_reset_by_rset(self) -> None:
        """RSET does not give the client a fresh budget."""
        session = make_session(Limits(max_bad_commands=2))
        session.bad_command()
        session.greeted("client.example", esmtp=True)
        session.reset()
        assert R421_TOO_MANY_ERRORS == session.bad_command()


class TestTransitions:
    """greeted(), reset(), tls_started() and the transaction steps."""

    def test_initial(self) -> None:
        """A new session is connected, ungreeted, without TLS, AUTH or envelope."""
        session = make_session()
        assert (State.CONNECTED, "", False, None, None, None, 0) == (
            session.state,
            session.helo,
            session.esmtp,
            session.tls,
            session.auth,
            session.envelope,
            session.bad_commands,
        )

    @pytest.mark.parametrize("state", list(State), ids=[s.name for s in State])
    def test_greeted(self, state: State) -> None:
        """HELO/EHLO from any state greets afresh and aborts any transaction."""
        session = session_in(state)
        session.greeted("other.example", esmtp=False)
        assert (State.GREETED, "other.example", False, None) == (
            session.state,
            session.helo,
            session.esmtp,
            session.envelope,
        )

    def test_greeted_keeps_tls_and_auth(self) -> None:
        """A new EHLO keeps TLS and authentication."""
        session = make_session(tls_info=TLS)
        session.greeted("client.example", esmtp=True)
        session.authenticated("alice")
        session.greeted("again.example", esmtp=True)
        assert (TLS, "alice") == (session.tls, session.auth)

    @pytest.mark.parametrize(
        "state",
        [State.GREETED, State.MAIL, State.RCPT, State.DATA],
        ids=lambda s: s.name,
    )
    def test_reset(self, state: State) -> None:
        """RSET drops the envelope and keeps the greeting."""
        session = session_in(state)
        session.reset()
        assert (State.GREETED, None, "client.example", True) == (
            session.state,
            session.envelope,
            session.helo,
            session.esmtp,
        )

    def test_reset_before_helo(self) -> None:
        """RSET before HELO leaves the session waiting for HELO."""
        session = make_session()
        session.reset()
        assert State.CONNECTED == session.state

    def test_reset_keeps_auth_and_tls(self) -> None:
        """RSET keeps TLS and authentication."""
        session = make_session(tls_info=TLS)
        session.greeted("client.example", esmtp=True)
        session.authenticated("alice")
        session.reset()
        assert (TLS, "alice") == (session.tls, session.auth)

    @pytest.mark.parametrize("state", list(State), ids=[s.name for s in State])
    def test_tls_started_forgets(self, state: State) -> None:
        """STARTTLS forgets greeting, ESMTP, AUTH and envelope (RFC 3207 4.2)."""
        session = session_in(state)
        session.authenticated("alice")
        session.tls_started(TLS)
        assert (State.CONNECTED, "", False, None, None, TLS) == (
            session.state,
            session.helo,
            session.esmtp,
            session.auth,
            session.envelope,
            session.tls,
        )

    def test_after_tls_needs_helo(self) -> None:
        """After STARTTLS, MAIL needs a new EHLO first."""
        session = session_in(State.GREETED)
        session.tls_started(TLS)
        assert R503_HELO_FIRST == session.check("MAIL")

    def test_mail(self) -> None:
        """MAIL opens the transaction with the envelope given."""
        session = session_in(State.GREETED)
        envelope = session.new_envelope()
        session.mail(envelope)
        assert (State.MAIL, envelope) == (session.state, session.envelope)

    def test_rcpt(self) -> None:
        """RCPT adds the recipient and its parameters, in order."""
        session = session_in(State.MAIL)
        session.rcpt("a@example.com", {})
        session.rcpt("b@example.com", {"X": "1"})
        envelope = session.envelope
        assert envelope is not None
        assert (State.RCPT, ["a@example.com", "b@example.com"], [{}, {"X": "1"}]) == (
            session.state,
            envelope.rcpt_tos,
            envelope.rcpt_options,
        )

    def test_start_data(self) -> None:
        """DATA moves to the DATA state and numbers the message."""
        session = session_in(State.RCPT)
        envelope = session.start_data()
        assert (State.DATA, session.envelope, "S1-1", 1) == (
            session.state,
            envelope,
            envelope.message_id,
            session.messages,
        )

    def test_message_ids_increase(self) -> None:
        """Each message of a session gets the next number."""
        session = session_in(State.GREETED)
        ids = []
        for _ in range(3):
            session.mail(session.new_envelope())
            session.rcpt("a@example.com", {})
            ids.append(session.start_data().message_id)
            session.reset()
        assert ["S1-1", "S1-2", "S1-3"] == ids

    def test_new_envelope(self) -> None:
        """A new envelope carries the session's facts and is otherwise empty."""
        session = make_session(tls_info=TLS)
        session.greeted("client.example", esmtp=True)
        session.authenticated("alice")
        envelope = session.new_envelope()
        assert (
            Envelope(
                session_id="S1",
                peer=("192.0.2.1", 4321),
                helo="client.example",
                esmtp=True,
                tls=TLS,
                auth="alice",
            )
            == envelope
        )
        assert ("", {}, [], [], b"", 0, "") == (
            envelope.mail_from,
            envelope.mail_options,
            envelope.rcpt_tos,
            envelope.rcpt_options,
            envelope.content,
            envelope.size,
            envelope.message_id,
        )

    def test_new_envelope_fields_in_order(self) -> None:
        """new_envelope stores every field of a keyword-built Envelope: each
        lands where it belongs (every field distinct), in the same order, and
        nothing else is set."""
        session = Session("S1", ("192.0.2.1", 4321), Limits(), tls_info=TLS, lmtp=True)
        session.greeted("client.example", esmtp=True)
        session.authenticated("alice")
        session.peer_name = "name.example"
        options = {"SIZE": "10"}
        envelope = session.begin("a@example.org", options)
        expected = Envelope(
            session_id="S1",
            peer=("192.0.2.1", 4321),
            helo="client.example",
            esmtp=True,
            tls=TLS,
            auth="alice",
            peer_name="name.example",
            mail_from="a@example.org",
            mail_options=options,
            lmtp=True,
        )
        assert vars(expected) == vars(envelope)
        assert list(vars(expected)) == list(vars(envelope))  # the same order
        assert envelope.mail_options is options
        assert type(envelope) is Envelope

    def test_envelopes_independent(self) -> None:
        """Envelopes do not share their lists and dicts."""
        session = session_in(State.GREETED)
        first, second = session.new_envelope(), session.new_envelope()
        first.rcpt_tos.append("a@example.com")
        first.mail_options["SIZE"] = "1"
        assert ([], {}) == (second.rcpt_tos, second.mail_options)


class TestRecipientLimit:
    """max_recipients: 452 4.5.3 (RFC 5321 4.5.3.1.10)."""

    def test_limit(self) -> None:
        """Recipients up to the limit pass; the next is 452 4.5.3."""
        session = session_in(State.GREETED, limits=Limits(max_recipients=3))
        session.mail(session.new_envelope())
        for index in range(3):
            session.check_recipient_count()
            session.rcpt(f"r{index}@example.com", {})
        with pytest.raises(SMTPError) as info:
            session.check_recipient_count()
        assert R452_TOO_MANY_RECIPIENTS == info.value.reply
        assert (452, "4.5.3") == (info.value.reply.code, info.value.reply.enhanced)

    def test_limit_per_transaction(self) -> None:
        """A new transaction gets a fresh allowance."""
        session = session_in(State.GREETED, limits=Limits(max_recipients=1))
        session.mail(session.new_envelope())
        session.rcpt("a@example.com", {})
        session.reset()
        session.mail(session.new_envelope())
        session.check_recipient_count()  # does not raise
        assert [] == session.envelope.rcpt_tos  # type: ignore[union-attr]


class TestSizeLimit:
    """SIZE= over the limit: 552 5.3.4 (RFC 1870)."""

    @pytest.mark.parametrize(
        "params",
        [{}, {"SIZE": "0"}, {"SIZE": "1000"}, {"SIZE": None}, {"BODY": "8BITMIME"}],
    )
    def test_within(self, params: dict) -> None:
        """No SIZE, or SIZE up to the limit, is fine."""
        make_session(Limits(max_message_size=1000)).check_size(params)

    @pytest.mark.parametrize("size", ["1001", "99999999999999999999"])
    def test_over(self, size: str) -> None:
        """A declared SIZE over the limit is 552 5.3.4."""
        with pytest.raises(SMTPError) as info:
            make_session(Limits(max_message_size=1000)).check_size({"SIZE": size})
        assert R552_TOO_BIG == info.value.reply
        assert (552, "5.3.4") == (info.value.reply.code, info.value.reply.enhanced)

    def test_unlimited(self) -> None:
        """With max_message_size 0 any SIZE is fine."""
        make_session(Limits(max_message_size=0)).check_size({"SIZE": "9" * 20})


class TestLimits:
    """The Limits value."""

    def test_defaults(self) -> None:
        """Defaults follow RFC 5321 minimums and common practice."""
        limits = Limits()
        assert (33_554_432, 100, 512, 10) == (
            limits.max_message_size,
            limits.max_recipients,
            limits.max_command_line,
            limits.max_bad_commands,
        )

    @pytest.mark.parametrize(
        "verb, expected",
        [
            ("MAIL", 2000),
            ("RCPT", 2000),
            ("AUTH", 3000),
            ("EHLO", 100),
            ("NOOP", 100),
            ("", 100),
        ],
    )
    def test_line_limit(self, verb: str, expected: int) -> None:
        """MAIL/RCPT get the parameter limit, AUTH its own, others the command one."""
        limits = Limits(
            max_command_line=100, max_parameter_line=2000, max_auth_line=3000
        )
        assert expected == limits.line_limit(verb)

    @pytest.mark.parametrize(
        "sizes", [(100, 2000, 3000), (5000, 200, 300), (10, 20, 4000)]
    )
    def test_max_line(self, sizes: tuple[int, int, int]) -> None:
        """The reader must buffer the longest of the three line limits."""
        command, parameter, auth = sizes
        limits = Limits(
            max_command_line=command, max_parameter_line=parameter, max_auth_line=auth
        )
        assert max(sizes) == limits.max_line

    @pytest.mark.parametrize(
        "sizes", [(100, 2000, 3000), (5000, 200, 300), (500, 4000, 20)]
    )
    def test_shortest_line(self, sizes: tuple[int, int, int]) -> None:
        """No verb's limit is under shortest_line (lines within it skip the lookup)."""
        command, parameter, auth = sizes
        limits = Limits(
            max_command_line=command, max_parameter_line=parameter, max_auth_line=auth
        )
        assert min(sizes) == limits.shortest_line
        for verb in ("MAIL", "RCPT", "AUTH", "NOOP", "XFOO"):
            assert limits.line_limit(verb) >= limits.shortest_line

    def test_frozen(self) -> None:
        """Limits are immutable."""
        with pytest.raises(AttributeError):
            Limits().max_recipients = 5  # type: ignore[misc]


class TestProtocolName:
    """The WITH keyword of the Received header (RFC 3848, RFC 6531 3.7.3)."""

    @pytest.mark.parametrize(
        "esmtp, smtputf8, tls, auth, expected",
        [
            (False, False, False, False, "SMTP"),
            (False, False, True, False, "SMTP"),
            (False, False, False, True, "SMTP"),
            (True, False, False, False, "ESMTP"),
            (True, False, True, False, "ESMTPS"),
            (True, False, False, True, "ESMTPA"),
            (True, False, True, True, "ESMTPSA"),
            (True, True, False, False, "UTF8SMTP"),
            (True, True, True, False, "UTF8SMTPS"),
            (True, True, False, True, "UTF8SMTPA"),
            (True, True, True, True, "UTF8SMTPSA"),
        ],
    )
    def test_protocol_name(
        self, esmtp: bool, smtputf8: bool, tls: bool, auth: bool, expected: str
    ) -> None:
        """The keyword reflects EHLO, SMTPUTF8, TLS and AUTH."""
        envelope = Envelope(
            session_id="S1",
            peer=None,
            helo="client.example",
            esmtp=esmtp,
            tls=TLS if tls else None,
            auth="alice" if auth else None,
            mail_options={"SMTPUTF8": None} if smtputf8 else {"SIZE": "10"},
        )
        assert expected == envelope.protocol_name

    @pytest.mark.parametrize(
        "options, expected", [({}, False), ({"SMTPUTF8": None}, True)]
    )
    def test_smtputf8(self, options: dict, expected: bool) -> None:
        """smtputf8 is whether MAIL carried the SMTPUTF8 parameter."""
        envelope = Envelope("S1", None, "h", True, None, None, mail_options=options)
        assert expected == envelope.smtputf8

    def test_from_session(self) -> None:
        """An envelope made by an EHLO session over TLS with AUTH is ESMTPSA."""
        session = make_session(tls_info=TLS)
        session.greeted("client.example", esmtp=True)
        session.authenticated("alice")
        assert "ESMTPSA" == session.new_envelope().protocol_name

    def test_from_helo_session(self) -> None:
        """An envelope made after plain HELO is SMTP."""
        session = make_session()
        session.greeted("client.example", esmtp=False)
        assert "SMTP" == session.new_envelope().protocol_name
