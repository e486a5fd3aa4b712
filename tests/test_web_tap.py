"""C{twistd smtpd --web}: option wiring, start-up errors, and a real twistd."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import urllib.request

import pytest

from twisted_smtpd.tap import Options, makeService
from twisted_smtpd.web import CatcherHandler, WebService

from .helpers import free_port, start_twistd, twistd_start_error, wait_for_port
from .web_helpers import make_message


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_web_wraps_the_maildir_handler_and_adds_the_service(tmp_path):
    maildir = str(tmp_path / "Maildir")
    options = parse("--maildir", maildir, "--web", "tcp:0")
    handler = options["handler_object"]
    assert isinstance(handler, CatcherHandler)
    assert handler.store.maildir == maildir
    service = makeService(options)
    children = list(service)
    # First child: its index opens before the SMTP listeners accept mail.
    assert isinstance(children[0], WebService)
    assert children[0].store is handler.store


def test_without_web_nothing_changes(tmp_path):
    options = parse("--maildir", str(tmp_path / "Maildir"))
    assert not isinstance(options["handler_object"], CatcherHandler)
    assert not any(isinstance(c, WebService) for c in makeService(options))


def test_other_handlers_get_a_memory_store(tmp_path):
    options = parse("--handler", "twisted_smtpd.handlers.discard", "--web", "tcp:0")
    assert options["handler_object"].store.maildir is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--web", "bogus:1"], "bad --web 'bogus:1'"),
        (
            ["--web", "tcp:0", "--web-auth", "/nonexistent/users"],
            "cannot read --web-auth",
        ),
        (
            ["--web", "tcp:0", "--web-mailboxes", "no.such.rule"],
            "cannot load --web-mailboxes",
        ),
        (["--web", "tcp:0", "--web-relay", "host:x"], "--web-relay: relay must be"),
        (["--web", "tcp:0", "--workers", "2"], "--web needs --workers 1"),
    ],
)
def test_bad_web_options_stop_with_one_line(tmp_path, args, message):
    status, lines = twistd_start_error(tmp_path, "--port", "tcp:0", *args)
    assert status != 0
    assert any(message in line for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines


def _listening_on(port: int) -> set[str]:
    """Local addresses listening on C{port}, from /proc/net/tcp."""
    found = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(
                    ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
                )
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_twistd_serves_the_catcher_and_mail_survives_a_restart(tmp_path):
    smtp_port, web_port = free_port(), free_port()
    args = (
        "--port",
        f"tcp:{smtp_port}:interface=127.0.0.1",
        "--web",
        f"tcp:{web_port}",
        "--hostname",
        "mx.test",
    )
    url = f"http://127.0.0.1:{web_port}/api/v1/messages"
    for round_number in (1, 2):
        proc = start_twistd(tmp_path, *args)
        try:
            wait_for_port(smtp_port, proc)
            wait_for_port(web_port, proc)
            # Loopback only, though the endpoint named no interface.
            assert _listening_on(web_port) == {"127.0.0.1"}
            if round_number == 1:
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
                    smtp.send_message(make_message("through twistd"))
            with urllib.request.urlopen(url, timeout=30) as response:
                listing = json.load(response)
            assert [m["Subject"] for m in listing["messages"]] == ["through twistd"]
            message_id = listing["messages"][0]["ID"]
            detail_url = f"http://127.0.0.1:{web_port}/api/v1/message/{message_id}"
            with urllib.request.urlopen(detail_url, timeout=30) as response:
                assert json.load(response)["Text"].startswith("Hello Bob")
        finally:
            proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=30)[0]
        assert "Server Shut Down." in output, output
        assert f"the mail catcher is at http://127.0.0.1:{web_port}/" in output
        assert "Traceback" not in output, output
    assert len(os.listdir(tmp_path / "Maildir" / "new")) == 1
