"""The catcher's Mailpit-compatible API over real sockets (treq, smtplib)."""

from __future__ import annotations

import base64
import email
import hashlib
import json
import os

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor

from twisted_smtpd import SMTPFactory
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.web import (
    CatcherHandler,
    MessageStore,
    Relay,
    load_password_file,
    loopback_by_default,
)
from twisted_smtpd.web.api import MAIL_CSP
from twisted_smtpd.web.store import INDEX_NAME, by_auth_user, by_domain

from .web_helpers import PROBE_HTML, make_message, send, start_catcher


@pytest.fixture
def catcher(tmp_path):
    running = pytest_twisted.blockon(start_catcher(str(tmp_path / "Maildir")))
    yield running
    pytest_twisted.blockon(running.stop())


def get_json(url, **kwargs):
    return treq.get(url, **kwargs).addCallback(_json_ok)


def _json_ok(response):
    assert response.code == 200, response.code
    assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
    return treq.json_content(response)


def maildir_files(catcher):
    return sorted(
        name
        for sub in ("new", "cur")
        for name in os.listdir(os.path.join(catcher.maildir, sub))
    )


@pytest_twisted.inlineCallbacks
def test_list_has_mailpit_fields_newest_first(catcher):
    yield send(catcher.smtp_port, make_message("first"))
    yield send(
        catcher.smtp_port,
        make_message("second", to="Bob <bob@example.org>"),
        ["bob@example.org", "hidden@example.net"],
    )
    # The 250 came after indexing: no waiting needed.
    listing = yield get_json(f"{catcher.url}/api/v1/messages")
    assert listing["total"] == 2
    assert listing["unread"] == 2
    assert listing["messages_count"] == 2
    assert listing["count"] == 2
    assert listing["start"] == 0
    newest, oldest = listing["messages"]
    assert [newest["Subject"], oldest["Subject"]] == ["second", "first"]
    assert newest["From"] == {"Name": "Alice Example", "Address": "alice@example.org"}
    assert newest["To"] == [{"Name": "Bob", "Address": "bob@example.org"}]
    # An envelope recipient in no header is what a catcher shows as Bcc.
    assert newest["Bcc"] == [{"Name": "", "Address": "hidden@example.net"}]
    assert newest["Read"] is False
    assert newest["Created"].endswith("Z")
    assert len(newest["ID"]) == 22
    assert (
        newest["Size"]
        == os.path.getsize(
            os.path.join(catcher.maildir, "new", maildir_files(catcher)[1])
        )
        or newest["Size"] > 0
    )
    assert newest["Snippet"] == "Hello Bob, this is the plain text."
    assert newest["Attachments"] == 0
    paged = yield get_json(f"{catcher.url}/api/v1/messages?start=1&limit=1")
    assert [m["Subject"] for m in paged["messages"]] == ["first"]
    assert paged["messages_count"] == 2 and paged["start"] == 1


