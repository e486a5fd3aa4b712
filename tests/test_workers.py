"""--workers N: several processes serve one set of listening sockets."""

from __future__ import annotations

import functools
import os
import signal
import smtplib
import socket
import ssl
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from .helpers import free_port, start_twistd, twistd_start_error, wait_for_port


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:"):
            inodes.add(target)
    return inodes


def listening_inode(port: int) -> str:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                return f"socket:[{fields[9]}]"
    raise AssertionError(f"nothing listens on {port}")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("kind", ["tcp", "ssl"])
def test_workers_share_the_port_and_stop_cleanly(tmp_path, certificates, kind) -> None:
    """Workers adopt the parent's listening socket, deliver, and stop on SIGTERM."""
    port = free_port()
    maildir = tmp_path / "Maildir"
    endpoint = f"tcp:{port}:interface=127.0.0.1"
    client = smtplib.SMTP
    if kind == "ssl":
        key, cert = certificates["key"], certificates["cert"]
        endpoint = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        tls = ssl.create_default_context(cafile=str(certificates["ca"]))
        tls.check_hostname = False
        client = functools.partial(smtplib.SMTP_SSL, context=tls)
    proc = start_twistd(
        tmp_path,
        "--port",
        endpoint,
        "--workers",
        "3",
        "--maildir",
        str(maildir),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for_port(port, proc)
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and sum("serving" in line for line in list(lines)) < 2
        ):
            time.sleep(0.1)
        workers = children(proc.pid)
        assert 2 == len(workers), lines
        inode = listening_inode(port)
        for worker in workers:
            assert inode in socket_inodes(worker)
        for i in range(40):
            with client("127.0.0.1", port, timeout=10) as smtp:
                smtp.sendmail("a@b.example", ["c@d.example"], f"n={i}\r\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(10)
        proc.stdout.close()
    output = "".join(lines)
    assert 40 == len(list((maildir / "new").iterdir()))
    assert "smtpd worker 1 serving" in output and "smtpd worker 2 serving" in output
    assert "smtpd worker 1 ended" in output and "smtpd worker 2 ended" in output
    assert "Traceback" not in output
    for worker in workers:
        assert not Path(f"/proc/{worker}").exists()


def test_workers_refuse_unshareable_ports(tmp_path) -> None:
    """--workers with a port type that cannot be shared is a one-line error."""
    status, lines = twistd_start_error(
        tmp_path, "--workers", "2", "--port", f"unix:{tmp_path / 'sock'}"
    )
    assert 0 != status
    assert 1 == len(lines) and "--workers can share tcp: and ssl: ports" in lines[0]


def test_accept_one_at_a_time_caps_every_wakeup() -> None:
    """Twisted raises numberAccepts after a full batch; the cap resets it."""
    from twisted_smtpd.workers import accept_one_at_a_time

    class BurstyPort:
        numberAccepts = 100  # tcp.Port's start value
        seen: list[int] = []

        def doRead(self) -> None:
            self.seen.append(self.numberAccepts)
            self.numberAccepts += 20  # what tcp.Port does after a full batch

    port = BurstyPort()
    accept_one_at_a_time(port)
    for _ in range(3):
        port.doRead()
    assert [1, 1, 1] == port.seen


def _read_reply(sock: socket.socket, lines: int = 1) -> bytes:
    data = b""
    while data.count(b"\r\n") < lines or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"closed after {data!r}")
        data += chunk
    return data


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_burst_of_sessions_is_spread_over_the_processes(tmp_path) -> None:
    """Bursts of 60 connections at once reach both processes.

    Each process's queue ids share a prefix, so the 250 after DATA tells which
    process holds the session.  How evenly a burst splits depends on the
    scheduler (a loaded CI machine skews it), so this asserts only that both
    serve; test_accept_one_at_a_time_caps_every_wakeup checks the cap that
    evens the split, deterministically.
    """
    port = free_port()
    proc = start_twistd(
        tmp_path,
        "--port",
        f"tcp:{port}:interface=127.0.0.1:backlog=256",
        "--workers",
        "2",
        "--handler",
        "twisted_smtpd.handlers.discard",
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    holders: Counter[str] = Counter()
    try:
        wait_for_port(port, proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            "serving" in line for line in list(lines)
        ):
            time.sleep(0.1)
        time.sleep(0.5)  # the worker's reactor is running
        for _burst in range(5):
            _burst_of_messages(port, 60, holders)
            if len(holders) == 2:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(10)
        proc.stdout.close()
    assert 2 == len(holders), holders


def _burst_of_messages(port: int, count: int, holders: Counter[str]) -> None:
    """C{count} sessions opened at once, each sending one message; count
    the queue-id prefix (the process) of each 250."""
    sockets = [
        socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(count)
    ]
    try:
        for sock in sockets:
            _read_reply(sock)
            sock.sendall(
                b"HELO c.example\r\nMAIL FROM:<a@b.example>\r\n"
                b"RCPT TO:<c@d.example>\r\nDATA\r\n"
            )
        for sock in sockets:
            _read_reply(sock, lines=4)
            sock.sendall(b"hi\r\n.\r\nQUIT\r\n")
            reply = _read_reply(sock)
            assert reply.startswith(b"250 "), reply
            holders[reply.split(b"queued as ")[1][:8].decode()] += 1
    finally:
        for sock in sockets:
            sock.close()
