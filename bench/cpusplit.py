"""User and system CPU per connection, one server after another (conn shape).

    python bench/cpusplit.py [--servers ts,floor,tm] [--messages 20000]
    python bench/cpusplit.py --servers ts:/path/to/other/tree,ts

Each server runs pinned to CPU 0; postfix's smtp-source sends one 1 KB
message per connection, 20 sessions at a time, from CPU 1.  The figures are
the server's utime and stime (``/proc/PID/stat``) per message over the run,
after a warm-up.  ``ts`` is ``twistd -n smtpd --quiet`` from a source tree
(this one unless ``ts:TREE``), ``floor`` and ``tm`` the reference servers.

This split answers what py-spy cannot: its samples fold a C call's time
into the Python line that made it, so the recv/send/accept lines look like
most of the cost, while the user time shows how much is the Python above
them (on 2026-12-01: ts --quiet ~105 µs user against the floor's ~75-80,
system time alike).  Run it under ``flock /tmp/bench.lock`` on a shared box.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import CLK_TCK, free_port, smtp_source_argv  # noqa: E402
from _process import HERE, ROOT, twistd  # noqa: E402


def user_system(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def start(name: str, tree: str, port: int) -> subprocess.Popen:
    servers = os.path.join(HERE, "servers")
    if name == "floor":
        argv = [sys.executable, os.path.join(servers, "floor_server.py")]
        argv += ["--port", str(port)]
    elif name == "tm":
        argv = [sys.executable, os.path.join(servers, "twisted_mail_server.py")]
        argv += ["--port", str(port)]
    else:
        argv = [
            *twistd(),
            "-n",
            "--pidfile=",
            "smtpd",
            "--quiet",
            "--port",
            f"tcp:{port}:interface=127.0.0.1:backlog=1024",
            "--hostname",
            "bench.local",
            "--handler",
            "twisted_smtpd.handlers.discard",
        ]
    proc = subprocess.Popen(
        ["taskset", "-c", "0", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=tree),
        cwd=tree,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"{name} did not listen on {port}")


def send(port: int, messages: int) -> None:
    argv = smtp_source_argv(port, "-s", "20", "-l", "1000", "-m", str(messages))
    subprocess.run(["taskset", "-c", "1", *argv], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="ts,floor,tm")
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'server':<8} {'tree':<24} {'user µs':>8} {'sys µs':>8} {'total':>8}")
    for spec in args.servers.split(","):
        name, _, tree = spec.partition(":")
        tree = os.path.abspath(tree or ROOT)
        port = free_port()
        proc = start(name, tree, port)
        try:
            send(port, 2000)  # warm-up
            user0, system0 = user_system(proc.pid)
            send(port, args.messages)
            user1, system1 = user_system(proc.pid)
        finally:
            proc.terminate()
            proc.wait()
        user = (user1 - user0) / args.messages * 1e6
        system = (system1 - system0) / args.messages * 1e6
        shown = tree if len(tree) <= 24 else "..." + tree[-21:]
        print(f"{name:<8} {shown:<24} {user:8.1f} {system:8.1f} {user + system:8.1f}")


if __name__ == "__main__":
    main()