@pytest_twisted.inlineCallbacks
def test_message_detail_raw_headers_and_parts(catcher):
    png = b"\x89PNG\r\n\x1a\nnot really a png"
    yield send(
        catcher.smtp_port,
        make_message(
            "detail",
            html=PROBE_HTML,
            attachment=("report.pdf", b"%PDF-1.4 fake", "application/pdf"),
            headers={"Message-ID": "<abc@example.org>", "Cc": "carol@example.net"},
        ),
    )
    listing = yield get_json(f"{catcher.url}/api/v1/messages")
    summary = listing["messages"][0]
    assert summary["MessageID"] == "abc@example.org"
    assert summary["Attachments"] == 1
    detail = yield get_json(f"{catcher.url}/api/v1/message/{summary['ID']}")
    assert detail["ID"] == summary["ID"]
    assert detail["Text"].startswith("Hello Bob, this is the plain text.")
    assert 'id="probe"' in detail["HTML"]
    assert detail["Cc"] == [{"Name": "", "Address": "carol@example.net"}]
    assert detail["ReturnPath"] == "alice@example.org"
    [attachment] = detail["Attachments"]
    assert attachment["FileName"] == "report.pdf"
    assert attachment["ContentType"] == "application/pdf"
    assert attachment["Size"] == len(b"%PDF-1.4 fake")
    # Opening a message marks it read, as in Mailpit.
    listing = yield get_json(f"{catcher.url}/api/v1/messages")
    assert listing["messages"][0]["Read"] is True and listing["unread"] == 0

    base = f"{catcher.url}/api/v1/message/{summary['ID']}"
    response = yield treq.get(f"{base}/part/{attachment['PartID']}")
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Type") == ["application/pdf"]
    assert response.headers.getRawHeaders("Content-Disposition")[0].startswith(
        'attachment; filename="report.pdf"'
    )
    assert response.headers.getRawHeaders("Content-Security-Policy") == [MAIL_CSP]
    assert (yield treq.content(response)) == b"%PDF-1.4 fake"

    response = yield treq.get(f"{base}/raw")
    raw = yield treq.content(response)
    [name] = maildir_files(catcher)
    with open(os.path.join(catcher.maildir, "new", name), "rb") as file:
        assert raw == file.read()  # exactly what the Maildir holds
    assert response.headers.getRawHeaders("Content-Type") == [
        "text/plain; charset=utf-8"
    ]
    headers = yield get_json(f"{base}/headers")
    assert headers["Subject"] == ["detail"]
    assert headers["Return-Path"] == ["<alice@example.org>"]
    assert len(headers["Received"]) == 1

    latest = yield get_json(f"{catcher.url}/api/v1/message/latest")
    assert latest["ID"] == summary["ID"]
    missing = yield treq.get(f"{catcher.url}/api/v1/message/nope")
    assert missing.code == 404
    missing_part = yield treq.get(f"{base}/part/9")
    assert missing_part.code == 404
    del png


@pytest_twisted.inlineCallbacks
def test_inline_image_is_rewritten_for_the_sandboxed_view(catcher):
    message = make_message("inline", html='<p><img src="cid:logo@x"></p>')
    html_part = message.get_body(("html",))
    html_part.add_related(
        b"GIF89a-bytes", maintype="image", subtype="gif", cid="<logo@x>"
    )
    yield send(catcher.smtp_port, message)
    listing = yield get_json(f"{catcher.url}/api/v1/messages")
    message_id = listing["messages"][0]["ID"]
    detail = yield get_json(f"{catcher.url}/api/v1/message/{message_id}")
    [inline] = detail["Inline"]
    assert inline["ContentID"] == "logo@x" and inline["ContentType"] == "image/gif"
    assert detail["Attachments"] == []
    response = yield treq.get(f"{catcher.url}/view/{message_id}.html")
    page = (yield treq.content(response)).decode()
    part_url = f"/api/v1/message/{message_id}/part/{inline['PartID']}"
    assert f'src="{part_url}"' in page
    assert response.headers.getRawHeaders("Content-Security-Policy") == [MAIL_CSP]
    image = yield treq.get(catcher.url + part_url)
    assert (yield treq.content(image)) == b"GIF89a-bytes"
    assert image.headers.getRawHeaders("Content-Disposition")[0].startswith("inline")


