"""Prometheus metrics, /healthz, /readyz and the drain (--metrics, SIGUSR1)."""

from __future__ import annotations

import datetime
import os
import signal
import smtplib
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import twisted.internet
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from twisted_smtpd.metrics import (
    CertificateExpiry,
    MetricsResource,
    PrometheusEvents,
    metrics_site,
)
from twisted_smtpd.tap import Options, SMTPService, makeService
from twisted_smtpd.testing import connect

from .helpers import free_port, start_twistd, wait_for_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_exposition(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(events: PrometheusEvents) -> Samples:
    return parse_exposition(generate_latest(events.exposition_registry()).decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


class TestPrometheusEvents:
    def test_every_known_series_starts_at_zero(self) -> None:
        """Alerts on rate() work before the first event of a kind."""
        samples = scrape(PrometheusEvents())
        for how in ("quit", "timeout", "lost", "closed", "shutdown"):
            assert 0 == value(samples, "smtpd_sessions_total", how=how)
        for outcome in ("accepted", "refused", "too_big", "failed", "aborted"):
            assert 0 == value(samples, "smtpd_messages_total", outcome=outcome)
        for klass in ("2xx", "3xx", "4xx", "5xx"):
            assert 0 == value(samples, "smtpd_replies_total", **{"class": klass})
        for reason in ("max_connections", "max_connections_per_ip", "shutting_down"):
            assert 0 == value(samples, "smtpd_connections_refused_total", reason=reason)
        for result in ("ok", "failed"):
            assert 0 == value(samples, "smtpd_tls_handshakes_total", result=result)
        for result in ("success", "failure"):
            assert 0 == value(samples, "smtpd_auth_attempts_total", result=result)
        assert 0 == value(samples, "smtpd_sessions_open")
        assert 0 == value(samples, "smtpd_received_bytes_total")
        assert 0 == value(samples, "smtpd_draining")

    def test_sessions(self) -> None:
        """Open sessions go up and down; ended ones count by how they ended."""
        events = PrometheusEvents()
        for _ in range(3):
            events.session_started()
        events.session_ended("quit", 0.2)
        events.session_ended("timeout", 301.0)
        samples = scrape(events)
        assert 1 == value(samples, "smtpd_sessions_open")
        assert 1 == value(samples, "smtpd_sessions_total", how="quit")
        assert 1 == value(samples, "smtpd_sessions_total", how="timeout")
        assert 0 == value(samples, "smtpd_sessions_total", how="lost")
        assert 2 == value(samples, "smtpd_session_duration_seconds_count")
        assert 301.2 == pytest.approx(
            value(samples, "smtpd_session_duration_seconds_sum")
        )
        assert 1 == value(samples, "smtpd_session_duration_seconds_bucket", le="0.5")
        assert 1 == value(samples, "smtpd_session_duration_seconds_bucket", le="300.0")
        assert 2 == value(samples, "smtpd_session_duration_seconds_bucket", le="+Inf")

    def test_replies_by_class(self) -> None:
        events = PrometheusEvents()
        for code in (220, 250, 250, 354, 421, 451, 550, 552):
            events.reply_sent(code)
        samples = scrape(events)
        counts = {
            klass: value(samples, "smtpd_replies_total", **{"class": klass})
            for klass in ("2xx", "3xx", "4xx", "5xx")
        }
        assert {"2xx": 3, "3xx": 1, "4xx": 2, "5xx": 2} == counts

    def test_messages_and_bytes(self) -> None:
        """Messages count by outcome; every outcome's bytes are received bytes."""
        events = PrometheusEvents()
        events.message_received("accepted", 1000)
        events.message_received("accepted", 24)
        events.message_received("too_big", 5000)
        events.message_received("aborted", 0)
        samples = scrape(events)
        assert 2 == value(samples, "smtpd_messages_total", outcome="accepted")
        assert 1 == value(samples, "smtpd_messages_total", outcome="too_big")
        assert 1 == value(samples, "smtpd_messages_total", outcome="aborted")
        assert 0 == value(samples, "smtpd_messages_total", outcome="failed")
        assert 6024 == value(samples, "smtpd_received_bytes_total")

    def test_hooks(self) -> None:
        """Latency per hook; refusals (refused, raised, timed out) counted apart."""
        events = PrometheusEvents()
        events.hook_finished("check_recipient", 0.004, True)
        events.hook_finished("check_recipient", 0.2, False)
        events.hook_finished("message", 3.0, True)
        samples = scrape(events)
        name = "smtpd_hook_duration_seconds"
        assert 2 == value(samples, f"{name}_count", hook="check_recipient")
        assert 1 == value(samples, f"{name}_bucket", hook="check_recipient", le="0.005")
        assert 1 == value(samples, f"{name}_count", hook="message")
        assert 0 == value(samples, f"{name}_bucket", hook="message", le="2.5")
        assert 1 == value(samples, f"{name}_bucket", hook="message", le="5.0")
        assert 0 == value(samples, f"{name}_count", hook="check_sender")
        refusals = "smtpd_hook_refusals_total"
        assert 1 == value(samples, refusals, hook="check_recipient")
        assert 0 == value(samples, refusals, hook="message")

    def test_tls_auth_refusals(self) -> None:
        events = PrometheusEvents()
        events.tls_handshake(True)
        events.tls_handshake(False)
        events.tls_handshake(False)
        events.auth_attempt(False)
        events.auth_attempt(True)
        events.connection_refused("max_connections_per_ip")
        events.connection_refused("shutting_down")
        events.connection_refused("shutting_down")
        samples = scrape(events)
        assert 1 == value(samples, "smtpd_tls_handshakes_total", result="ok")
        assert 2 == value(samples, "smtpd_tls_handshakes_total", result="failed")
        assert 1 == value(samples, "smtpd_auth_attempts_total", result="success")
        assert 1 == value(samples, "smtpd_auth_attempts_total", result="failure")
        refused = "smtpd_connections_refused_total"
        assert 1 == value(samples, refused, reason="max_connections_per_ip")
        assert 2 == value(samples, refused, reason="shutting_down")
        assert 0 == value(samples, refused, reason="max_connections")

    def test_unforeseen_label_values(self) -> None:
        """A reason or outcome added later is counted, not dropped or an error."""
        events = PrometheusEvents()
        events.connection_refused("dnsbl")
        events.session_ended("tarpit", 1.0)
        events.hook_finished("check_data", 0.1, False)
        samples = scrape(events)
        assert 1 == value(samples, "smtpd_connections_refused_total", reason="dnsbl")
        assert 1 == value(samples, "smtpd_sessions_total", how="tarpit")
        assert 1 == value(samples, "smtpd_hook_refusals_total", hook="check_data")

    def test_registries_are_private(self) -> None:
        """Two servers in one process do not collide or share counts."""
        first, second = PrometheusEvents(), PrometheusEvents()
        first.reply_sent(250)
        assert 0 == value(scrape(second), "smtpd_replies_total", **{"class": "2xx"})


def self_signed(directory: Path, expires: datetime.datetime) -> tuple[str, str]:
    """A certificate for mx.test that expires at C{expires}; (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.test")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
        .not_valid_after(expires)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.test")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_certificate_expiry_follows_reloads(tmp_path: Path) -> None:
    """The expiry is the served certificate's: a reload shows, a bad file too."""
    from twisted_smtpd.tls import ServerTLSContext

    first = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    renewed = datetime.datetime(2030, 4, 1, tzinfo=datetime.timezone.utc)
    cert, key = self_signed(tmp_path, first)
    context = ServerTLSContext([(cert, key)])
    events = PrometheusEvents()
    events.add_collector(CertificateExpiry([context, context]))
    name = "smtpd_tls_certificate_expiry_timestamp_seconds"
    assert first.timestamp() == value(scrape(events), name, certificate=cert)
    self_signed(tmp_path, renewed)
    assert first.timestamp() == value(scrape(events), name, certificate=cert)
    assert [] == context.reload_now()
    assert renewed.timestamp() == value(scrape(events), name, certificate=cert)
    Path(cert).write_text("half-written")
    assert context.reload_now()  # kept the previous certificate
    assert renewed.timestamp() == value(scrape(events), name, certificate=cert)


@pytest.fixture
def site_port() -> Any:
    """Serve a MetricsResource on 127.0.0.1; yield (port, events, state)."""
    from twisted.internet import reactor

    events = PrometheusEvents()
    state: dict[str, Any] = {"ready": True, "drains": 0}

    def drain() -> None:
        state["drains"] += 1

    resource = MetricsResource(events, ready=lambda: state["ready"], drain=drain)
    port = reactor.listenTCP(0, metrics_site(resource), interface="127.0.0.1")
    yield port.getHost().port, events, state
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.inlineCallbacks
def test_site_serves_metrics_health_and_readiness(site_port: Any) -> Any:
    """Over HTTP: the exposition parses; /healthz and /readyz answer by state."""
    import treq

    port, events, state = site_port
    base = f"http://127.0.0.1:{port}"
    events.message_received("accepted", 42)
    response = yield treq.get(f"{base}/metrics")
    assert 200 == response.code
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    samples = parse_exposition((yield response.text()))
    assert 1 == value(samples, "smtpd_messages_total", outcome="accepted")
    assert 42 == value(samples, "smtpd_received_bytes_total")

    response = yield treq.get(f"{base}/metrics", headers={"Accept": OPENMETRICS})
    assert response.headers.getRawHeaders("content-type")[0].startswith(
        "application/openmetrics-text"
    )
    assert (yield response.text()).endswith("# EOF\n")

    assert (200, "ok\n") == (yield _get(treq, f"{base}/healthz"))
    assert (200, "ready\n") == (yield _get(treq, f"{base}/readyz"))
    state["ready"] = False
    assert (503, "not ready\n") == (yield _get(treq, f"{base}/readyz"))
    assert (200, "ok\n") == (yield _get(treq, f"{base}/healthz"))
    assert 404 == (yield treq.get(f"{base}/nothing")).code


OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest_twisted.inlineCallbacks
def _get(treq: Any, url: str) -> Any:
    response = yield treq.get(url)
    return response.code, (yield response.text())


@pytest_twisted.inlineCallbacks
def test_post_drain_from_loopback(site_port: Any) -> Any:
    """POST /drain from 127.0.0.1 drains; GET does not."""
    import treq

    port, _, state = site_port
    url = f"http://127.0.0.1:{port}/drain"
    assert 405 == (yield treq.get(url)).code
    assert 0 == state["drains"]
    response = yield treq.post(url)
    assert (202, "draining\n") == (response.code, (yield response.text()))
    assert 1 == state["drains"]


def render_drain(client: Any) -> tuple[int, bytes, int]:
    drains: list[None] = []
    resource = MetricsResource(
        PrometheusEvents(), ready=lambda: True, drain=lambda: drains.append(None)
    )
    request = DummyRequest([b"drain"])
    request.method = b"POST"
    request.client = client
    body = resource.getChildWithDefault(b"drain", request).render(request)
    return request.responseCode or 200, body, len(drains)


def test_drain_refused_from_another_host() -> None:
    """/metrics is often open to a monitoring network: drain is loopback-only."""
    code, body, drains = render_drain(IPv4Address("TCP", "192.0.2.7", 40000))
    assert (403, 0) == (code, drains)
    assert b"loopback" in body


def test_drain_allowed_over_a_unix_socket() -> None:
    assert (202, b"draining\n", 1) == render_drain(UNIXAddress(b"/run/smtpd.sock"))


def test_no_drain_endpoint_without_a_drain() -> None:
    resource = MetricsResource(PrometheusEvents(), ready=lambda: True)
    request = DummyRequest([b"drain"])
    request.method = b"POST"
    child = resource.getChildWithDefault(b"drain", request)
    child.render(request)
    assert 404 == request.responseCode


# -- twistd smtpd --metrics ------------------------------------------------------


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def memory_reactor(monkeypatch: pytest.MonkeyPatch) -> MemoryReactorClock:
    reactor = MemoryReactorClock()
    monkeypatch.setattr(twisted.internet, "reactor", reactor)
    return reactor


DISCARD = ("--handler", "twisted_smtpd.handlers.discard", "--hostname", "mx.test")


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class TestOptions:
    def test_no_metrics_by_default(self, cwd: Path) -> None:
        """Without --metrics the factory reports to nobody and no site is made."""
        options = parse(*DISCARD)
        assert options["metrics_endpoint"] is None
        parent = makeService(options)
        assert parent.factory.events is None
        assert [] == parent.stop_after_drain

    def test_metrics_site(self, cwd: Path, memory_reactor: MemoryReactorClock) -> None:
        """--metrics adds a listener serving the factory's PrometheusEvents."""
        parent = makeService(parse(*DISCARD, "--metrics", "tcp:9464"))
        assert isinstance(parent.factory.events, PrometheusEvents)
        [site_listener] = parent.stop_after_drain
        assert isinstance(site_listener, StreamServerEndpointService)
        assert site_listener in list(parent)
        assert site_listener._raiseSynchronously
        parent.privilegedStartService()
        assert [2525, 9464] == [port for port, *_ in memory_reactor.tcpServers]

    def test_certificate_expiry_with_tls(
        self, cwd: Path, memory_reactor: MemoryReactorClock, tmp_path: Path
    ) -> None:
        """With --tls-cert, /metrics tells when the certificate expires."""
        expires = datetime.datetime(2031, 5, 6, tzinfo=datetime.timezone.utc)
        cert, key = self_signed(tmp_path, expires)
        parent = makeService(
            parse(
                *DISCARD, "--metrics", "tcp:9464", "--tls-cert", cert, "--tls-key", key
            )
        )
        samples = scrape(parent.factory.events)
        name = "smtpd_tls_certificate_expiry_timestamp_seconds"
        assert expires.timestamp() == value(samples, name, certificate=cert)

    def test_bad_endpoint(self, cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            parse(*DISCARD, "--metrics", "bogus:1")
        err = capsys.readouterr().err
        assert err.startswith("twistd smtpd: error: bad --metrics 'bogus:1': ")
        assert 1 == len(err.splitlines())

    def test_without_the_extra(
        self,
        cwd: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """No prometheus-client installed: one line saying which extra to install."""
        monkeypatch.setitem(sys.modules, "prometheus_client", None)
        with pytest.raises(SystemExit):
            parse(*DISCARD, "--metrics", "tcp:9464")
        assert (
            "twistd smtpd: error: --metrics needs prometheus-client:"
            " pip install 'twisted_smtpd[metrics]'\n"
        ) == capsys.readouterr().err


class TestDrain:
    def start(self, *args: str) -> SMTPService:
        parent = makeService(parse(*DISCARD, "--metrics", "tcp:9464", *args))
        parent.privilegedStartService()
        parent.startService()
        return parent

    def test_drain_stops_accepting_and_keeps_the_site(
        self, cwd: Path, memory_reactor: MemoryReactorClock
    ) -> None:
        """Drain: SMTP listeners stop, sessions get 421, /readyz's site stays."""
        parent = self.start()
        smtp_listener, site_listener = list(parent)
        client = connect(parent.factory)
        client.replies()
        assert parent.ready()
        drained: list[Any] = []
        parent.drain().addBoth(drained.append)
        assert not parent.ready()
        assert parent.draining
        assert (False, True) == (smtp_listener.running, site_listener.running)
        assert parent.factory.shutting_down
        assert [
            b"421 mx.test Service shutting down, closing connection"
        ] == client.replies()
        assert [] == drained
        assert 1 == value(scrape(parent.factory.events), "smtpd_draining")
        client.protocol.connectionLost(None)
        assert [None] == drained
        # A second drain (SIGUSR1 twice) changes nothing and fires at once.
        again: list[Any] = []
        parent.drain().addBoth(again.append)
        assert [None] == again
        # Then stopping (SIGTERM) closes the site too.
        stopped: list[Any] = []
        parent.stopService().addBoth(stopped.append)
        assert [None] == stopped
        assert not site_listener.running

    def test_drain_keeps_the_certificate_reloader(
        self,
        cwd: Path,
        memory_reactor: MemoryReactorClock,
        certificates: dict[str, Path],
    ) -> None:
        """A drain stops only the SMTP listeners: SIGHUP still reloads."""
        before = signal.getsignal(signal.SIGHUP)
        tls = ("--tls-cert", str(certificates["cert"]))
        parent = self.start(*tls, "--tls-key", str(certificates["key"]))
        try:
            reloader = signal.getsignal(signal.SIGHUP)
            assert before is not reloader
            parent.drain()
            assert reloader is signal.getsignal(signal.SIGHUP)
        finally:
            parent.stopService()

    def test_stop_keeps_the_reloader_until_the_sessions_end(
        self,
        cwd: Path,
        memory_reactor: MemoryReactorClock,
        certificates: dict[str, Path],
    ) -> None:
        """During a graceful stop SIGHUP still reloads (its default would kill)."""
        before = signal.getsignal(signal.SIGHUP)
        tls = ("--tls-cert", str(certificates["cert"]))
        parent = self.start(*tls, "--tls-key", str(certificates["key"]))
        reloader = signal.getsignal(signal.SIGHUP)
        client = connect(parent.factory)
        client.replies()
        parent.stopService()
        assert reloader is signal.getsignal(signal.SIGHUP)
        client.protocol.connectionLost(None)
        assert before is signal.getsignal(signal.SIGHUP)

    def test_sigusr1_is_ours_while_running(
        self, cwd: Path, memory_reactor: MemoryReactorClock
    ) -> None:
        """Starting takes SIGUSR1 (the drain); stopping gives it back."""
        before = signal.getsignal(signal.SIGUSR1)
        parent = self.start()
        try:
            assert before is not signal.getsignal(signal.SIGUSR1)
        finally:
            parent.stopService()
        assert before is signal.getsignal(signal.SIGUSR1)

    def test_stop_keeps_readyz_until_the_sessions_end(
        self, cwd: Path, memory_reactor: MemoryReactorClock
    ) -> None:
        """On SIGTERM the site answers 503 until the last session closes."""
        parent = self.start()
        smtp_listener, site_listener = list(parent)
        client = connect(parent.factory)
        client.replies()
        stopped: list[Any] = []
        parent.stopService().addBoth(stopped.append)
        assert (False, True) == (smtp_listener.running, site_listener.running)
        assert not parent.ready()
        client.protocol.connectionLost(None)
        assert [None] == stopped
        assert not site_listener.running


# -- real twistd processes -------------------------------------------------------


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_until(condition: Any, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def refuses(port: int) -> bool:
    """Nothing listens on C{port} (a reset means a listener is still closing)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # A worker's listener closed with our SYN in its backlog while
        # another may still listen (SO_REUSEPORT): not known yet, ask again.
        return False
    return False


@pytest.fixture
def twistd(tmp_path: Path) -> Any:
    """Start C{twistd smtpd --metrics}; stop it (SIGTERM) after the test."""
    procs = []
    readers = []

    def start(*args: str) -> tuple[Any, int, int, list[str]]:
        smtp, metrics = free_port(), free_port()
        proc = start_twistd(
            tmp_path,
            *DISCARD,
            "--port",
            f"tcp:{smtp}:interface=127.0.0.1",
            "--metrics",
            f"tcp:{metrics}:interface=127.0.0.1",
            *args,
        )
        procs.append(proc)
        wait_for_port(smtp, proc)
        wait_for_port(metrics, proc)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        readers.append(reader)
        return proc, smtp, metrics, lines

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except Exception:
                proc.kill()
                proc.wait()
    for proc, reader in zip(procs, readers):
        reader.join(10)
        proc.stdout.close()


@pytest.mark.parametrize("how", ["SIGUSR1", "POST /drain"])
def test_drain_then_stop(twistd: Any, how: str) -> None:
    """Drain: idle sessions get 421, no new ones, /readyz 503; SIGTERM then stops."""
    proc, smtp, metrics, _ = twistd("--shutdown-grace", "10")
    assert (200, "ready\n") == http_get(metrics, "/readyz")
    idle = smtplib.SMTP("127.0.0.1", smtp, timeout=10)
    assert 250 == idle.ehlo()[0]
    if how == "SIGUSR1":
        proc.send_signal(signal.SIGUSR1)
    else:
        assert (202, "draining\n") == http_get(metrics, "/drain", "POST")
    wait_until(lambda: http_get(metrics, "/readyz")[0] == 503)
    assert (503, "not ready\n") == http_get(metrics, "/readyz")
    assert (200, "ok\n") == http_get(metrics, "/healthz")
    assert 421 == idle.noop()[0]
    idle.close()
    assert refuses(smtp)
    status, text = http_get(metrics, "/metrics")
    assert 200 == status
    samples = parse_exposition(text)
    assert 1 == value(samples, "smtpd_draining")
    assert 1 == value(samples, "smtpd_sessions_total", how="shutdown")
    assert proc.poll() is None  # a drain does not stop the process
    proc.send_signal(signal.SIGTERM)
    assert -signal.SIGTERM == proc.wait(timeout=30)  # twistd exits by its signal


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_drain_reaches_the_workers(twistd: Any) -> None:
    """With --workers, SIGUSR1 to twistd drains every process: nobody accepts."""
    proc, smtp, metrics, lines = twistd("--workers", "3")
    # A worker takes SIGUSR1 once it serves (before, the signal would kill it).
    wait_until(lambda: sum("serving" in line for line in list(lines)) == 2)
    pids = [
        int(p)
        for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    ]
    assert 2 == len(pids)
    proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: refuses(smtp))
    # Workers drain but stay up until SIGTERM, like the parent.
    assert not [line for line in list(lines) if "ended:" in line]
    for pid in pids:
        os.kill(pid, 0)
    assert (503, "not ready\n") == http_get(metrics, "/readyz")
    proc.send_signal(signal.SIGTERM)
    assert -signal.SIGTERM == proc.wait(timeout=30)  # twistd exits by its signal
    # Each worker drained and then stopped on its own (not killed by SIGUSR1).
    wait_until(lambda: sum("ended:" in line for line in list(lines)) == 2)
    ended = [line for line in lines if "ended:" in line]
    assert all("exit code 0" in line for line in ended), ended


# -- --workers: one view over every process --------------------------------------

MULTIPROCESS_CHILD = """
import os
import sys
from twisted_smtpd.metrics import PrometheusEvents
events = PrometheusEvents()
for _ in range(int(sys.argv[1])):
    events.session_started()
    events.message_received("accepted", 100)
events.reply_sent(250)
print("counted", os.getpid(), flush=True)
if sys.argv[2] == "stay":
    sys.stdin.read()  # until the test closes stdin
"""

MULTIPROCESS_SCRAPE = """
from prometheus_client import generate_latest
from twisted_smtpd.metrics import PrometheusEvents
print(generate_latest(PrometheusEvents().exposition_registry()).decode())
"""


def test_multiprocess_view(tmp_path: Path) -> None:
    """Counts of every process add up; a dead one's open sessions drop out."""
    import subprocess

    from .helpers import twistd_env

    env = {**twistd_env(), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def python(*args: str, **kwargs: Any) -> Any:
        return subprocess.Popen(
            [sys.executable, "-c", *args],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            **kwargs,
        )

    alive = python(MULTIPROCESS_CHILD, "2", "stay")
    try:
        assert alive.stdout.readline().startswith("counted")
        gone = python(MULTIPROCESS_CHILD, "3", "exit")
        gone.communicate(timeout=30)
        scraper = python(MULTIPROCESS_SCRAPE)
        text, _ = scraper.communicate(timeout=30)
    finally:
        alive.communicate(timeout=30)
    samples = parse_exposition(text)
    # The exited process had 3 sessions open: they are not open any more.
    assert 2 == value(samples, "smtpd_sessions_open")
    # Its counts stay in the totals: counters never go down.
    assert 5 == value(samples, "smtpd_messages_total", outcome="accepted")
    assert 500 == value(samples, "smtpd_received_bytes_total")
    assert 2 == value(samples, "smtpd_replies_total", **{"class": "2xx"})


# -- a known load through a real twistd, then one scrape ---------------------------


class KnownLoadHandler:
    """For the known load: refuses nobody@ recipients and 'refuse-me' messages."""

    def check_recipient(self, envelope: Any, address: str, options: Any) -> None:
        from twisted_smtpd import SMTPError

        if address.startswith("nobody@"):
            raise SMTPError(550, "5.1.1", "No such user here")

    def handle_message(self, envelope: Any) -> None:
        from twisted_smtpd import SMTPError

        if b"refuse-me" in envelope.content:
            raise SMTPError(554, "5.7.1", "Refused")


def message(number: int, padding: int = 0) -> bytes:
    return f"Subject: m{number}\r\n\r\nbody {number}{'x' * padding}\r\n".encode()


def known_load(port: int) -> dict[str, Any]:
    """Six sessions whose every reply is known; what the server must count."""
    sizes: list[int] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:  # 3 accepted
        for number in range(3):
            smtp.sendmail("a@client.test", ["ok@mx.test"], message(number))
            sizes.append(len(message(number)))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:  # refused at DATA
        with pytest.raises(smtplib.SMTPDataError):
            smtp.sendmail("a@client.test", ["ok@mx.test"], b"refuse-me\r\n")
        sizes.append(len(b"refuse-me\r\n"))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:  # 1 of 2 RCPT refused
        refused = smtp.sendmail(
            "a@client.test", ["ok@mx.test", "nobody@mx.test"], message(3)
        )
        assert ["nobody@mx.test"] == list(refused)
        sizes.append(len(message(3)))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:  # too big, no SIZE=
        smtp.ehlo()
        assert 250 == smtp.mail("a@client.test")[0]
        assert 250 == smtp.rcpt("ok@mx.test")[0]
        assert 552 == smtp.data(message(4, padding=3000))[0]
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:  # AUTH: 1 bad, 1 good
        smtp.ehlo()
        smtp.user, smtp.password = "alice", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.auth("PLAIN", smtp.auth_plain)
        smtp.password = "secret"
        assert 235 == smtp.auth("PLAIN", smtp.auth_plain)[0]
    lost = smtplib.SMTP("127.0.0.1", port, timeout=30)  # gone without QUIT
    lost.ehlo()
    lost.sock.close()
    return {"accepted_and_refused_sizes": sizes}


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def settled_scrape(port: int, lost_at_least: float = 0) -> Samples:
    """A scrape once no session is open (every ending counted)."""
    found: list[Samples] = []

    def settled() -> bool:
        found[:] = [parse_exposition(http_get(port, "/metrics")[1])]
        samples = found[0]
        return (
            value(samples, "smtpd_sessions_open") == 0
            and value(samples, "smtpd_sessions_total", how="lost") >= lost_at_least
        )

    wait_until(settled)
    return found[0]


def test_known_load_counted_exactly(twistd: Any) -> None:
    """Every session, reply, message, byte, hook and AUTH of a known load counts."""
    proc, smtp, metrics, _ = twistd(
        "--handler",
        "tests.test_metrics.KnownLoadHandler",
        "--max-message-size",
        "2000",
        "--auth",
        "memory:alice:secret",
        "--auth-without-tls",
    )
    # wait_for_port's probe was a session too (greeting, then gone).
    before = settled_scrape(metrics, lost_at_least=1)
    sizes = known_load(smtp)["accepted_and_refused_sizes"]
    after = settled_scrape(
        metrics, value(before, "smtpd_sessions_total", how="lost") + 1
    )
    sessions = "smtpd_sessions_total"
    assert 5 == delta(after, before, sessions, how="quit")
    assert 1 == delta(after, before, sessions, how="lost")
    assert 0 == delta(after, before, sessions, how="timeout")
    assert 6 == delta(after, before, "smtpd_session_duration_seconds_count")
    messages = "smtpd_messages_total"
    assert 4 == delta(after, before, messages, outcome="accepted")
    assert 1 == delta(after, before, messages, outcome="refused")
    assert 1 == delta(after, before, messages, outcome="too_big")
    assert 0 == delta(after, before, messages, outcome="failed")
    too_big = len(message(4, padding=3000))  # read to the end, then 552
    assert sum(sizes) + too_big == delta(after, before, "smtpd_received_bytes_total")
    replies = {
        klass: delta(after, before, "smtpd_replies_total", **{"class": klass})
        for klass in ("2xx", "3xx", "4xx", "5xx")
    }
    assert {"2xx": 35, "3xx": 6, "4xx": 0, "5xx": 4} == replies
    auth = "smtpd_auth_attempts_total"
    assert 1 == delta(after, before, auth, result="success")
    assert 1 == delta(after, before, auth, result="failure")
    hooks = "smtpd_hook_duration_seconds_count"
    assert 7 == delta(after, before, hooks, hook="check_recipient")
    assert 5 == delta(after, before, hooks, hook="message")
    refusals = "smtpd_hook_refusals_total"
    assert 1 == delta(after, before, refusals, hook="check_recipient")
    assert 1 == delta(after, before, refusals, hook="message")
    assert 0 == delta(
        after, before, "smtpd_connections_refused_total", reason="max_connections"
    )
    assert 0 == delta(after, before, "smtpd_tls_handshakes_total", result="ok")


def test_workers_one_view(twistd: Any) -> None:
    """--workers 2: sessions served by both processes add up in one scrape."""
    from collections import Counter

    from .test_workers import _burst_of_messages

    proc, smtp, metrics, lines = twistd("--workers", "2")
    wait_until(lambda: any("serving" in line for line in list(lines)))
    time.sleep(0.5)  # the worker's reactor is running
    before = settled_scrape(metrics, lost_at_least=1)
    holders: Counter[str] = Counter()
    for _burst in range(5):
        _burst_of_messages(smtp, 30, holders)
        if len(holders) == 2:
            break
    assert 2 == len(holders), holders  # both processes took sessions
    sent = sum(holders.values())
    after = settled_scrape(metrics)
    assert sent == delta(after, before, "smtpd_messages_total", outcome="accepted")
    ended = sum(
        delta(after, before, "smtpd_sessions_total", how=how)
        for how in ("quit", "lost")
    )
    assert sent == ended
    hooks = "smtpd_hook_duration_seconds_count"
    assert sent == delta(after, before, hooks, hook="message")
