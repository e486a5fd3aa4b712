"""Nothing lost: SIGKILL mid-load, SIGTERM mid-message, many idle sessions."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from twisted_smtpd import Limits
from twisted_smtpd.handlers import MemoryHandler

from .helpers import free_port, start_twistd, wait_for_port


def start_maildir_server(tmp_path, port, *args):
    proc = start_twistd(
        tmp_path,
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--maildir",
        str(tmp_path / "Maildir"),
        *args,
    )
    wait_for_port(port, proc)
    return proc


def body_for(worker: int, seq: int) -> bytes:
    tag = f"{worker}-{seq}"
    return f"X-Seq: {tag}\r\n\r\n".encode() + (tag.encode() + b"\r\n") * 200


def test_sigkill_loses_nothing_acknowledged(tmp_path) -> None:
    """Every message answered 250 before SIGKILL is complete in new/."""
    port = free_port()
    proc = start_maildir_server(tmp_path, port)
    acknowledged: list[tuple[int, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender(worker: int) -> None:
        seq = 0
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                while not stop.is_set():
                    smtp.sendmail("a@b.example", ["c@d.example"], body_for(worker, seq))
                    with lock:
                        acknowledged.append((worker, seq))
                    seq += 1
        except (smtplib.SMTPException, OSError):
            pass  # the server died under us: expected

    workers = [threading.Thread(target=sender, args=(w,)) for w in range(4)]
    for thread in workers:
        thread.start()
    time.sleep(2.0)
    with lock:
        before_kill = len(acknowledged)
    proc.send_signal(signal.SIGKILL)
    stop.set()
    for thread in workers:
        thread.join(15)
    proc.communicate(timeout=10)
    assert before_kill > 10, "the load never got going"
    stored = {}
    for path in (tmp_path / "Maildir" / "new").iterdir():
        data = path.read_bytes()
        tag = data.split(b"X-Seq: ", 1)[1].split(b"\r\n", 1)[0].decode()
        stored[tag] = data
    for worker, seq in acknowledged:
        data = stored.get(f"{worker}-{seq}")
        assert data is not None, f"acknowledged message {worker}-{seq} is missing"
        assert data.endswith(body_for(worker, seq)), f"{worker}-{seq} is incomplete"
    for tag, data in stored.items():
        worker, seq = map(int, tag.split("-"))
        assert data.endswith(body_for(worker, seq)), f"half-written {tag} in new/"


def test_sigterm_lets_the_message_in_flight_finish(tmp_path) -> None:
    """SIGTERM mid-DATA: the message is answered 250 and stored, then 421."""
    port = free_port()
    proc = start_maildir_server(tmp_path, port, "--shutdown-grace", "20")
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(
            b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
            b"DATA\r\n"
        )
        while not reader.readline().startswith(b"354"):
            pass
        sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        sock.sendall(b"second half\r\n.\r\n")
        replies = [reader.readline(), reader.readline()]
    output, _ = proc.communicate(timeout=30)
    assert replies[0].startswith(b"250 2.0.0 OK: queued as "), (replies, output)
    assert replies[1].startswith(b"421 4.3.2 "), replies
    # twistd re-raises the signal it stopped on, so -SIGTERM is a clean exit.
    assert proc.returncode in (0, -signal.SIGTERM), output
    files = list((tmp_path / "Maildir" / "new").iterdir())
    assert 1 == len(files)
    assert files[0].read_bytes().endswith(b"first half\r\nsecond half\r\n")


@pytest_twisted.inlineCallbacks
def test_five_thousand_idle_sessions(listen):
    """5,000 idle sessions are held, and a new client is still served."""
    memory = MemoryHandler()
    port = listen(memory, limits=Limits(timeout=120))
    count = 5000

    def client():
        sockets = []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                sockets.append(sock)
            greeted = 0
            for sock in sockets:
                if sock.recv(128).startswith(b"220 "):
                    greeted += 1
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.sendmail("a@b.example", ["c@d.example"], b"still served\r\n")
            return greeted
        finally:
            for sock in sockets:
                sock.close()

    greeted = yield threads.deferToThread(client)
    assert count == greeted
    assert [b"still served\r\n"] == [e.content for e in memory.messages]


def worker_pids(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_sigkill_of_a_worker_mid_load(tmp_path) -> None:
    """A worker killed under load: nothing acknowledged is lost, it comes back.

    Senders reconnect when their session dies; every 250 they got is a whole
    file in new/, and the pool is back to its size with a new process.
    """
    port = free_port()
    proc = start_maildir_server(tmp_path, port, "--workers", "3", "--quiet")
    acknowledged: list[tuple[int, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender(worker: int) -> None:
        seq = 0
        while not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    while not stop.is_set():
                        smtp.sendmail(
                            "a@b.example", ["c@d.example"], body_for(worker, seq)
                        )
                        with lock:
                            acknowledged.append((worker, seq))
                        seq += 1
            except (smtplib.SMTPException, OSError):
                # The process under us was killed: that message may or may
                # not be stored (it got no 250); reconnect.
                seq += 1

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(worker_pids(proc.pid)) < 2:
        time.sleep(0.1)
    before = worker_pids(proc.pid)
    assert 2 == len(before)
    threads_ = [threading.Thread(target=sender, args=(w,)) for w in range(6)]
    for thread in threads_:
        thread.start()
    try:
        time.sleep(1.5)
        os.kill(before[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = worker_pids(proc.pid)
            if len(now) == 2 and before[0] not in now:
                break
            time.sleep(0.1)
        after = worker_pids(proc.pid)
        time.sleep(1.0)  # the load goes on over the new worker too
    finally:
        stop.set()
        for thread in threads_:
            thread.join(30)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert 2 == len(after) and before[0] not in after, output
    assert "ended: killed by SIGKILL; starting it again" in output
    assert len(acknowledged) > 20, "the load never got going"
    stored = {}
    for path in (tmp_path / "Maildir" / "new").iterdir():
        data = path.read_bytes()
        tag = data.split(b"X-Seq: ", 1)[1].split(b"\r\n", 1)[0].decode()
        stored[tag] = data
    for worker, seq in acknowledged:
        data = stored.get(f"{worker}-{seq}")
        assert data is not None, f"acknowledged message {worker}-{seq} is missing"
        assert data.endswith(body_for(worker, seq)), f"{worker}-{seq} is incomplete"
    assert "Traceback" not in output
