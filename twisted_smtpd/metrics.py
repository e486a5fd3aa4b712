# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics, C{/healthz}, C{/readyz} and C{POST /drain}.

L{PrometheusEvents} is a L{SessionEvents} that counts what the protocol
reports into prometheus-client collectors.  L{MetricsResource} is the
twisted.web tree C{--metrics ENDPOINT} serves.

With C{--workers N} every process counts into prometheus-client's
multiprocess files (C{PROMETHEUS_MULTIPROC_DIR}, set by C{twistd smtpd}
before the first metric exists) and the parent's C{/metrics} merges them, so
one scrape sees the whole server.

Needs the C{metrics} extra (C{pip install twisted_smtpd[metrics]}); the rest
of the package never imports this module.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional

from OpenSSL import SSL
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, pages
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ._events import SessionEvents

__all__ = [
    "PrometheusEvents",
    "CertificateExpiry",
    "MetricsResource",
    "metrics_site",
    "MULTIPROC_ENV",
]

_log = Logger()

#: the environment variable prometheus-client's multiprocess mode reads
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Label values known in advance get a series at 0 from the start, so that
# rate() and alerts work before the first event of a kind.
SESSION_ENDS = ("quit", "timeout", "lost", "closed", "shutdown")
REFUSAL_REASONS = (
    "max_connections",
    "max_connections_per_ip",
    "shutting_down",
    "check_client",
    "auth_rate_limit",
)
MESSAGE_OUTCOMES = ("accepted", "refused", "too_big", "failed", "aborted")
REPLY_CLASSES = ("2xx", "3xx", "4xx", "5xx")
HOOKS = ("check_client", "check_sender", "check_recipient", "message")

HOOK_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
SESSION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


def multiprocess_dir() -> Optional[str]:
    """The multiprocess directory in use, or C{None} in single-process mode."""
    return os.environ.get(MULTIPROC_ENV) or None


