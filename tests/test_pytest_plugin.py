"""The pytest plugin, run the way users run it: pytest in a subprocess.

Each test writes a small test module, runs pytest on it in a fresh process
(the plugin's thread mode must start from nothing, and pytest-twisted must
own that process's reactor), and checks the outcome of every inner test.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
# The tree's plugin, whether or not an installed copy's entry point exists.
PLUGIN = ("-p", "no:twisted_smtpd", "-p", "twisted_smtpd.pytest_plugin")


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """Run pytest with the plugin in a subprocess; returns the RunResult."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), path])))
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)

    def run_pytest(*args: str, plugin: bool = True) -> pytest.RunResult:
        options = [*(PLUGIN if plugin else ()), "-p", "no:cacheprovider", "-v"]
        return pytester.runpytest_subprocess(*options, *args, timeout=120)

    return run_pytest


def passed(result: pytest.RunResult, *names: str) -> None:
    """Every named inner test passed, and nothing else failed."""
    text = result.stdout.str()
    for name in names:
        assert f"::{name} PASSED" in text, text
    result.assert_outcomes(passed=len(names))


SYNC_TESTS = """
import asyncio, smtplib, sys
from email.message import EmailMessage

import pytest

def test_plain_smtplib(smtpd):
    assert smtpd.host == "127.0.0.1" and smtpd.port > 0
    assert smtpd.threaded
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        client.sendmail(
            "ann@example.org",
            ["bob@example.org", "cy@example.org"],
            b"Subject: hello\\r\\nTo: bob@example.org\\r\\n\\r\\nbody\\r\\n",
        )
    [message] = smtpd.wait_for(1, timeout=5)
    assert message["Subject"] == "hello"
    assert message.get_content() == "body\\n"
    assert message.envelope.mail_from == "ann@example.org"
    assert message.envelope.rcpt_tos == ["bob@example.org", "cy@example.org"]
    assert smtpd.messages == [message]
    assert "C: QUIT" in smtpd.transcript and "S: 221" in smtpd.transcript

def test_fresh_per_test_and_clear(smtpd, smtpd_factory):
    assert smtpd.messages == [] and smtpd.sessions == []
    other = smtpd_factory()
    assert other.port != smtpd.port
    for server in (smtpd, other):
        with smtplib.SMTP(server.host, server.port) as client:
            client.sendmail("a@x.test", ["b@x.test"], b"Subject: 1\\r\\n\\r\\n1\\r\\n")
    assert len(smtpd.wait_for(1)) == 1 and len(other.wait_for(1)) == 1
    smtpd.clear()
    assert smtpd.messages == [] and smtpd.transcript == ""
    assert len(other.messages) == 1

def test_wait_for_times_out_with_a_reason(smtpd):
    with pytest.raises(TimeoutError, match=r"for 2 message\\(s\\).*got 0"):
        smtpd.wait_for(2, timeout=0.2)

def test_wait_for_match(smtpd):
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        for n in range(3):
            client.sendmail("a@x.test", ["b@x"], f"Subject: m{n}\\r\\n\\r\\nx\\r\\n")
    [found] = smtpd.wait_for(1, match=lambda m: m["Subject"] == "m2")
    assert found["Subject"] == "m2"

def test_aiosmtplib_in_its_own_loop(smtpd):
    import aiosmtplib
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@x.test", "b@x.test", "aio"
    message.set_content("hi")
    asyncio.run(aiosmtplib.send(message, hostname=smtpd.host, port=smtpd.port))
    assert smtpd.wait_for(1)[0]["Subject"] == "aio"

def test_no_global_reactor_installed(smtpd):
    # thread mode runs a private reactor: the user's global reactor is free
    assert "twisted.internet.reactor" not in sys.modules

@pytest.mark.smtpd(max_recipients=1, max_message_size=100)
def test_marker_options(smtpd):
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == "100"
        client.mail("a@x.test")
        assert client.rcpt("b@x.test")[0] == 250
        assert client.rcpt("c@x.test")[0] == 452
"""


def test_thread_mode_without_pytest_twisted(run, pytester):
    """Synchronous tests with no reactor anywhere: the background thread."""
    pytester.makepyfile(test_sync=SYNC_TESTS)
    result = run("-p", "no:twisted", "-W", "error")
    passed(
        result,
        "test_plain_smtplib",
        "test_fresh_per_test_and_clear",
        "test_wait_for_times_out_with_a_reason",
        "test_wait_for_match",
        "test_aiosmtplib_in_its_own_loop",
        "test_no_global_reactor_installed",
        "test_marker_options",
    )


