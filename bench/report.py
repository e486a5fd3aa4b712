"""Summaries, tables, paired ratios and the targets of a benchmark run."""

from __future__ import annotations

import os
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
from _process import EXTRA_SERVERS, LABELS, SERVERS  # noqa: E402
from scenarios import SCENARIOS  # noqa: E402


def metric_of(key: str, result: Optional[dict]) -> Optional[float]:
    if not result:
        return None
    kind = SCENARIOS[key]["kind"]
    if kind == "idle":
        return result.get("kib_per_conn")
    if kind == "bigmsg":
        return result.get("mib_increase")
    return result.get(SCENARIOS[key].get("metric", "msgs_per_s"))


def fmt_value(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def median(values: list[float]) -> Optional[float]:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def paired_ratio(key: str, ours: list[dict], theirs: list[dict]) -> Optional[float]:
    """Median over rounds of ours/theirs, each pair measured in the same round.

    The two runs of a round are seconds apart, so a slow drift of the shared
    machine cancels out; best-of and per-CPU figures are taken over minutes.
    """
    by_round = {r.get("round"): r for r in theirs if not r.get("error")}
    ratios = []
    for run in ours:
        other = by_round.get(run.get("round"))
        if other is None or run.get("error"):
            continue
        value = ratio(metric_of(key, run), metric_of(key, other))
        if value is not None:
            ratios.append(value)
    return median(ratios)


def summarize(key: str, runs: list[dict]) -> dict:
    """Best wall-clock figure over the rounds, and the median per CPU-second."""
    good = [r for r in runs if metric_of(key, r) is not None and not r.get("error")]
    pick = max if SCENARIOS[key]["higher"] else min
    chosen = (
        pick(good, key=lambda r: metric_of(key, r))
        if good
        else (runs[-1] if runs else {})
    )
    return {
        "value": metric_of(key, chosen),
        "per_cpu_s": median([r["per_cpu_s"] for r in good if r.get("per_cpu_s")]),
        "server_cpu": chosen.get("server_cpu"),
        "foreign_cpu": chosen.get("foreign_cpu"),
        "samples": [metric_of(key, r) for r in runs],
        "error": next((r["error"] for r in runs if r.get("error")), None),
    }


def table(summary: dict, field: str = "value", keys: Optional[list[str]] = None) -> str:
    extras = [
        x for x in EXTRA_SERVERS if any(x in e["servers"] for e in summary.values())
    ]
    header = [
        "scenario",
        "unit",
        "twisted_smtpd",
        "twisted.mail",
        "aiosmtpd",
        "ts/tm",
        "ts/aio",
    ]
    if field == "value":
        header.append("ts CPU")
    header += [LABELS[x] for x in extras]
    rows = [header]
    for key, entry in summary.items():
        if keys is not None and key not in keys:
            continue
        per = entry["servers"]
        ts, tm, aio = (per.get(s, {}).get(field) for s in SERVERS)
        unit = (
            SCENARIOS[key]["unit"]
            if field == "value"
            else ("msgs/CPU-s" if SCENARIOS[key]["unit"] == "msgs/s" else "MB/CPU-s")
        )
        row = [
            key,
            unit,
            fmt_value(ts),
            fmt_value(tm),
            fmt_value(aio),
            fmt_value(ratio(ts, tm)) + "x" if ratio(ts, tm) else "-",
            fmt_value(ratio(ts, aio)) + "x" if ratio(ts, aio) else "-",
        ]
        if field == "value":
            cpu = per.get("twisted_smtpd", {}).get("server_cpu")
            row.append(pct(cpu) if cpu is not None else "")
        row += [fmt_value(per.get(x, {}).get(field)) for x in extras]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = []
    for n, r in enumerate(rows):
        out.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths))
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def targets(summary: dict) -> list[dict]:
    """The project's targets (issue 18), judged on the wall-clock figures, per
    server CPU-second and on the paired ratios (robust to a noisy machine).

    Like for like: the peers log nothing per message, so the ratio targets
    use ``--quiet``; the default's log line has its own, lower, bar.
    """
    checks = []

    def get(key: str, server: str, field: str = "value") -> Optional[float]:
        return summary.get(key, {}).get("servers", {}).get(server, {}).get(field)

    def rate_check(key: str, ours: str, other: str, need: float, what: str) -> None:
        if get(key, ours) is None or get(key, other) is None:
            return
        wall = ratio(get(key, ours), get(key, other))
        per_cpu = ratio(get(key, ours, "per_cpu_s"), get(key, other, "per_cpu_s"))
        paired = summary.get(key, {}).get("paired", {}).get((ours, other))
        checks.append(
            dict(
                target=f"{key}: {LABELS[ours]} {what} >= {need:g}x {LABELS[other]}",
                need=need,
                wall=wall,
                per_cpu=per_cpu,
                paired=paired,
                met=wall is not None and wall >= need,
                met_per_cpu=per_cpu is not None and per_cpu >= need,
                shown=f"{fmt_value(wall)}x wall, {fmt_value(per_cpu)}x per CPU-s,"
                f" {fmt_value(paired)}x paired",
            )
        )

    for key in ("conn", "session", "pipelined"):
        if key in summary:
            rate_check(key, "twisted_smtpd_quiet", "twisted_mail", 2.0, "msgs/s")
            floor_share = 0.5 if key == "pipelined" else 0.7
            rate_check(key, "twisted_smtpd_quiet", "floor", floor_share, "msgs/s")
            rate_check(key, "twisted_smtpd", "twisted_mail", 1.5, "msgs/s")
    if "100k" in summary:
        rate_check("100k", "twisted_smtpd", "twisted_mail", 3, "msgs/s")
    if "10m" in summary:
        rate_check("10m", "twisted_smtpd", "twisted_mail", 3, "DATA MB/s")
    if "idle" in summary:
        v = get("idle", "twisted_smtpd")
        checks.append(
            dict(
                target="idle: <= 2.5 KiB per connection",
                wall=v,
                met=v is not None and v <= 2.5,
                shown=f"{fmt_value(v)} KiB",
            )
        )
    if "100m" in summary:
        v = get("100m", "twisted_smtpd")
        checks.append(
            dict(
                target="100m: peak RSS increase < 16 MiB (Maildir)",
                wall=v,
                met=v is not None and v < 16,
                shown=f"{fmt_value(v)} MiB",
            )
        )
    return checks