@pytest_twisted.inlineCallbacks
def test_search_terms(catcher):
    yield send(catcher.smtp_port, make_message("Invoice 42", text="Total due: 10 EUR"))
    yield send(
        catcher.smtp_port,
        make_message(
            "Password reset",
            sender="Service <noreply@service.example>",
            to="carol@example.net",
            text="Click the link to reset",
        ),
    )

    @defer.inlineCallbacks
    def subjects(query):
        result = yield get_json(f"{catcher.url}/api/v1/search", params={"query": query})
        assert result["total"] == 2
        assert result["messages_count"] == len(result["messages"])
        return sorted(m["Subject"] for m in result["messages"])

    assert (yield subjects("invoice")) == ["Invoice 42"]
    assert (yield subjects("due")) == ["Invoice 42"]  # body text
    assert (yield subjects("from:noreply")) == ["Password reset"]
    assert (yield subjects("from:alice@example.org")) == ["Invoice 42"]
    assert (yield subjects("to:carol")) == ["Password reset"]
    assert (yield subjects("subject:reset")) == ["Password reset"]
    assert (yield subjects('"to reset"')) == ["Password reset"]
    assert (yield subjects("-subject:reset")) == ["Invoice 42"]
    assert (yield subjects("from:alice due")) == ["Invoice 42"]
    assert (yield subjects("from:alice reset")) == []
    assert (yield subjects("100%")) == []  # LIKE wildcards are literal
    assert (yield subjects("")) == ["Invoice 42", "Password reset"]
    listing = yield get_json(f"{catcher.url}/api/v1/messages")
    reset = [m for m in listing["messages"] if m["Subject"] == "Password reset"][0]
    yield get_json(f"{catcher.url}/api/v1/message/{reset['ID']}")
    assert (yield subjects("is:read")) == ["Password reset"]
    assert (yield subjects("is:unread")) == ["Invoice 42"]
    assert (yield subjects("has:attachment")) == []


@pytest_twisted.inlineCallbacks
def test_delete_one_and_all_removes_maildir_files(catcher):
    for n in range(3):
        yield send(catcher.smtp_port, make_message(f"m{n}"))
    listing = yield get_json(f"{catcher.url}/api/v1/messages")
    assert len(maildir_files(catcher)) == 3
    first = listing["messages"][0]["ID"]
    response = yield treq.request(
        "DELETE", f"{catcher.url}/api/v1/messages", json={"IDs": [first]}
    )
    assert response.code == 200
    listing = yield get_json(f"{catcher.url}/api/v1/messages")
    assert [m["Subject"] for m in listing["messages"]] == ["m1", "m0"]
    assert len(maildir_files(catcher)) == 2
    response = yield treq.delete(
        f"{catcher.url}/api/v1/search", params={"query": "subject:m1"}
    )
    assert response.code == 200
    listing = yield get_json(f"{catcher.url}/api/v1/messages")
    assert [m["Subject"] for m in listing["messages"]] == ["m0"]
    response = yield treq.delete(f"{catcher.url}/api/v1/messages")
    assert response.code == 200
    listing = yield get_json(f"{catcher.url}/api/v1/messages")
    assert listing["total"] == 0 and listing["messages"] == []
    assert maildir_files(catcher) == []


@pytest_twisted.inlineCallbacks
def test_mail_survives_a_restart(tmp_path):
    maildir = str(tmp_path / "Maildir")
    first = yield start_catcher(maildir)
    try:
        yield send(first.smtp_port, make_message("kept"), ["kept@example.org"])
        yield send(first.smtp_port, make_message("gone"))
        listing = yield get_json(f"{first.url}/api/v1/messages")
        kept = [m for m in listing["messages"] if m["Subject"] == "kept"][0]
        yield get_json(f"{first.url}/api/v1/message/{kept['ID']}")  # read
    finally:
        yield first.stop()
    # While the server is down: another program removes one message, moves
    # one to cur/, and drops a new one in.
    gone = [m for m in listing["messages"] if m["Subject"] == "gone"][0]
    names = os.listdir(os.path.join(maildir, "new"))
    assert len(names) == 2
    for name in names:
        with open(os.path.join(maildir, "new", name), "rb") as file:
            content = file.read()
        if b"Subject: gone" in content:
            os.unlink(os.path.join(maildir, "new", name))
        else:
            os.rename(
                os.path.join(maildir, "new", name),
                os.path.join(maildir, "cur", name + ":2,S"),
            )
    with open(os.path.join(maildir, "new", "1.M1P1Q1.other"), "wb") as file:
        file.write(
            b"Return-Path: <x@example.org>\r\nFrom: x@example.org\r\n"
            b"To: dropped@example.org\r\nSubject: dropped in\r\n\r\nbody\r\n"
        )
    assert os.path.exists(os.path.join(maildir, INDEX_NAME))
    second = yield start_catcher(maildir)
    try:
        listing = yield get_json(f"{second.url}/api/v1/messages")
        by_subject = {m["Subject"]: m for m in listing["messages"]}
        assert sorted(by_subject) == ["dropped in", "kept"]
        assert by_subject["kept"]["ID"] == kept["ID"]  # stable IDs
        assert by_subject["kept"]["Read"] is True  # the index kept the flag
        assert by_subject["dropped in"]["Read"] is False
        assert gone["ID"] not in [m["ID"] for m in listing["messages"]]
        # The moved file is still readable and its envelope was kept.
        raw = yield treq.get(f"{second.url}/api/v1/message/{kept['ID']}/raw")
        assert b"Subject: kept" in (yield treq.content(raw))
        boxes = yield get_json(f"{second.url}/api/v1/mailboxes")
        assert {b["Name"] for b in boxes} == {
            "kept@example.org",
            "dropped@example.org",
        }
    finally:
        yield second.stop()