FRAMEWORK_TESTS = """
import pytest

@pytest.mark.smtpd(auth="any")
def test_django_smtp_backend(smtpd):
    from django.conf import settings
    settings.configure(
        EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
        EMAIL_HOST=smtpd.host, EMAIL_PORT=smtpd.port,
        EMAIL_HOST_USER="app", EMAIL_HOST_PASSWORD="secret",
    )
    from django.core import mail
    smtpd.fail("rcpt", 550, "5.1.1", "No such user", match="^gone@")
    sent = mail.send_mass_mail([
        ("Welcome", "Hello Ann", "app@example.org", ["ann@example.org"]),
        ("Welcome", "Hello?", "app@example.org", ["gone@example.org"]),
    ], fail_silently=True)
    assert sent == 1
    [message] = smtpd.wait_for(1)
    assert message["Subject"] == "Welcome"
    assert message.envelope.rcpt_tos == ["ann@example.org"]
    assert message.envelope.auth == "app"  # Django logged in

def test_flask_mail(smtpd):
    from flask import Flask
    from flask_mail import Mail, Message
    app = Flask(__name__)
    app.config.update(MAIL_SERVER=smtpd.host, MAIL_PORT=smtpd.port,
                      MAIL_DEFAULT_SENDER="app@example.org")
    mail = Mail(app)
    with app.app_context():
        mail.send(Message("Contact form", recipients=["ann@example.org"],
                          body="hello"))
    [message] = smtpd.wait_for(1)
    assert message["Subject"] == "Contact form"
    assert message.get_content().strip() == "hello"
"""


def test_django_and_flask_mail(run, pytester):
    """Their SMTP backends, unchanged, against the fixture (thread mode)."""
    pytest.importorskip("django")
    pytest.importorskip("flask_mail")
    pytester.makepyfile(test_frameworks=FRAMEWORK_TESTS)
    passed(run("-p", "no:twisted"), "test_django_smtp_backend", "test_flask_mail")


TWISTED_TESTS = """
import smtplib

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.mail.smtp import sendmail


@pytest_twisted.inlineCallbacks
def test_inline_callbacks_uses_the_running_reactor(smtpd):
    assert not smtpd.threaded and smtpd.reactor is reactor
    from twisted_smtpd import testserver
    assert testserver._thread is None  # no background thread was started
    yield sendmail(smtpd.host, "a@x.test", ["b@x.test"],
                   b"Subject: twisted\\r\\n\\r\\nx\\r\\n", port=smtpd.port)
    [message] = yield smtpd.wait_for(1, timeout=5)
    assert message["Subject"] == "twisted"


def test_sync_test_under_pytest_twisted(smtpd):
    # pytest-twisted runs this body inside its reactor: the server cannot
    # share it, so it runs in the background thread.
    assert smtpd.threaded
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        client.sendmail("a@x.test", ["b@x.test"], b"Subject: sync\\r\\n\\r\\nx\\r\\n")
    assert smtpd.wait_for(1)[0]["Subject"] == "sync"


@pytest_twisted.ensureDeferred
async def test_async_def(smtpd):
    assert not smtpd.threaded
    smtpd.fail("rcpt", 550, "5.1.1", "No such user here", match="^nobody@")
    with pytest.raises(Exception) as refused:
        await sendmail(smtpd.host, "a@x.test", ["nobody@x.test"],
                       b"Subject: x\\r\\n\\r\\nx\\r\\n", port=smtpd.port)
    assert "No such user here" in str(refused.value)
    await sendmail(smtpd.host, "a@x.test", ["somebody@x.test"],
                   b"Subject: ok\\r\\n\\r\\nx\\r\\n", port=smtpd.port)
    messages = await smtpd.wait_for(1)
    assert messages[0].envelope.rcpt_tos == ["somebody@x.test"]


@pytest_twisted.inlineCallbacks
def test_wait_for_timeout_in_the_reactor(smtpd):
    with pytest.raises(TimeoutError):
        yield smtpd.wait_for(1, timeout=0.1)
"""


def test_pytest_twisted_modes(run, pytester):
    """Under pytest-twisted: sync tests get the thread, async ones the reactor."""
    pytester.makepyfile(test_twisted=TWISTED_TESTS)
    result = run("-W", "error::pytest.PytestUnraisableExceptionWarning")
    passed(
        result,
        "test_inline_callbacks_uses_the_running_reactor",
        "test_sync_test_under_pytest_twisted",
        "test_async_def",
        "test_wait_for_timeout_in_the_reactor",
    )


