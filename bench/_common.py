"""Helpers shared by the bench scripts (no third-party imports)."""

from __future__ import annotations

import os
import resource
import shutil
import socket
from collections.abc import Sequence
from typing import Optional

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"

#: (monotonic time, cumulative messages, cumulative message bytes)
Event = tuple


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def window_rate(
    events: Sequence[Event], t0: float, warmup: float, duration: float
) -> dict:
    """Messages/s and bytes/s between completion events inside the window.

    The window is [t0 + warmup, t0 + warmup + duration].  The rate is measured
    between the first and the last completion inside the window, so that it
    never counts a partly-sent message.  With fewer than two completions in
    the window the first two after warm-up are used, and failing that the
    rate since t0 (flagged ``"confidence": "low"``).
    """
    lo = t0 + warmup
    hi = lo + duration
    after = [e for e in events if e[0] >= lo]
    inside = [e for e in after if e[0] <= hi]
    confidence = "ok"
    if len(inside) >= 2:
        a, b = inside[0], inside[-1]
    elif len(after) >= 2:
        a, b = after[0], after[-1]
    elif events:
        a, b = (t0, 0, 0), events[-1]
        confidence = "low"
    else:
        return {
            "msgs_per_s": 0.0,
            "mb_per_s": 0.0,
            "messages": 0,
            "t_a": lo,
            "t_b": hi,
            "confidence": "none",
        }
    span = b[0] - a[0]
    if span <= 0:
        return {
            "msgs_per_s": 0.0,
            "mb_per_s": 0.0,
            "messages": 0,
            "t_a": a[0],
            "t_b": b[0],
            "confidence": "none",
        }
    return {
        "msgs_per_s": (b[1] - a[1]) / span,
        "mb_per_s": (b[2] - a[2]) / span / 1e6,
        "messages": b[1] - a[1],
        "span_s": span,
        "t_a": a[0],
        "t_b": b[0],
        "confidence": confidence,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smtp_source_argv(port: int, *options: str) -> list[str]:
    """postfix's smtp-source against 127.0.0.1:PORT as every bench drives it."""
    return [
        SMTP_SOURCE,
        *options,
        "-M",
        "bench.local",
        "-f",
        "bench@bench.local",
        "-t",
        "sink@bench.local",
        f"127.0.0.1:{port}",
    ]


def cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of a process, in seconds (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_busy_seconds(cpus: Sequence[int]) -> Optional[float]:
    """Busy time (everything but idle and iowait) of some CPUs, from /proc/stat."""
    wanted = {f"cpu{c}" for c in cpus}
    total = 0.0
    try:
        with open("/proc/stat") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in wanted:
                    v = [int(x) for x in parts[1:9]]
                    # user nice system idle iowait irq softirq steal
                    total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    except OSError:
        return None
    return total / CLK_TCK


def proc_status_kib(pid: int, key: str) -> Optional[int]:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs permission)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def message_body(size: int, *, subject: str = "benchmark") -> bytes:
    """A message of about C{size} bytes: headers, then 78-character text lines.

    Every line ends in CRLF; no line starts with a dot, so the body is already
    transparent (no stuffing needed) and the last line ends in CRLF.
    """
    header = (
        b"From: bench <bench@bench.local>\r\n"
        b"To: sink <sink@bench.local>\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <bench@bench.local>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
    )
    line = (
        b"The quick brown fox jumps over the lazy dog 0123456789 "
        b"abcdefghijklmnopqrstuvw\r\n"
    )
    assert len(line) == 80
    remaining = max(0, size - len(header))
    lines, rest = divmod(remaining, len(line))
    tail = b"x" * max(0, rest - 2) + b"\r\n" if rest >= 2 else b""
    return header + line * lines + tail
