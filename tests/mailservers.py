"""Private Dovecot (LMTP) and Postfix instances for hand-off tests.

Each runs from its own temp directory on loopback with free ports, as root
(the daemons drop to C{nobody}); the mail lands in Maildirs under it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .helpers import free_port, require_program, stop_process


def _wait_for(condition, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not come up")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def maildir_messages(maildir: Path) -> list[bytes]:
    """The messages in C{maildir}/new and cur, oldest first."""
    files = []
    for sub in ("new", "cur"):
        folder = maildir / sub
        if folder.is_dir():
            files += [p for p in folder.iterdir() if p.is_file()]
    files.sort(key=lambda p: (p.stat().st_mtime, p.name))
    return [p.read_bytes() for p in files]


class Dovecot:
    """C{dovecot -F} with an LMTP listener on a TCP port and a unix socket.

    Users: every name in C{users}; a name given in C{full} gets a quota
    so small that any message is refused at DATA (552 5.2.2).
    """

    def __init__(self, users: list[str], full: tuple[str, ...] = ()) -> None:
        require_program("dovecot")
        self.root = Path(tempfile.mkdtemp(prefix="dovecot-"))
        self.root.chmod(0o755)
        self.mail = self.root / "mail"
        self.mail.mkdir()
        self.mail.chmod(0o777)
        run = self.root / "run"
        run.mkdir()
        self.port = free_port()
        uid = "65534:65534"
        lines = []
        for user in users:
            extra = "userdb_quota_rule=*:storage=1B" if user in full else ""
            lines.append(f"{user}:{{PLAIN}}x:{uid}::{self.mail / user}::{extra}")
        (self.root / "users").write_text("\n".join(lines) + "\n")
        self.config = self.root / "dovecot.conf"
        self.config.write_text(
            f"""
base_dir = {run}
state_dir = {run}/state
instance_name = dovecot-{self.port}
protocols = lmtp
listen = 127.0.0.1
log_path = {self.root}/dovecot.log
default_internal_user = nobody
default_internal_group = nogroup
default_login_user = nobody
mail_location = maildir:~/Maildir
mail_plugins = quota
ssl = no
# RCPT TO:<alice@example.net> is user alice
auth_username_format = %Ln
passdb {{
  driver = passwd-file
  args = {self.root}/users
}}
userdb {{
  driver = passwd-file
  args = {self.root}/users
}}
plugin {{
  quota = maildir:User quota
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""
        )
        self.socket = run / "lmtp"
        self.process = subprocess.Popen(
            ["dovecot", "-F", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for(lambda: _port_open(self.port), "dovecot")
        except AssertionError:
            self.stop()
            raise

    def maildir(self, user: str) -> Path:
        return self.mail / user / "Maildir"

    def messages(self, user: str) -> list[bytes]:
        return maildir_messages(self.maildir(user))

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text() if path.exists() else ""

    def kill_lmtp_processes(self) -> int:
        """SIGKILL the LMTP worker processes (not the master); how many."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
        ).stdout.split()
        killed = 0
        for pid in out:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"lmtp" in cmdline:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
        return killed

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.root, ignore_errors=True)


_POSTFIX_MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PrivatePostfix:
    """What every private Postfix here shares: its own directories under a
    temp root (config, queue, data), a free loopback port, its log file, and
    C{postfix -c DIR} to start and stop it."""

    def __init__(self, prefix: str) -> None:
        require_program("postfix")
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.root.chmod(0o755)
        self.conf = self.root / "conf"
        self.conf.mkdir()
        (self.root / "queue").mkdir()
        self.data = self.root / "data"
        self.data.mkdir()
        shutil.chown(self.data, "postfix")
        self.port = free_port()
        self.maillog = self.root / "maillog"

    def main_cf_head(self) -> str:
        """The main.cf lines every private Postfix here starts with: its own
        queue and data directories, loopback only, no DNS for peers."""
        return (
            "compatibility_level = 3.6\n"
            f"queue_directory = {self.root}/queue\n"
            f"data_directory = {self.data}\n"
            "mail_owner = postfix\n"
            "setgid_group = postdrop\n"
            "myhostname = relay.test\n"
            "mydomain = test\n"
            "mydestination =\n"
            "inet_interfaces = 127.0.0.1\n"
            "inet_protocols = ipv4\n"
            "mynetworks = 127.0.0.0/8\n"
            "smtpd_peername_lookup = no\n"
        )

    def _start(self, main_cf: str, master_cf: str, ready) -> None:
        """Write the configuration, start Postfix, wait until C{ready()}."""
        (self.conf / "main.cf").write_text(main_cf)
        (self.conf / "master.cf").write_text(master_cf)
        self._postfix("start")
        try:
            _wait_for(ready, "postfix")
        except AssertionError:
            self.stop()
            raise

    def _postfix(self, command: str) -> None:
        proc = subprocess.run(
            ["postfix", "-c", str(self.conf), command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0 and command == "start":
            raise AssertionError(f"postfix start failed: {proc.stderr}{self.log()}")

    def log(self) -> str:
        return self.maillog.read_text() if self.maillog.exists() else ""

    def stop(self) -> None:
        pid_file = self.root / "queue" / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        self._postfix("stop")
        deadline = time.monotonic() + 10
        while pid and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)


class Postfix(PrivatePostfix):
    """A private Postfix (C{postfix -c DIR start}) accepting mail for
    C{example.net} into one Maildir per user, relaying nothing.

    With C{cert}/C{key} it offers STARTTLS with that certificate.
    """

    def __init__(
        self, users: list[str], cert: Path | None = None, key: Path | None = None
    ) -> None:
        super().__init__("postfix-")
        conf = self.conf
        self.mail = self.root / "mail"
        self.mail.mkdir()
        self.mail.chmod(0o777)
        (conf / "vmailbox").write_text(
            "".join(f"{user}@example.net {user}/\n" for user in users)
        )
        tls = ""
        if cert is not None and key is not None:
            tls = (
                f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n"
                "smtpd_tls_security_level = may\nsmtpd_tls_received_header = yes\n"
            )
        self._start(
            self.main_cf_head()
            + f"""\
smtpd_relay_restrictions = reject_unauth_destination
virtual_mailbox_domains = example.net
virtual_mailbox_base = {self.mail}
virtual_mailbox_maps = texthash:{conf}/vmailbox
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
default_transport = error:this test relay sends nothing out
local_transport = error:no local delivery
alias_maps =
alias_database =
biff = no
maillog_file_prefixes = {self.root}
maillog_file = {self.maillog}
{tls}""",
            _POSTFIX_MASTER.format(port=self.port),
            lambda: _port_open(self.port),
        )

    def maildir(self, user: str) -> Path:
        return self.mail / user

    def messages(self, user: str) -> list[bytes]:
        return maildir_messages(self.maildir(user))

    def wait_for_messages(self, user: str, count: int, seconds: float = 20) -> list:
        """Postfix delivers after its 250 (from its queue): wait for it."""
        _wait_for(
            lambda: len(self.messages(user)) >= count, f"mail for {user}", seconds
        )
        return self.messages(user)

    def kill_smtpd_processes(self) -> int:
        """SIGKILL Postfix's smtpd processes (the master stays)."""
        out = subprocess.run(
            ["pgrep", "-f", f"smtpd -n 127.0.0.1:{self.port}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        for pid in out:
            os.kill(int(pid), signal.SIGKILL)
        return len(out)
