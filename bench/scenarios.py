"""The benchmark scenarios and their runners: throughput, idle memory, big message."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
from _common import proc_status_kib, reset_peak_rss, smtp_source_argv, window_rate  # noqa: E402
from _process import (  # noqa: E402
    LineChild,
    Sampler,
    Server,
    add_cpu,
    kill,
    others,
    pinned,
    server_cpus,
    spawn,
)

SCENARIOS: dict[str, dict[str, Any]] = {
    "conn": dict(
        title="1 msg/connection, 20 sessions (smtp-source)",
        kind="smtp-source",
        unit="msgs/s",
        higher=True,
        argv=["-s", "20", "-l", "1000"],
        size=1000,
    ),
    "session": dict(
        title="many msgs/connection, 20 sessions (smtp-source -d)",
        kind="smtp-source",
        unit="msgs/s",
        higher=True,
        argv=["-d", "-s", "20", "-l", "1000"],
        size=1000,
    ),
    "pipelined": dict(
        title="pipelined transactions, 20 connections (loadgen)",
        kind="loadgen",
        unit="msgs/s",
        higher=True,
        argv=["pipelined", "-c", "20", "--size", "1000"],
    ),
    "100k": dict(
        title="100 KB messages, 10 sessions (smtp-source -d)",
        kind="smtp-source",
        unit="msgs/s",
        higher=True,
        argv=["-d", "-s", "10", "-l", "102400"],
        size=102400,
    ),
    "10m": dict(
        title="10 MB messages, 1 connection (loadgen): DATA MB/s",
        kind="loadgen",
        unit="MB/s",
        higher=True,
        metric="mb_per_s",
        argv=["bulk", "-c", "1", "--size", str(10 * 1024 * 1024)],
    ),
    "idle": dict(
        title="idle connections: RSS increase per connection",
        kind="idle",
        unit="KiB/conn",
        higher=False,
    ),
    "100m": dict(
        title="one 100 MB message: peak RSS increase (twisted_smtpd: Maildir)",
        kind="bigmsg",
        unit="MiB",
        higher=False,
    ),
}


DEFAULT_ORDER = ["conn", "session", "pipelined", "100k", "10m", "idle", "100m"]


def run_smtp_source(server: Server, scen: dict, opts: argparse.Namespace) -> dict:
    size = scen["size"]
    argv = pinned(
        opts.client_cpu,
        smtp_source_argv(server.port, "-c", "-m", "100000000", *scen["argv"]),
    )
    events: list[tuple[float, int, int]] = []
    err_path = os.path.join(opts.workdir, "smtp-source.err")
    with open(err_path, "wb") as err:
        t0 = time.monotonic()
        proc = spawn(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        sampler = Sampler(
            {"server": server.pid, "client": proc.pid, **others(server)},
            cpus=server_cpus(opts),
        )
        sampler.start()

        def reader() -> None:
            fd = proc.stdout.fileno()  # type: ignore[union-attr]
            tail = b""
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                now = time.monotonic()
                parts = (tail + data).split(b"\r")
                tail = parts.pop()
                for part in parts:
                    part = part.strip()
                    if part.isdigit():
                        n = int(part)
                        events.append((now, n, n * size))

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        end = t0 + opts.warmup + opts.duration
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.05)
        exited_early = proc.poll() is not None
        kill(proc, grace=2.0)
        thread.join(2)
        sampler.stop()
    with open(err_path, "rb") as f:
        stderr = f.read().decode("utf-8", "replace").strip()
    result = window_rate(list(events), t0, opts.warmup, opts.duration)
    add_cpu(result, sampler, scen)
    if exited_early or "fatal" in stderr:
        result["error"] = (stderr.splitlines() or ["smtp-source exited early"])[-1][
            :300
        ]
    return result


def run_loadgen(
    server: Server,
    scen: dict,
    opts: argparse.Namespace,
    extra: Optional[list[str]] = None,
) -> dict:
    max_time = opts.warmup + opts.duration + 60
    argv = pinned(
        opts.client_cpu,
        [
            sys.executable,
            os.path.join(HERE, "loadgen.py"),
            *scen["argv"],
            "--port",
            str(server.port),
            "--warmup",
            str(opts.warmup),
            "--duration",
            str(opts.duration),
            "--max-time",
            str(max_time),
            *(extra or []),
        ],
    )
    proc = spawn(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    sampler = Sampler(
        {"server": server.pid, "client": proc.pid, **others(server)},
        cpus=server_cpus(opts),
    )
    sampler.start()
    try:
        out, err = proc.communicate(timeout=max_time + 20)
    except subprocess.TimeoutExpired:
        kill(proc)
        sampler.stop()
        return {"error": "loadgen timed out", "msgs_per_s": 0.0, "mb_per_s": 0.0}
    sampler.stop()
    kill(proc)
    try:
        result = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {
            "error": f"loadgen failed: {err.decode()[-500:]}",
            "msgs_per_s": 0.0,
            "mb_per_s": 0.0,
        }
    add_cpu(result, sampler, scen)
    if result.get("error_count"):
        result["error"] = "; ".join(result.get("errors", []))[:300]
    return result


def run_idle(name: str, opts: argparse.Namespace) -> dict:
    server = Server(name, opts).start()
    child = None
    try:
        n = opts.idle_connections
        child = LineChild(
            pinned(
                opts.client_cpu,
                [
                    sys.executable,
                    os.path.join(HERE, "loadgen.py"),
                    "idle",
                    "-c",
                    str(n),
                    "--port",
                    str(server.port),
                    "--max-time",
                    "120",
                ],
            )
        )
        child.expect("WARM", 30)
        time.sleep(0.3)
        rss0 = proc_status_kib(server.pid, "VmRSS")
        child.send("go")
        ready = child.expect("READY", 90).split()
        opened, failed = int(ready[1]), int(ready[2])
        time.sleep(0.5)
        rss1 = max(proc_status_kib(server.pid, "VmRSS") or 0 for _ in range(3))
        child.send("close")
        tail = child.expect("{", 30)
        detail = json.loads(tail)
        result = {
            "kib_per_conn": (rss1 - rss0) / opened if opened else None,
            "rss_before_kib": rss0,
            "rss_after_kib": rss1,
            "opened": opened,
            "failed": failed,
            "alive_at_close": detail.get("alive_at_close"),
        }
        if failed or detail.get("error_count"):
            result["error"] = f"{failed} connections failed: {detail.get('errors')}"
        return result
    finally:
        if child is not None:
            kill(child.proc)
        server.stop()


def run_bigmsg(name: str, opts: argparse.Namespace) -> dict:
    maildir = None
    if name == "twisted_smtpd":
        maildir = tempfile.mkdtemp(prefix="maildir-", dir=opts.workdir)
    server = Server(name, opts, maildir=maildir).start()
    try:
        size = opts.big_size
        loadgen = [
            sys.executable,
            os.path.join(HERE, "loadgen.py"),
            "single",
            "--port",
            str(server.port),
            "--warmup",
            "0",
            "--duration",
            "0",
        ]
        # warm-up: one small message through the same code path
        subprocess.run(
            pinned(opts.client_cpu, loadgen + ["--size", "20000", "--max-time", "30"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        time.sleep(0.3)
        reset = reset_peak_rss(server.pid)
        rss0 = proc_status_kib(server.pid, "VmRSS") or 0
        hwm0 = proc_status_kib(server.pid, "VmHWM") or 0
        t = time.monotonic()
        done = subprocess.run(
            pinned(
                opts.client_cpu, loadgen + ["--size", str(size), "--max-time", "150"]
            ),
            capture_output=True,
            timeout=180,
        )
        elapsed = time.monotonic() - t
        hwm1 = proc_status_kib(server.pid, "VmHWM") or 0
        rss1 = proc_status_kib(server.pid, "VmRSS") or 0
        result: dict[str, Any] = {
            "mib_increase": (hwm1 - rss0) / 1024,
            "rss_before_kib": rss0,
            "hwm_before_kib": hwm0,
            "hwm_after_kib": hwm1,
            "rss_after_kib": rss1,
            "hwm_reset": reset,
            "seconds": elapsed,
            "mb_per_s": size / elapsed / 1e6,
            "handler": "maildir" if maildir else "discard",
        }
        sent = 0
        try:
            detail = json.loads(done.stdout.decode().strip().splitlines()[-1])
            sent = detail.get("total_bytes", 0)
            result["bytes"] = sent
            if detail.get("error_count") or detail.get("total_messages") != 1:
                result["error"] = (
                    "; ".join(detail.get("errors", []))[:300] or "not accepted"
                )
        except (ValueError, IndexError):
            result["error"] = "loadgen failed: " + done.stderr.decode()[-300:]
        if maildir:
            new_dir = os.path.join(maildir, "new")
            sizes = sorted(
                os.path.getsize(os.path.join(new_dir, f)) for f in os.listdir(new_dir)
            )
            result["maildir_sizes"] = sizes
            # the file holds the message plus Return-Path and Received lines
            if not sizes or sizes[-1] < sent:
                result["error"] = (
                    f"Maildir holds {sizes}, expected a file >= {sent} bytes"
                )
        return result
    finally:
        server.stop()
        if maildir:
            shutil.rmtree(maildir, ignore_errors=True)