@pytest_twisted.inlineCallbacks
def test_a_damaged_index_is_rebuilt(tmp_path):
    maildir = str(tmp_path / "Maildir")
    first = yield start_catcher(maildir)
    try:
        yield send(first.smtp_port, make_message("survivor"))
    finally:
        yield first.stop()
    for suffix in ("-wal", "-shm"):
        if os.path.exists(os.path.join(maildir, INDEX_NAME + suffix)):
            os.unlink(os.path.join(maildir, INDEX_NAME + suffix))
    with open(os.path.join(maildir, INDEX_NAME), "wb") as file:
        file.write(b"this is not an sqlite database" * 100)
    second = yield start_catcher(maildir)
    try:
        listing = yield get_json(f"{second.url}/api/v1/messages")
        assert [m["Subject"] for m in listing["messages"]] == ["survivor"]
    finally:
        yield second.stop()


@pytest_twisted.inlineCallbacks
def test_mailboxes_by_recipient_and_the_mailbox_filter(catcher):
    yield send(catcher.smtp_port, make_message("to a"), ["a@example.org"])
    yield send(
        catcher.smtp_port,
        make_message("to a and b"),
        ["A@example.org", "b@example.org"],
    )
    boxes = yield get_json(f"{catcher.url}/api/v1/mailboxes")
    assert boxes == [
        {"Name": "a@example.org", "Total": 2, "Unread": 2},
        {"Name": "b@example.org", "Total": 1, "Unread": 1},
    ]
    only_b = yield get_json(
        f"{catcher.url}/api/v1/messages", params={"mailbox": "b@example.org"}
    )
    assert [m["Subject"] for m in only_b["messages"]] == ["to a and b"]
    assert only_b["total"] == 1
    found = yield get_json(
        f"{catcher.url}/api/v1/search", params={"query": "mailbox:b@example.org"}
    )
    assert [m["Subject"] for m in found["messages"]] == ["to a and b"]


def test_mailbox_rules():
    from twisted_smtpd import Envelope

    envelope = Envelope(
        session_id="s",
        peer=None,
        helo="h",
        esmtp=True,
        tls=None,
        auth=b"Project-X",
        rcpt_tos=["a@One.example", "b@two.example", "c@one.example"],
    )
    assert by_domain(envelope) == ["one.example", "two.example"]
    assert by_auth_user(envelope) == ["project-x"]
    envelope.auth = None
    assert by_auth_user(envelope) == []


