"""The listen backlog: N clients connecting at the same moment (issue 11 item 6).

    python bench/backlog.py [--clients 10000] [--timeout 120] [--backlog 50 ...]

Starts ``twistd smtpd --handler discard`` once per listener variant — our
default (no ``backlog=`` in the endpoint string) and each ``--backlog N``
given (default: 50, Twisted's own default) — opens ``--clients``
non-blocking connections as fast as the kernel takes them, and counts the
``220`` greetings, keeping every connection open until all are greeted or
``--timeout`` passes.  Loopback only; bounded by the timeout and the client
count (each client needs a file descriptor here and one in the server).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from _common import free_port, raise_nofile  # noqa: E402


def _start(endpoint: str, workdir: str) -> subprocess.Popen:
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "-l",
            os.path.join(workdir, "twistd.log"),
            "smtpd",
            "--port",
            endpoint,
            "--handler",
            "twisted_smtpd.handlers.discard",
            "--quiet",
        ],
        cwd=workdir,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    return server


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


def _kernel_backlog(port: int) -> int | None:
    """Send-Q of the listening socket in ``ss -ltn``: its backlog."""
    try:
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True
        ).stdout
        return int(out.split()[2])
    except (OSError, IndexError, ValueError):
        return None


def burst(port: int, clients: int, timeout: float) -> dict:
    """Connect C{clients} sockets at once; time until each reads its 220."""
    selector = selectors.DefaultSelector()
    pending: dict[socket.socket, bytes] = {}
    refused = 0
    start = time.monotonic()
    for _ in range(clients):
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            refused += 1
            sock.close()
            continue
        pending[sock] = b""
        selector.register(sock, selectors.EVENT_READ)
    connected_in = time.monotonic() - start
    greeted: list[float] = []
    done: list[socket.socket] = []
    deadline = start + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            try:
                data = sock.recv(512)  # type: ignore[union-attr]
            except OSError:
                data = b""
            if not data:
                refused += 1
                selector.unregister(sock)
                del pending[sock]  # type: ignore[arg-type]
                sock.close()  # type: ignore[union-attr]
                continue
            pending[sock] += data  # type: ignore[index]
            if b"\r\n" in pending[sock]:  # type: ignore[index]
                if pending[sock].startswith(b"220 "):  # type: ignore[index]
                    greeted.append(time.monotonic() - start)
                selector.unregister(sock)
                del pending[sock]  # type: ignore[arg-type]
                done.append(sock)  # type: ignore[arg-type]
    for sock in [*done, *pending]:
        sock.close()
    selector.close()
    greeted.sort()
    return {
        "clients": clients,
        "greeted": len(greeted),
        "refused_or_reset": refused,
        "still_waiting": len(pending),
        "connect_calls_s": round(connected_in, 2),
        "all_greeted_s": round(greeted[-1], 2) if len(greeted) == clients else None,
        "p50_s": round(greeted[len(greeted) // 2], 3) if greeted else None,
        "p99_s": round(greeted[int(len(greeted) * 0.99) - 1], 3) if greeted else None,
        "timeout_s": timeout,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--backlog",
        type=int,
        action="append",
        help="also run with backlog=N in the endpoint string (default: 50)",
    )
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    limit = raise_nofile()
    if limit < args.clients + 100:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}; need {args.clients + 100}")
    from twisted_smtpd.tap import listen_backlog

    variants = [(f"default ({listen_backlog()})", "")]
    variants += [(str(n), f":backlog={n}") for n in (args.backlog or [50])]
    results = []
    for label, suffix in variants:
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="bench-backlog-")
        server = _start(f"tcp:{port}:interface=127.0.0.1{suffix}", workdir)
        try:
            _wait_listening(port, server)
            time.sleep(0.5)
            result = {"backlog": label, "kernel_backlog": _kernel_backlog(port)}
            result.update(burst(port, args.clients, args.timeout))
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
