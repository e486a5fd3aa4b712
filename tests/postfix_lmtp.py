"""A private Postfix that hands every message to an LMTP server with lmtp(8).

It is the real LMTP client the LMTP tests use: mail goes in over SMTP to
its own smtpd on a free loopback port, and its queue manager delivers it
through C{lmtp:unix:PATH} or C{lmtp:inet:127.0.0.1:PORT}.  Per-recipient
outcomes show in its log (C{status=sent}, C{status=deferred},
C{status=bounced}) and in its queue (C{postqueue -p}).
"""

from __future__ import annotations

import re
import smtplib
import subprocess

from .mailservers import PrivatePostfix, _wait_for

_MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 1 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixToLMTP(PrivatePostfix):
    """C{postfix -c DIR start}: SMTP in on C{self.port}, LMTP out to C{lmtp}.

    Args:
        lmtp: Postfix's next-hop syntax, C{unix:/abs/path} or
            C{inet:127.0.0.1:PORT}.  A unix socket must be writable by the
            C{postfix} user.
    """

    def __init__(self, lmtp: str) -> None:
        super().__init__("postfix-lmtp-")
        self._start(
            self.main_cf_head()
            + f"""\
smtpd_relay_restrictions = permit_mynetworks, reject
default_transport = lmtp:{lmtp}
relay_transport = lmtp:{lmtp}
local_transport = error:no local delivery
alias_maps =
alias_database =
biff = no
# retry a deferred recipient soon, so a test can see the second attempt
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
lmtp_lhlo_name = relay.test
maillog_file_prefixes = {self.root}
maillog_file = {self.maillog}
""",
            _MASTER.format(port=self.port),
            self._listening,
        )

    def _listening(self) -> bool:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=2) as smtp:
                return smtp.noop()[0] == 250
        except OSError:
            return False

    def send(
        self, sender: str, recipients: list[str], message: bytes
    ) -> tuple[str, dict]:
        """Queue one message over SMTP; (Postfix's queue id, refused RCPTs)."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as smtp:
            smtp.ehlo("injector.test")
            smtp.mail(sender)
            refused = {}
            for recipient in recipients:
                code, text = smtp.rcpt(recipient)
                if code != 250:
                    refused[recipient] = (code, text)
            code, text = smtp.data(message)
            assert code == 250, (code, text)
        match = re.search(rb"queued as ([0-9A-Za-z]+)", text)
        assert match is not None, text
        return match.group(1).decode(), refused

    def statuses(self, queue_id: str) -> dict[str, list[str]]:
        """Each recipient's delivery-attempt lines for one message, in order.

        C{{'alice@example.net': ['status=sent (250 2.1.5 ...)']}}
        """
        found: dict[str, list[str]] = {}
        pattern = re.compile(
            rf"{queue_id}: to=<([^>]*)>.*?, (status=\w+ \(.*\))$", re.MULTILINE
        )
        for recipient, status in pattern.findall(self.log()):
            found.setdefault(recipient, []).append(status)
        return found

    def wait_for_statuses(
        self, queue_id: str, recipients: list[str], seconds: float = 30
    ) -> dict[str, list[str]]:
        """Wait until every recipient has had a delivery attempt."""
        _wait_for(
            lambda: all(r in self.statuses(queue_id) for r in recipients),
            f"delivery attempts for {queue_id} to {recipients}\n{self.log()}",
            seconds,
        )
        return self.statuses(queue_id)

    def queue(self) -> str:
        """C{postqueue -p}: what is still queued (deferred) and why."""
        return subprocess.run(
            ["postqueue", "-c", str(self.conf), "-p"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