@pytest_twisted.inlineCallbacks
def test_auth_user_rule_puts_each_login_in_its_own_mailbox(tmp_path):
    from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

    from twisted_smtpd import AuthPolicy

    store = MessageStore(None, mailbox_rule=by_auth_user)
    yield store.start()
    checker = InMemoryUsernamePasswordDatabaseDontUse(project=b"secret")
    auth = AuthPolicy.from_checkers([checker], allow_without_tls=True)
    factory = SMTPFactory(
        CatcherHandler(MemoryHandler(), store), hostname="mx.test", auth=auth
    )
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        import smtplib

        def client():
            with smtplib.SMTP("127.0.0.1", port.getHost().port) as smtp:
                smtp.login("project", "secret")
                smtp.send_message(make_message("authed"))
            with smtplib.SMTP("127.0.0.1", port.getHost().port) as smtp:
                smtp.send_message(make_message("anonymous"))

        from twisted.internet import threads

        yield threads.deferToThread(client)
        boxes = yield store.mailboxes()
        assert boxes == [{"Name": "project", "Total": 1, "Unread": 1}]
        listing = yield store.list_messages(mailbox="project")
        assert [m["Subject"] for m in listing["messages"]] == ["authed"]
        assert listing["messages"][0]["Username"] == "project"
    finally:
        yield port.stopListening()
        yield store.stop()
    del AuthPolicy, tmp_path


@pytest_twisted.inlineCallbacks
def test_memory_store_for_other_handlers_with_a_cap():
    memory = MemoryHandler()
    running = yield start_catcher(None, memory, store_kwargs={"max_messages": 2})
    try:
        for n in range(3):
            yield send(running.smtp_port, make_message(f"m{n}"))
        # The real handler got every message; the catcher keeps the newest two.
        assert len(memory.messages) == 3
        listing = yield get_json(f"{running.url}/api/v1/messages")
        assert [m["Subject"] for m in listing["messages"]] == ["m2", "m1"]
        raw = yield treq.get(
            f"{running.url}/api/v1/message/{listing['messages'][0]['ID']}/raw"
        )
        assert (yield treq.content(raw)) == memory.messages[2].content
    finally:
        yield running.stop()


@pytest_twisted.inlineCallbacks
def test_indexing_failure_does_not_fail_delivery(tmp_path):
    """The Maildir holds the message: the client gets its 250 regardless."""
    running = yield start_catcher(str(tmp_path / "Maildir"))
    yield running.stop()  # the index is gone; SMTP would still be wanted
    factory = SMTPFactory(
        CatcherHandler(running.resource.store and _maildir(tmp_path), running.store),
        hostname="mx.test",
    )
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        yield send(port.getHost().port, make_message("still delivered"))
    finally:
        yield port.stopListening()
    assert len(os.listdir(tmp_path / "Maildir" / "new")) == 1


def _maildir(tmp_path):
    from twisted_smtpd.handlers import MaildirHandler

    return MaildirHandler(str(tmp_path / "Maildir"))


@pytest_twisted.inlineCallbacks
def test_mark_read_and_unread(catcher):
    yield send(catcher.smtp_port, make_message("one"))
    yield send(catcher.smtp_port, make_message("two"))
    response = yield treq.put(f"{catcher.url}/api/v1/messages", json={"Read": True})
    assert response.code == 200
    listing = yield get_json(f"{catcher.url}/api/v1/messages")
    assert listing["unread"] == 0
    one = [m["ID"] for m in listing["messages"] if m["Subject"] == "one"]
    yield treq.put(f"{catcher.url}/api/v1/messages", json={"IDs": one, "Read": False})
    listing = yield get_json(f"{catcher.url}/api/v1/messages")
    assert {m["Subject"]: m["Read"] for m in listing["messages"]} == {
        "one": False,
        "two": True,
    }
    bad = yield treq.put(f"{catcher.url}/api/v1/messages", data=b"{not json")
    assert bad.code == 400


class _EventReader:
    """Collects server-sent event frames from a streamed treq response."""

    def __init__(self):
        self.buffer = b""
        self.frames = []
        self.waiting = []

    def __call__(self, data):
        self.buffer += data
        while b"\n\n" in self.buffer:
            frame, self.buffer = self.buffer.split(b"\n\n", 1)
            for line in frame.split(b"\n"):
                if line.startswith(b"data: "):
                    self.frames.append(json.loads(line[6:]))
        waiting, self.waiting = self.waiting, []
        for count, deferred in waiting:
            if len(self.frames) >= count:
                deferred.callback(self.frames[:count])
            else:
                self.waiting.append((count, deferred))

    def until(self, count):
        deferred = defer.Deferred()
        self.waiting.append((count, deferred))
        self(b"")
        return deferred


