"""--workers scaling: msgs/s with 1 and 2 processes under the same smtp-source load.

    python bench/workers.py [--messages 30000] [--sessions 40]

The servers run as a user runs them (as bench/run.py's default variant):
twistd -n with the plugin's default log observer (twisted_smtpd.fastlog),
its log on standard output pointed at os.devnull; with --quiet, as before.
Unpinned (the workers need both cores), so the load generator competes for
CPU too; the output shows its CPU share so you can tell when it is the limit.
Loopback only; each run is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import cpu_seconds, free_port, smtp_source_argv  # noqa: E402
from _process import twistd  # noqa: E402


def children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(p) for p in open(path).read().split()] if os.path.exists(path) else []


def run(workers: int, args: argparse.Namespace) -> dict:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    workdir = tempfile.mkdtemp(prefix="bench-workers-")
    errors = open(os.path.join(workdir, "stderr.log"), "wb")
    server = subprocess.Popen(
        [
            *twistd(),
            "-n",
            "--pidfile=",
            "smtpd",
            "--quiet",
            "--workers",
            str(workers),
            "--port",
            f"tcp:{port}:interface=127.0.0.1:backlog=1024",
            "--handler",
            "twisted_smtpd.handlers.discard",
        ],
        cwd=workdir,
        env=env,
        # The log lines are written (and paid for) but not kept; start-up
        # errors (stderr) are.
        stdout=subprocess.DEVNULL,
        stderr=errors,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    errors.flush()
                    tail = open(errors.name, "rb").read()[-2000:].decode()
                    raise RuntimeError(f"twistd smtpd did not start:\n{tail}")
                time.sleep(0.1)
        time.sleep(2.0)  # let the workers import and adopt the socket
        pids = [server.pid, *children(server.pid)]
        before = [cpu_seconds(p) for p in pids]
        start = time.monotonic()
        client = subprocess.run(
            smtp_source_argv(
                port,
                *("-c", "-d", "-s", str(args.sessions), "-m", str(args.messages)),
                *("-l", "1000"),
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=args.timeout,
        )
        elapsed = time.monotonic() - start
        per_process = [cpu_seconds(p) - b for p, b in zip(pids, before)]
        server_cpu = sum(per_process)
        return {
            # how evenly the kernel spread the work: CPU-s of each process
            "cpu_per_process": [round(c, 2) for c in per_process],
            "workers": workers,
            "msgs_per_s": args.messages / elapsed,
            "server_cpu_share": server_cpu / elapsed,
            "msgs_per_cpu_s": args.messages / server_cpu,
            # flat when scaling is free: the same CPU per message in 1 or N
            "cpu_us_per_msg": 1e6 * server_cpu / args.messages,
            "errors": client.stderr.decode()[-200:],
        }
    finally:
        server.terminate()
        server.wait(30)
        errors.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    results = [run(n, args) for n in (1, 2)]
    for r in results:
        print(
            f"workers={r['workers']}: {r['msgs_per_s']:,.0f} msgs/s,"
            f" server CPU {r['server_cpu_share']:.2f} cores,"
            f" {r['msgs_per_cpu_s']:,.0f} msgs/CPU-s,"
            f" {r['cpu_us_per_msg']:.0f} µs CPU/msg,"
            f" CPU-s per process {r['cpu_per_process']} {r['errors']}"
        )
    one, two = results
    print(
        f"2 workers / 1 worker: {two['msgs_per_s'] / one['msgs_per_s']:.2f}x msgs/s,"
        f" {two['msgs_per_cpu_s'] / one['msgs_per_cpu_s']:.2f}x per server CPU-s,"
        f" CPU/msg {one['cpu_us_per_msg']:.0f} -> {two['cpu_us_per_msg']:.0f} µs"
        f" (cores the server got: {two['server_cpu_share']:.2f})"
    )


if __name__ == "__main__":
    main()
