"""Private RabbitMQ, Redis and NATS servers for the tests, and a TCP relay
that can be cut to play a broker outage without restarting the broker."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .helpers import free_port, require_program

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def _wait_listening(port: int, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{what} did not listen on {port}: {log.read_text()[-2000:]}")


@dataclass
class Server:
    """A broker process the tests started."""

    name: str
    port: int
    proc: subprocess.Popen
    directory: Path
    extra_ports: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)

    @property
    def url_host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        epmd = self.extra_ports.get("epmd")
        if epmd:
            # rabbitmq-server started a private epmd daemon on this port.
            subprocess.run(
                ["epmd", "-port", str(epmd), "-kill"], capture_output=True, timeout=10
            )


def start_rabbitmq(directory: Path, certificates: Optional[dict] = None) -> Server:
    """A private RabbitMQ node on a free loopback port (about 5 s to boot).

    With C{certificates} (tests/certs.py) it also listens for AMQPS on
    C{server.extra_ports["tls"]}.
    """
    require_program("rabbitmq-server")
    port, dist_port, epmd_port = free_port(), free_port(), free_port()
    for sub in ("home", "mnesia", "log"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    config = (
        f"listeners.tcp.default = 127.0.0.1:{port}\n"
        "loopback_users = none\n"
        "disk_free_limit.absolute = 1MB\n"
    )
    extra_ports = {"epmd": epmd_port}
    if certificates is not None:
        extra_ports["tls"] = free_port()
        config += (
            f"listeners.ssl.default = 127.0.0.1:{extra_ports['tls']}\n"
            f"ssl_options.cacertfile = {certificates['ca']}\n"
            f"ssl_options.certfile = {certificates['cert']}\n"
            f"ssl_options.keyfile = {certificates['key']}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )
    (directory / "rabbitmq.conf").write_text(config)
    (directory / "enabled_plugins").write_text("[].\n")
    env = dict(os.environ)
    env.update(
        HOME=str(directory / "home"),
        RABBITMQ_NODENAME=f"smtpd{port}@localhost",
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(dist_port),
        ERL_EPMD_PORT=str(epmd_port),
        RABBITMQ_MNESIA_BASE=str(directory / "mnesia"),
        RABBITMQ_LOG_BASE=str(directory / "log"),
        RABBITMQ_CONFIG_FILE=str(directory / "rabbitmq"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(directory / "enabled_plugins"),
    )
    log = directory / "server.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [RABBITMQ_SERVER], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server("rabbitmq", port, proc, directory, extra_ports, env)
    try:
        _wait_listening(port, proc, "rabbitmq-server", log)
    except BaseException:
        server.stop()
        raise
    return server


def rabbitmqctl(server: Server, *args: str) -> str:
    """Run C{rabbitmqctl ARGS} against the node C{start_rabbitmq} started."""
    done = subprocess.run(
        [
            "/usr/lib/rabbitmq/bin/rabbitmqctl",
            "-n",
            server.env["RABBITMQ_NODENAME"],
            *args,
        ],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 0 == done.returncode, done.stdout + done.stderr
    return done.stdout


def start_redis(directory: Path, certificates: Optional[dict] = None) -> Server:
    """A private redis-server with an fsync-always append-only file.

    With C{certificates} it also listens for TLS on
    C{server.extra_ports["tls"]}.
    """
    require_program("redis-server")
    port = free_port()
    extra_ports = {}
    tls_args: list[str] = []
    if certificates is not None:
        extra_ports["tls"] = free_port()
        tls_args = [
            "--tls-port",
            str(extra_ports["tls"]),
            "--tls-cert-file",
            str(certificates["cert"]),
            "--tls-key-file",
            str(certificates["key"]),
            "--tls-ca-cert-file",
            str(certificates["ca"]),
            "--tls-auth-clients",
            "no",
        ]
    log = directory / "server.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(directory),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                *tls_args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server("redis", port, proc, directory, extra_ports)
    try:
        _wait_listening(port, proc, "redis-server", log)
    except BaseException:
        server.stop()
        raise
    return server


def start_nats(directory: Path) -> Server:
    """A private nats-server with JetStream storing in C{directory}."""
    require_program("nats-server")
    port = free_port()
    log = directory / "server.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                "nats-server",
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                str(port),
                "-sd",
                str(directory / "jetstream"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server("nats", port, proc, directory)
    try:
        _wait_listening(port, proc, "nats-server", log)
    except BaseException:
        server.stop()
        raise
    return server


class TCPRelay:
    """Forwards a free loopback port to C{target_port}, in a thread.

    C{cut()} drops every relayed connection and refuses new ones (the broker
    looks down); C{restore()} lets connections through again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._up = True
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def cut(self) -> None:
        with self._lock:
            self._up = False
            for pair in self._pairs:
                for sock in pair:
                    self._close(sock)
            self._pairs = []

    def restore(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self.cut()
        self._stopped = True
        self._thread.join(5)
        self._listener.close()

    def _close(self, sock: socket.socket) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _run(self) -> None:
        while not self._stopped:
            for key, _ in self._selector.select(0.1):
                with self._lock:
                    if key.data is None:
                        self._accept()
                    else:
                        self._pump(key.fileobj, key.data)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        if not self._up:
            client.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), 5)
        except OSError:
            client.close()
            return
        self._pairs.append((client, upstream))
        self._selector.register(client, selectors.EVENT_READ, upstream)
        self._selector.register(upstream, selectors.EVENT_READ, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            data = source.recv(65536)
            if data:
                sink.sendall(data)
                return
        except OSError:
            pass
        for pair in self._pairs:
            if source in pair:
                self._pairs.remove(pair)
                break
        self._close(source)
        self._close(sink)


def rabbit_queue(port: int, name: str, arguments: Optional[dict] = None) -> None:
    """Declare a durable queue C{name} (blocking pika)."""
    import pika

    with pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", port)
    ) as connection:
        channel = connection.channel()
        channel.queue_declare(name, durable=True, arguments=arguments)


def rabbit_drain(port: int, name: str, expect: int = 0, seconds: float = 20) -> list:
    """Every message in queue C{name} as (properties, body), acknowledged.

    Waits until at least C{expect} messages have come (or C{seconds} pass).
    """
    import pika

    got: list = []
    deadline = time.monotonic() + seconds
    with pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", port)
    ) as connection:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(name, auto_ack=True)
            if method is not None:
                got.append((properties, body))
                continue
            if len(got) >= expect or time.monotonic() > deadline:
                return got
            time.sleep(0.05)