TLS_TESTS = """
import smtplib, socket, ssl

import pytest

@pytest.mark.smtpd(tls="starttls", require_tls=True, auth={"ann": "s3cret"},
                   require_auth=True)
def test_starttls_verified_and_auth(smtpd):
    with smtplib.SMTP("localhost", smtpd.port) as client:
        client.ehlo()
        assert client.mail("a@x.test")[0] == 530  # TLS first
        client.rset()
        client.starttls(context=smtpd.ssl_context)  # verifies chain + name
        client.ehlo()
        assert client.mail("a@x.test")[0] == 530  # AUTH first
        client.rset()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("ann", "wrong")
        client.login("ann", "s3cret")
        client.sendmail("a@x.test", ["b@x.test"], b"Subject: tls\\r\\n\\r\\nx\\r\\n")
    [message] = smtpd.wait_for(1)
    assert message.envelope.auth == "ann"
    assert message.envelope.tls is not None
    assert "STARTTLS: TLS handshake" in smtpd.transcript
    # the transcript is above TLS: the dialogue after STARTTLS is readable
    assert "C: AUTH PLAIN" in smtpd.transcript

def test_implicit_tls_by_ip_address(smtpd_factory):
    smtpd = smtpd_factory(tls="implicit")
    with open(smtpd.ca_path) as file:
        assert "BEGIN CERTIFICATE" in file.read()
    with smtplib.SMTP_SSL(smtpd.host, smtpd.port, context=smtpd.ssl_context) as client:
        client.sendmail("a@x.test", ["b@x.test"], b"Subject: ssl\\r\\n\\r\\nx\\r\\n")
    assert smtpd.wait_for(1)[0].envelope.tls.protocol.startswith("TLS")

def test_verification_really_checks(smtpd_factory):
    smtpd = smtpd_factory(tls="implicit")
    with pytest.raises(ssl.SSLCertVerificationError):  # an unknown CA
        smtplib.SMTP_SSL(smtpd.host, smtpd.port, context=ssl.create_default_context())
    raw = socket.create_connection((smtpd.host, smtpd.port))
    with pytest.raises(ssl.SSLCertVerificationError):  # a name not in it
        smtpd.ssl_context.wrap_socket(raw, server_hostname="mx.example.org")
    raw.close()

def test_accept_any_credentials(smtpd_factory):
    smtpd = smtpd_factory(auth="any", require_auth=True)
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        client.login("whoever", "whatever")
        client.sendmail("a@x.test", ["b@x.test"], b"Subject: any\\r\\n\\r\\nx\\r\\n")
    assert smtpd.wait_for(1)[0].envelope.auth == "whoever"
"""


def test_reactor_mode_without_pytest_twisted_is_refused(run, pytester):
    pytester.makepyfile(
        test_mode="""
import pytest

@pytest.mark.smtpd(mode="reactor")
def test_it(smtpd):
    pass
"""
    )
    result = run("-p", "no:twisted")
    result.assert_outcomes(errors=1)
    assert "mode='reactor' needs pytest-twisted" in result.stdout.str()


def test_tls_and_auth(run, pytester):
    """A generated certificate that clients verify; AUTH users and 'any'."""
    pytester.makepyfile(test_tls=TLS_TESTS)
    result = run("-p", "no:twisted")
    passed(
        result,
        "test_starttls_verified_and_auth",
        "test_implicit_tls_by_ip_address",
        "test_verification_really_checks",
        "test_accept_any_credentials",
    )


