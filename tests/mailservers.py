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

from .helpers import free_port, require_program


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
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