@pytest_twisted.inlineCallbacks
def test_events_stream_new_update_and_delete(catcher):
    response = yield treq.get(f"{catcher.url}/api/v1/events", unbuffered=True)
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Type") == [
        "text/event-stream; charset=utf-8"
    ]
    reader = _EventReader()
    collected = treq.collect(response, reader)
    yield send(catcher.smtp_port, make_message("live one"))
    [new] = yield reader.until(1)
    assert new["Type"] == "new"
    assert new["Data"]["Subject"] == "live one"
    message_id = new["Data"]["ID"]
    yield get_json(f"{catcher.url}/api/v1/message/{message_id}")
    yield treq.request(
        "DELETE", f"{catcher.url}/api/v1/messages", json={"IDs": [message_id]}
    )
    frames = yield reader.until(3)
    assert frames[1] == {"Type": "update", "Data": {"ID": message_id, "Read": True}}
    assert frames[2] == {"Type": "delete", "Data": {"IDs": [message_id]}}
    yield treq.delete(f"{catcher.url}/api/v1/messages")
    frames = yield reader.until(4)
    assert frames[3]["Type"] == "truncate"
    collected.addErrback(lambda _: None)
    response.original._transport.stopProducing()  # the browser goes away
    # The stream's listener is gone once the client is.
    for _ in range(20):
        if not catcher.store._listeners:
            break
        yield _sleep(0.05)
    assert catcher.store._listeners == []


def _sleep(seconds):
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def test_security_headers(catcher):
    response = yield treq.get(f"{catcher.url}/")
    assert response.code == 200
    csp = response.headers.getRawHeaders("Content-Security-Policy")[0]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers.getRawHeaders("X-Content-Type-Options") == ["nosniff"]
    page = (yield treq.content(response)).decode()
    assert '<script src="/static/app.js"' in page
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in page
    assert "allow-scripts" not in page
    script = yield treq.get(f"{catcher.url}/static/app.js")
    assert script.headers.getRawHeaders("Content-Type") == [
        "text/javascript; charset=utf-8"
    ]
    assert (yield treq.get(f"{catcher.url}/static/../api.py")).code == 404
    assert (yield treq.get(f"{catcher.url}/static/nope.js")).code == 404
    assert "sandbox" in MAIL_CSP.split(";")[0] and "allow-scripts" not in MAIL_CSP
    assert (yield treq.get(f"{catcher.url}/livez")).code == 200
    assert (yield treq.get(f"{catcher.url}/readyz")).code == 200
    assert (yield treq.post(f"{catcher.url}/api/v1/messages")).code == 405
    assert (yield treq.get(f"{catcher.url}/api/v2/nothing")).code == 404


@pytest_twisted.inlineCallbacks
def test_basic_auth_from_a_password_file(tmp_path):
    sha = base64.b64encode(hashlib.sha1(b"hashed-pw").digest()).decode()
    path = tmp_path / "users"
    path.write_text(f"# comment\nalice:plain-pw\nbob:{{SHA}}{sha}\n")
    users = load_password_file(str(path))
    running = yield start_catcher(str(tmp_path / "Maildir"), users=users)
    try:
        url = f"{running.url}/api/v1/messages"
        response = yield treq.get(url)
        assert response.code == 401
        assert response.headers.getRawHeaders("WWW-Authenticate") == [
            'Basic realm="twisted_smtpd"'
        ]
        assert (yield treq.get(url, auth=("alice", "plain-pw"))).code == 200
        assert (yield treq.get(url, auth=("bob", "hashed-pw"))).code == 200
        assert (yield treq.get(url, auth=("alice", "wrong"))).code == 401
        assert (yield treq.get(url, auth=("mallory", "plain-pw"))).code == 401
        assert (yield treq.get(f"{running.url}/", auth=("bob", "x"))).code == 401
        assert (yield treq.get(f"{running.url}/api/v1/events")).code == 401
    finally:
        yield running.stop()