class PrometheusEvents(SessionEvents):
    """Counts sessions, replies, messages, hooks, TLS and AUTH for Prometheus.

    Args:
        registry: where the collectors register in single-process mode;
            default a new private registry (so that several factories, or
            tests, do not collide).  In multiprocess mode
            (C{PROMETHEUS_MULTIPROC_DIR} set before prometheus-client was
            imported) values go to that directory's files and
            L{exposition_registry} merges them.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.multiprocess_dir = multiprocess_dir()
        if self.multiprocess_dir is not None:
            from prometheus_client import values

            if not getattr(values.ValueClass, "_multiprocess", False):
                raise RuntimeError(
                    f"{MULTIPROC_ENV} was set after prometheus-client was imported"
                )
            # Values live in the files; a registry would only hold duplicates.
            self.registry: Optional[CollectorRegistry] = None
        else:
            self.registry = CollectorRegistry() if registry is None else registry
        reg = self.registry
        self.sessions_open = Gauge(
            "smtpd_sessions_open",
            "Sessions open now.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.sessions = Counter(
            "smtpd_sessions",
            "Sessions ended, by how they ended.",
            ["how"],
            registry=reg,
        )
        self.session_duration = Histogram(
            "smtpd_session_duration_seconds",
            "How long sessions lasted.",
            registry=reg,
            buckets=SESSION_BUCKETS,
        )
        self.connections_refused = Counter(
            "smtpd_connections_refused",
            "Clients turned away before a session began, by reason.",
            ["reason"],
            registry=reg,
        )
        self.replies = Counter(
            "smtpd_replies",
            "Replies sent, by code class.",
            ["class"],
            registry=reg,
        )
        self.messages = Counter(
            "smtpd_messages",
            "Message transactions ended, by outcome.",
            ["outcome"],
            registry=reg,
        )
        self.received_bytes = Counter(
            "smtpd_received_bytes",
            "Bytes of message content received (every outcome).",
            registry=reg,
        )
        self.hook_duration = Histogram(
            "smtpd_hook_duration_seconds",
            'Handler hook latency; hook="message" is the delivery (the'
            " next hop's, with --deliver).",
            ["hook"],
            registry=reg,
            buckets=HOOK_BUCKETS,
        )
        self.hook_refusals = Counter(
            "smtpd_hook_refusals",
            "Hook calls that refused, raised or timed out, by hook.",
            ["hook"],
            registry=reg,
        )
        self.tls_handshakes = Counter(
            "smtpd_tls_handshakes",
            "TLS handshakes (STARTTLS and implicit), by result.",
            ["result"],
            registry=reg,
        )
        self.auth_attempts = Counter(
            "smtpd_auth_attempts",
            "AUTH exchanges, by result.",
            ["result"],
            registry=reg,
        )
        self.draining = Gauge(
            "smtpd_draining",
            "1 while the server drains (not accepting, /readyz says 503).",
            registry=reg,
            multiprocess_mode="livemax",
        )
        self._collectors: list[Any] = []
        # Children looked up once: events come on every reply.
        self._ends = {how: self.sessions.labels(how) for how in SESSION_ENDS}
        self._refusals = {
            reason: self.connections_refused.labels(reason)
            for reason in REFUSAL_REASONS
        }
        self._replies = {klass: self.replies.labels(klass) for klass in REPLY_CLASSES}
        self._messages = {
            outcome: self.messages.labels(outcome) for outcome in MESSAGE_OUTCOMES
        }
        self._hooks = {hook: self.hook_duration.labels(hook) for hook in HOOKS}
        self._hook_refusals = {hook: self.hook_refusals.labels(hook) for hook in HOOKS}
        self._tls = {
            ok: self.tls_handshakes.labels(_result(ok)) for ok in (True, False)
        }
        self._auth = {
            ok: self.auth_attempts.labels("success" if ok else "failure")
            for ok in (True, False)
        }

    # -- SessionEvents ----------------------------------------------------------
    def connection_refused(self, reason: str) -> None:
        child = self._refusals.get(reason)
        (child or self.connections_refused.labels(reason)).inc()

    def session_started(self) -> None:
        self.sessions_open.inc()

    def session_ended(self, how: str, seconds: float) -> None:
        self.sessions_open.dec()
        (self._ends.get(how) or self.sessions.labels(how)).inc()
        self.session_duration.observe(seconds)

    def reply_sent(self, code: int) -> None:
        klass = f"{code // 100}xx"
        (self._replies.get(klass) or self.replies.labels(klass)).inc()

    def message_received(self, outcome: str, size: int) -> None:
        (self._messages.get(outcome) or self.messages.labels(outcome)).inc()
        if size > 0:
            self.received_bytes.inc(size)

    def hook_finished(self, hook: str, seconds: float, ok: bool) -> None:
        (self._hooks.get(hook) or self.hook_duration.labels(hook)).observe(seconds)
        if not ok:
            refused = self._hook_refusals.get(hook)
            (refused or self.hook_refusals.labels(hook)).inc()

    def tls_handshake(self, ok: bool) -> None:
        self._tls[bool(ok)].inc()

    def auth_attempt(self, ok: bool) -> None:
        self._auth[bool(ok)].inc()

    # -- exposition -------------------------------------------------------------
    def add_collector(self, collector: Any) -> None:
        """Also expose C{collector} (computed at scrape time, in this process)."""
        self._collectors.append(collector)
        if self.registry is not None:
            self.registry.register(collector)

    def set_draining(self, draining: bool) -> None:
        self.draining.set(1 if draining else 0)

    def exposition_registry(self) -> CollectorRegistry:
        """The registry a scrape reads: ours, or the merged multiprocess files."""
        if self.registry is not None:
            return self.registry
        from prometheus_client.multiprocess import MultiProcessCollector

        forget_dead_processes(self.multiprocess_dir or "")
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)
        for collector in self._collectors:
            merged.register(collector)
        return merged


class CertificateExpiry:
    """When each certificate served now expires (after any SIGHUP reload).

    Args:
        contexts: the L{ServerTLSContext <twisted_smtpd.tls.ServerTLSContext>}s
            of the server.
    """

    name = "smtpd_tls_certificate_expiry_timestamp_seconds"

    def __init__(self, contexts: Iterable[Any]) -> None:
        self.contexts = list(contexts)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            self.name,
            "Expiry (Unix time) of the certificate served from each file.",
            labels=["certificate"],
        )
        seen = set()
        for context in self.contexts:
            # The identities in service now, so a failed reload shows.
            for identity in getattr(context, "_identities", ()):
                if identity.cert_path in seen:
                    continue  # an ssl: listener sharing a --tls-cert pair
                seen.add(identity.cert_path)
                leaf = SSL.Connection(identity.context, None).get_certificate()
                if leaf is not None:
                    expiry = leaf.to_cryptography().not_valid_after_utc
                    family.add_metric([identity.cert_path], expiry.timestamp())
        yield family

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # computed at scrape time: nothing to check on register


def _result(ok: bool) -> str:
    return "ok" if ok else "failed"


_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db$")


def forget_dead_processes(path: str) -> None:
    """Drop the live gauges of processes that are gone (a worker that died).

    Counters and histograms of a dead process stay: totals must not go down.
    """
    from prometheus_client.multiprocess import mark_process_dead

    pids = set()
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        match = _LIVE_GAUGE_FILE.search(name)
        if match:
            pids.add(int(match.group(1)))
    for pid in pids:
        if not _alive(pid):
            mark_process_dead(pid, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_local(request: Request) -> bool:
    address = request.getClientAddress()
    if isinstance(address, UNIXAddress):
        return True
    try:
        return ipaddress.ip_address(getattr(address, "host", "")).is_loopback
    except ValueError:
        return False


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, events: PrometheusEvents, reactor: object) -> None:
        super().__init__()
        self.events = events
        self.reactor = reactor

    def render_GET(self, request: Request) -> object:
        encoder, content_type = choose_encoder(request.getHeader("accept") or "")
        events = self.events

        def collect() -> bytes:
            return encoder(events.exposition_registry())

        # Collecting reads files in multiprocess mode: off the reactor thread.
        pool = self.reactor.getThreadPool()  # type: ignore[attr-defined]
        scraped: Deferred[bytes] = deferToThreadPool(self.reactor, pool, collect)  # type: ignore[arg-type]

        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def send(body: bytes) -> None:
            if gone:
                return  # the client left: nothing to write to
            request.setHeader("content-type", content_type)
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            _log.failure("smtpd: collecting metrics failed", failure)
            if gone:
                return
            request.setResponseCode(500)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            request.write(b"collecting metrics failed\n")
            request.finish()

        scraped.addCallbacks(send, failed)
        return NOT_DONE_YET


class _Text(Resource):
    isLeaf = True

    def __init__(self, answer: Callable[[], tuple[int, str]]) -> None:
        super().__init__()
        self.answer = answer

    def render_GET(self, request: Request) -> bytes:
        code, text = self.answer()
        request.setResponseCode(code)
        request.setHeader("content-type", "text/plain; charset=utf-8")
        request.setHeader("cache-control", "no-store")
        return f"{text}\n".encode()


class _Drain(Resource):
    isLeaf = True

    def __init__(self, drain: Callable[[], object]) -> None:
        super().__init__()
        self.drain = drain

    def render_POST(self, request: Request) -> bytes:
        request.setHeader("content-type", "text/plain; charset=utf-8")
        if not _is_local(request):
            # /metrics is often reachable by a whole monitoring network.
            request.setResponseCode(403)
            return b"drain is allowed from loopback or a unix socket only\n"
        self.drain()
        request.setResponseCode(202)
        return b"draining\n"


class MetricsResource(Resource):
    """C{/metrics}, C{/healthz}, C{/readyz} and C{POST /drain}.

    Args:
        events: the L{PrometheusEvents} the factory reports to.
        ready: true while the server accepts mail (C{/readyz} says 200).
        drain: starts a drain (C{POST /drain}); C{None}: no drain endpoint.
        reactor: for the scrape's thread pool; default the global reactor.
    """

    def __init__(
        self,
        events: PrometheusEvents,
        ready: Callable[[], bool],
        drain: Optional[Callable[[], object]] = None,
        reactor: object = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.putChild(b"metrics", _Metrics(events, reactor))
        self.putChild(b"healthz", _Text(lambda: (200, "ok")))
        self.putChild(
            b"readyz",
            _Text(lambda: (200, "ready") if ready() else (503, "not ready")),
        )
        if drain is not None:
            self.putChild(b"drain", _Drain(drain))

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("content-type", "text/plain; charset=utf-8")
        return b"twisted_smtpd: /metrics /healthz /readyz\n"

    def getChild(self, path: bytes, request: Request) -> Resource:
        # The default NoResource is deprecated (unescaped HTML).
        return pages.notFound()  # type: ignore[return-value]


class _QuietSite(Site):
    noisy = False
    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        """No access-log line: a scrape every few seconds would drown the log."""


def metrics_site(resource: Resource) -> Site:
    """A L{Site} for C{resource} that logs no line per request."""
    return _QuietSite(resource)