def verdict(check: dict) -> str:
    if "met_per_cpu" not in check:
        return "met" if check["met"] else "NOT met"
    need = check["need"]
    paired = check.get("paired")
    met = {
        "wall": check["met"],
        "per CPU-s": check["met_per_cpu"],
        "paired": paired is not None and paired >= need,
    }
    if all(met.values()):
        return "met"
    if not any(met.values()):
        return "NOT met"
    return "met " + " and ".join(k for k, v in met.items() if v) + " only"


_SHORT = {
    "twisted_smtpd": "ts",
    "twisted_smtpd_quiet": "ts-quiet",
    "twisted_smtpd_textlog": "ts-text",
    "twisted_smtpd_baseline": "ts-base",
    "twisted_mail": "tm",
    "aiosmtpd": "aio",
    "floor": "floor",
}


def paired_table(results: dict, keys: list[str]) -> str:
    """twisted_smtpd (and --quiet) over each peer, median of same-round ratios."""
    columns = [
        (ours, theirs)
        for ours, theirs in [
            ("twisted_smtpd", "twisted_smtpd_baseline"),
            *(
                (ours, theirs)
                for ours in (
                    "twisted_smtpd",
                    "twisted_smtpd_textlog",
                    "twisted_smtpd_quiet",
                )
                for theirs in ("twisted_mail", "aiosmtpd", "floor")
            ),
        ]
        if any(ours in results[k] and theirs in results[k] for k in keys)
    ]
    rows = [["scenario", *(f"{_SHORT[a]}/{_SHORT[b]}" for a, b in columns)]]
    for key in keys:
        row = [key]
        for ours, theirs in columns:
            runs = results[key]
            if ours in runs and theirs in runs:
                row.append(fmt_value(paired_ratio(key, runs[ours], runs[theirs])) + "x")
            else:
                row.append("-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