FAULT_TESTS = """
import smtplib, time

import pytest

MESSAGE = b"Subject: fault\\r\\n\\r\\nbody\\r\\n"

def send(smtpd, to=("b@x.test",)):
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        client.sendmail("a@x.test", list(to), MESSAGE)

def test_reply_per_recipient_pattern(smtpd):
    smtpd.fail("rcpt", 550, "5.1.1", "No such user", match=r"^nobody@")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(smtpd, ["nobody@x.test"])
    assert refused.value.recipients["nobody@x.test"] == (550, b"5.1.1 No such user")
    send(smtpd, ["nobody@x.test", "somebody@x.test"])
    assert smtpd.wait_for(1)[0].envelope.rcpt_tos == ["somebody@x.test"]

def test_reply_at_connect(smtpd):
    smtpd.fail("connect", 554, "5.7.1", "Go away")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(smtpd.host, smtpd.port)
    assert refused.value.smtp_code == 554

def test_reply_at_mail(smtpd):
    smtpd.fail("mail", 421, "4.7.0", "Try later", match="@spam.test$")
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        client.ehlo()
        assert client.mail("x@spam.test") == (421, b"4.7.0 Try later")

def test_nth_message_fails(smtpd):
    smtpd.fail("data", 452, "4.3.1", "Out of space", nth=2)
    send(smtpd)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(smtpd)
    assert refused.value.smtp_code == 452
    send(smtpd)
    assert len(smtpd.wait_for(2)) == 2

def test_fail_once_then_accept(smtpd):
    smtpd.fail("data", 451, "4.3.0", "Temporary failure", times=1)
    with pytest.raises(smtplib.SMTPDataError):
        send(smtpd)
    send(smtpd)
    assert len(smtpd.wait_for(1)) == 1

def test_greylisting(smtpd):
    smtpd.greylist()
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(smtpd)
    assert refused.value.recipients["b@x.test"][0] == 451
    send(smtpd)  # the retry of the same triple is accepted
    assert len(smtpd.wait_for(1)) == 1

def test_delay(smtpd):
    smtpd.delay("mail", 0.5)
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        client.ehlo()
        started = time.monotonic()
        assert client.mail("a@x.test")[0] == 250
        assert time.monotonic() - started >= 0.49

def test_disconnect_at_rcpt(smtpd):
    smtpd.disconnect("rcpt")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(smtpd)
    assert "* connection dropped: fault rule at rcpt" in smtpd.transcript

def test_disconnect_after_the_dot(smtpd):
    smtpd.disconnect("data")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(smtpd)
    assert smtpd.messages == []
    lines = smtpd.transcript.splitlines()
    after_the_dot = lines[lines.index("C: .") + 1]
    assert after_the_dot == "* connection dropped: fault rule at data"

def test_throttle(smtpd):
    smtpd.throttle(1000)  # the ~1150 bytes the client sends take over 1 s
    started = time.monotonic()
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        body = b"Subject: slow\\r\\n\\r\\n" + b"x" * 1000
        client.sendmail("a@x.test", ["b@x.test"], body)
    assert time.monotonic() - started >= 0.9
    assert smtpd.wait_for(1)[0].get_content().startswith("x" * 1000)
"""


def test_fault_scripts(run, pytester):
    """Each kind of fault, as a client sees it."""
    pytester.makepyfile(test_faults=FAULT_TESTS)
    result = run("-p", "no:twisted")
    passed(
        result,
        "test_reply_per_recipient_pattern",
        "test_reply_at_connect",
        "test_reply_at_mail",
        "test_nth_message_fails",
        "test_fail_once_then_accept",
        "test_greylisting",
        "test_delay",
        "test_disconnect_at_rcpt",
        "test_disconnect_after_the_dot",
        "test_throttle",
    )


REPORT_TESTS = """
import smtplib

def test_fails_after_mail(smtpd):
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        client.sendmail("ann@x.test", ["bob@x.test"], b"Subject: seen\\r\\n\\r\\nx")
    assert smtpd.messages == [], "deliberate"

def test_passes(smtpd):
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        client.noop()
"""


def test_transcript_in_the_failure_report(run, pytester):
    """A failing test's report has its server's dialogue; a passing one not."""
    pytester.makepyfile(test_report=REPORT_TESTS)
    result = run("-p", "no:twisted", "-rA")
    result.assert_outcomes(passed=1, failed=1)
    text = result.stdout.str()
    failures = text[text.index("= FAILURES =") : text.index("= PASSES =")]
    assert "smtpd transcript (127.0.0.1:" in failures
    for line in (
        "S: 220 localhost ESMTP",
        "C: mail FROM:<ann@x.test> size=",
        "C: rcpt TO:<bob@x.test>",
        "C: Subject: seen",
        "S: 250 2.0.0 OK: queued as",
        "C: QUIT",
    ):
        assert line in failures, failures
    passes = text[text.index("= PASSES =") :]
    assert "smtpd transcript" not in passes


SESSION_TESTS = """
import smtplib

def send(server, subject):
    with smtplib.SMTP(server.host, server.port) as client:
        client.sendmail("a@x.test", ["b@x"], f"Subject: {subject}\\r\\n\\r\\nx\\r\\n")

def test_first(smtpd_session):
    send(smtpd_session, "first")
    assert len(smtpd_session.wait_for(1)) == 1

def test_second_sees_the_first_and_fails(smtpd_session):
    assert [m["Subject"] for m in smtpd_session.messages] == ["first"]
    send(smtpd_session, "second-test-mail")
    assert False, "deliberate"

def test_third_after_reset(smtpd_session):
    smtpd_session.reset()
    assert smtpd_session.messages == []
"""


def test_session_scoped_server(run, pytester):
    """One server for the run; a failure shows only that test's sessions."""
    pytester.makepyfile(test_session=SESSION_TESTS)
    result = run("-p", "no:twisted")
    result.assert_outcomes(passed=2, failed=1)
    text = result.stdout.str()
    failures = text[text.index("= FAILURES =") :]
    assert "--- session 2 from" in failures
    assert "C: Subject: second-test-mail" in failures
    assert "--- session 1 from" not in failures


