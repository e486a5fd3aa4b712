"""Clients that never read, and stalled TLS handshakes (issue 11 items 2-4).

    python bench/hardening.py [--megabytes 16] [--clients 1 4] [--timeout 5]

1. Memory: start ``twistd smtpd --handler discard``, then for each count in
   ``--clients`` connect that many raw sockets with a small receive buffer
   that send ``--megabytes`` MB of pipelined ``EHLO`` each and read nothing.
   Reports the server's RSS (``/proc/PID/status``) before and at the end,
   and whether the idle timeout (``--timeout``) then ended the sessions.
2. Slots: ``--max-connections 3 --tls-handshake-timeout 2``, three clients
   that stall a handshake (``EHLO``, ``STARTTLS``, then nothing; or connect
   to an ``ssl:`` listener and send nothing), then a fourth client: how long
   until it gets its ``220``.

Loopback only; every wait is bounded (sends stop when the server stops
reading; each phase has a deadline).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from _common import free_port, proc_status_kib  # noqa: E402


def _start(workdir: str, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "-l",
            os.path.join(workdir, "twistd.log"),
            "smtpd",
            "--handler",
            "twisted_smtpd.handlers.discard",
            "--quiet",
            *options,
        ],
        cwd=workdir,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )


def _wait_listening(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("twistd exited at start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("twistd did not start listening")


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _flood(port: int, megabytes: float, socks: list) -> int:
    """Send EHLO lines without reading until sent or the server stops reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(3)  # the server stopped reading for this long: it is full
    socks.append(sock)
    chunk = b"EHLO flood.example\r\n" * 3276  # 64 KiB
    total, sent = int(megabytes * 1_000_000), 0
    try:
        while sent < total:
            sent += sock.send(chunk)
    except OSError:
        pass
    return sent


def _flood_into(sent: list, i: int, port: int, megabytes: float, socks: list) -> None:
    sent[i] = _flood(port, megabytes, socks)


def memory(opts: argparse.Namespace, workdir: str) -> list[dict]:
    results = []
    for clients in opts.clients:
        port = free_port()
        server = _start(
            workdir, "--port", f"tcp:{port}", "--timeout", str(opts.timeout)
        )
        try:
            _wait_listening(port, server)
            time.sleep(0.5)
            before = proc_status_kib(server.pid, "VmRSS")
            socks: list = []
            sent = [0] * clients

            threads = [
                threading.Thread(
                    target=_flood_into, args=(sent, i, port, opts.megabytes, socks)
                )
                for i in range(clients)
            ]
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            during = proc_status_kib(server.pid, "VmRSS")
            peak = proc_status_kib(server.pid, "VmHWM")
            # The idle timeout plus the close grace must end every session.
            closed_after = None
            deadline = time.monotonic() + opts.timeout + 30
            while time.monotonic() < deadline and closed_after is None:
                if all(_closed_by_peer(s) for s in socks):
                    closed_after = round(time.monotonic() - started, 1)
                time.sleep(0.2)
            for s in socks:
                s.close()
            results.append(
                {
                    "clients": clients,
                    "sent_mb_each": round(min(sent) / 1e6, 2),
                    "rss_before_mb": round(before / 1024, 1),
                    "rss_flooded_mb": round(during / 1024, 1),
                    "rss_peak_mb": round(peak / 1024, 1),
                    "all_closed_after_s": closed_after,
                }
            )
        finally:
            _stop(server)
    return results


def _closed_by_peer(sock: socket.socket) -> bool:
    """Drain what the server sent; True once it closed (EOF or reset)."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _stall_starttls(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.recv(1024)
    sock.sendall(b"EHLO stall.example\r\nSTARTTLS\r\n")
    data = b""
    while b"220 2.0.0" not in data:
        data += sock.recv(4096)
    return sock


def _greeting_after(port: int, tls: bool, limit: float) -> float | None:
    """Seconds until a new client gets a 220 (retrying past 421s), or None."""
    started = time.monotonic()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    while time.monotonic() - started < limit:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            if tls:
                sock = context.wrap_socket(sock)
            if sock.recv(1024).startswith(b"220 "):
                return round(time.monotonic() - started, 2)
        except OSError:
            pass
        finally:
            sock.close()
        time.sleep(0.2)
    return None


def slots(opts: argparse.Namespace, workdir: str) -> list[dict]:
    from tests.certs import make_certificates

    certs = make_certificates(__import__("pathlib").Path(workdir))
    results = []
    for kind in ("starttls", "ssl"):
        port = free_port()
        if kind == "ssl":
            endpoint = f"ssl:{port}:privateKey={certs['key']}:certKey={certs['cert']}"
        else:
            endpoint = f"tcp:{port}"
        server = _start(
            workdir,
            "--port",
            endpoint,
            "--tls-cert",
            str(certs["cert"]),
            "--tls-key",
            str(certs["key"]),
            "--max-connections",
            "3",
            "--timeout",
            "300",
            "--tls-handshake-timeout",
            str(opts.handshake_timeout),
        )
        try:
            _wait_listening(port, server)
            time.sleep(1)  # the probe's slot is released
            if kind == "ssl":
                stalled = [
                    socket.create_connection(("127.0.0.1", port)) for _ in range(3)
                ]
            else:
                stalled = [_stall_starttls(port) for _ in range(3)]
            waited = _greeting_after(port, kind == "ssl", opts.handshake_timeout + 30)
            for s in stalled:
                s.close()
            results.append(
                {
                    "listener": kind,
                    "handshake_timeout_s": opts.handshake_timeout,
                    "fourth_client_greeted_after_s": waited,
                }
            )
        finally:
            _stop(server)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=16)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--timeout", type=int, default=5, help="--timeout of twistd")
    parser.add_argument("--handshake-timeout", type=int, default=2)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        report = {"memory": memory(opts, workdir), "slots": slots(opts, workdir)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