def test_password_file_errors(tmp_path):
    path = tmp_path / "users"
    path.write_text("alice:$2y$05$abcdefghijklmnopqrstuv\n")
    with pytest.raises(ValueError, match="bcrypt hashes are not supported"):
        load_password_file(str(path))
    path.write_text("no colon here\n")
    with pytest.raises(ValueError, match=":1: expected user:password"):
        load_password_file(str(path))
    path.write_text("\n# only comments\n")
    with pytest.raises(ValueError, match="no users"):
        load_password_file(str(path))


@pytest_twisted.inlineCallbacks
def test_release_to_a_real_smtp_server(catcher):
    downstream = MemoryHandler()
    factory = SMTPFactory(downstream, hostname="next.test")
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        yield send(catcher.smtp_port, make_message("release me"))
        listing = yield get_json(f"{catcher.url}/api/v1/messages")
        message_id = listing["messages"][0]["ID"]
        url = f"{catcher.url}/api/v1/message/{message_id}/release"
        relay = f"127.0.0.1:{port.getHost().port}"
        # A cross-site form or no-cors fetch cannot send application/json.
        response = yield treq.post(
            url, data=json.dumps({"To": ["x@example.org"], "Relay": relay}).encode()
        )
        assert response.code == 415
        response = yield treq.post(url, json={"To": ["x@example.org"]})
        assert response.code == 400  # no --web-relay and none given
        response = yield treq.post(
            url, json={"To": ["real@example.org"], "Relay": relay}
        )
        assert response.code == 200, (yield treq.content(response))
        [released] = downstream.messages
        assert released.rcpt_tos == ["real@example.org"]
        assert released.mail_from == "alice@example.org"
        headers = email.message_from_bytes(released.content)
        assert headers["Subject"] == "release me"
        assert b"\r\r" not in released.content  # line endings intact
        assert released.content.endswith(
            b"\r\n\r\nHello Bob, this is the plain text.\r\n"
        )
        # Our own Return-Path is not passed on; the next hop adds its own.
        assert not released.content.startswith(b"Return-Path:")
    finally:
        yield port.stopListening()
    dead = yield treq.post(url, json={"To": ["real@example.org"], "Relay": relay})
    assert dead.code == 502
    assert b"release to 127.0.0.1" in (yield treq.content(dead))


def test_relay_and_endpoint_parsing():
    assert Relay.parse("mail.example:2525") == Relay("mail.example", 2525)
    assert Relay.parse("mail.example") == Relay("mail.example", 25)
    assert Relay.parse("[::1]:25") == Relay("::1", 25)
    for bad in ("host:0", "host:x", ":25", "host:70000"):
        with pytest.raises(ValueError):
            Relay.parse(bad)
    assert loopback_by_default("tcp:8025") == "tcp:8025:interface=127.0.0.1"
    assert loopback_by_default("8025") == "tcp:8025:interface=127.0.0.1"
    assert (
        loopback_by_default("tcp:8025:interface=0.0.0.0")
        == "tcp:8025:interface=0.0.0.0"
    )
    assert loopback_by_default("unix:/run/c.sock") == "unix:/run/c.sock"


def test_the_wrapper_keeps_the_delegates_other_attributes():
    class DSNHandler(MemoryHandler):
        supports_dsn = True

    store = MessageStore(None)
    wrapped = CatcherHandler(DSNHandler(), store)
    assert SMTPFactory(wrapped, hostname="mx.test").dsn is True
    assert (
        SMTPFactory(CatcherHandler(MemoryHandler(), store), hostname="x").dsn is False
    )
    assert not hasattr(CatcherHandler(MemoryHandler(), store), "check_sender")