XDIST_TESTS = """
import os, smtplib

import pytest

@pytest.mark.parametrize("n", range(6))
def test_parallel(smtpd, n):
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        client.sendmail("a@x.test", ["b@x.test"], f"Subject: {n}\\r\\n\\r\\nx\\r\\n")
    [message] = smtpd.wait_for(1)
    assert message["Subject"] == str(n)
    with open(f"port-{n}", "w") as file:
        file.write(f"{os.environ['PYTEST_XDIST_WORKER']} {smtpd.port}")
"""


def test_xdist_workers_get_their_own_servers(run, pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_parallel=XDIST_TESTS)
    result = run("-p", "no:twisted", "-n", "2")
    result.assert_outcomes(passed=6)
    seen = [(pytester.path / f"port-{n}").read_text().split() for n in range(6)]
    assert len({worker for worker, _ in seen}) == 2
    assert len({port for _, port in seen}) == 6  # a fresh server per test


TRIAL_TESTS = """
import smtplib

from twisted.internet import defer, threads
from twisted.mail.smtp import sendmail
from twisted.trial import unittest

from twisted_smtpd.testserver import SMTPServerMixin


class MailTests(SMTPServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_receives(self):
        smtpd = self.start_smtpd()
        self.assertFalse(smtpd.threaded)
        yield sendmail(smtpd.host, "a@x.test", ["b@x.test"],
                       b"Subject: trial\\r\\n\\r\\nx\\r\\n", port=smtpd.port)
        [message] = yield smtpd.wait_for(1)
        self.assertEqual(message["Subject"], "trial")

    @defer.inlineCallbacks
    def test_fault_and_tls(self):
        smtpd = self.start_smtpd(tls="starttls")
        smtpd.fail("rcpt", 550, "5.1.1", "No such user", match="^nobody@")
        smtpd.delay("mail", 0.2)

        def send():  # a blocking client, in a thread: the server is in this reactor
            with smtplib.SMTP("localhost", smtpd.port) as client:
                client.starttls(context=smtpd.ssl_context)
                return client.sendmail("a@x.test", ["nobody@x.test", "b@x.test"],
                                       b"Subject: tls\\r\\n\\r\\nx\\r\\n")

        refused = yield threads.deferToThread(send)
        self.assertEqual(refused, {"nobody@x.test": (550, b"5.1.1 No such user")})
        [message] = yield smtpd.wait_for(1)
        self.assertIsNotNone(message.envelope.tls)
        self.assertIn("S: 550 5.1.1 No such user", smtpd.transcript)
"""


def test_trial_mixin(pytester, monkeypatch):
    """The same server inside trial's reactor; trial finds it clean after."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(pytester.path)]))
    pytester.makepyfile(test_trialmail=TRIAL_TESTS)
    result = pytester.run(
        sys.executable, "-m", "twisted.trial", "test_trialmail", timeout=120
    )
    text = result.stdout.str()
    assert "PASSED (successes=2)" in text, text
    assert result.ret == 0


def test_import_is_cheap():
    """Loading the plugin imports neither Twisted nor a reactor."""
    import subprocess

    code = (
        "import sys, twisted_smtpd.pytest_plugin;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert output.strip() == "[]"


def test_entry_point_declared():
    """setup.cfg registers the plugin, so pip install activates it."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    entry = config["options.entry_points"]["pytest11"].strip()
    assert entry == "twisted_smtpd = twisted_smtpd.pytest_plugin"


def _installed_entry_point():
    try:
        distribution = importlib.metadata.distribution("twisted_smtpd")
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in distribution.entry_points:
        if entry.group == "pytest11":
            return entry
    return None


def test_installed_plugin_is_active_and_can_be_switched_off(run, pytester):
    entry = _installed_entry_point()
    if entry is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI installs the package: its pytest11 entry point is missing")
        pytest.skip("twisted_smtpd is not pip-installed here (CI installs it)")
    assert (entry.name, entry.value) == ("twisted_smtpd", "twisted_smtpd.pytest_plugin")
    pytester.makepyfile(
        test_active="def test_fixture(smtpd):\n    assert smtpd.port > 0\n"
    )
    run("-p", "no:twisted", plugin=False).assert_outcomes(passed=1)
    off = run("-p", "no:twisted", "-p", "no:twisted_smtpd", plugin=False)
    off.assert_outcomes(errors=1)
    assert "fixture 'smtpd' not found" in off.stdout.str()
