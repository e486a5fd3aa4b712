"""The scale-out recipe end to end (docs/scaling.rst).

A real HAProxy (send-proxy-v2) in front of two ``twistd -n smtpd`` instances
on ``haproxy:`` endpoints, both delivering into one RabbitMQ.  Several
clients send while one instance is killed with SIGKILL; clients that lose
their connection retry through HAProxy and reach the other instance.
"""

from __future__ import annotations

import email
import re
import signal
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .brokers import rabbit_drain, rabbit_queue, start_rabbitmq
from .helpers import (
    free_port,
    require_program,
    twistd_command,
    twistd_env,
    wait_for_port,
)
from .test_deliver_amqp import QUEUED

CLIENTS = 5
MESSAGES_PER_CLIENT = 40
KILL_AFTER = 60  # 250s seen before instance A is killed


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory):
    server = start_rabbitmq(tmp_path_factory.mktemp("rabbitmq"))
    yield server
    server.stop()


def start_instance(directory: Path, port: int, rabbit_port: int, name: str):
    directory.mkdir()
    log = open(directory / "twistd.log", "w")
    proc = subprocess.Popen(
        twistd_command(
            "smtpd",
            "--port",
            f"haproxy:tcp:{port}:interface=127.0.0.1",
            "--hostname",
            name,
            "--deliver",
            f"amqp://127.0.0.1:{rabbit_port}/?routing_key=scale",
            "--deliver-timeout",
            "10",
        ),
        cwd=directory,
        env=twistd_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return proc


def start_haproxy(directory: Path, port: int, backends: dict[str, int]):
    require_program("haproxy")
    servers = "".join(
        f"    server {name} 127.0.0.1:{backend} send-proxy-v2"
        " check inter 300ms fall 1 rise 2\n"
        for name, backend in backends.items()
    )
    config = directory / "haproxy.cfg"
    config.write_text(
        "global\n"
        "    maxconn 256\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 2s\n"
        "    timeout client 30s\n"
        "    timeout server 30s\n"
        "    retries 3\n"
        "    option redispatch\n"
        "frontend smtp\n"
        f"    bind 127.0.0.1:{port}\n"
        "    default_backend mx\n"
        "backend mx\n"
        "    balance roundrobin\n" + servers
    )
    log = open(directory / "haproxy.log", "w")
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    return proc


def message(client: int, number: int) -> tuple[str, bytes]:
    message_id = f"<c{client}-m{number}@scale.test>"
    return message_id, (
        f"Message-ID: {message_id}\r\nSubject: {client}/{number}\r\n\r\nbody\r\n"
    ).encode()


class Client(threading.Thread):
    """Sends its messages over one session, reconnecting after a drop and
    sending the message again until it gets a 250."""

    def __init__(self, number: int, port: int, progress) -> None:
        super().__init__(daemon=True)
        self.number = number
        self.port = port
        self.progress = progress
        self.accepted: dict[str, str] = {}  # Message-ID -> our id from the 250
        self.drops = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as error:
            self.error = error

    def _run(self) -> None:
        smtp = None
        deadline = time.monotonic() + 60
        for n in range(MESSAGES_PER_CLIENT):
            message_id, body = message(self.number, n)
            while message_id not in self.accepted:
                assert time.monotonic() < deadline, "client gave up"
                try:
                    if smtp is None:
                        smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=15)
                        smtp.ehlo("client.example")
                    smtp.mail("a@b.example")
                    smtp.rcpt("c@d.example")
                    code, text = smtp.data(body)
                except (smtplib.SMTPException, OSError):
                    self.drops += 1
                    smtp = None
                    time.sleep(0.05)
                    continue
                if code == 250:
                    self.accepted[message_id] = QUEUED.search(text).group(1).decode()
                    self.progress()
                else:
                    smtp.rset()
                    time.sleep(0.05)
        if smtp is not None:
            smtp.quit()


def test_two_instances_behind_haproxy_one_killed(rabbit, tmp_path):
    rabbit_queue(rabbit.port, "scale")
    ports = {"mxa": free_port(), "mxb": free_port()}
    front = free_port()
    instances = {
        name: start_instance(tmp_path / name, port, rabbit.port, name)
        for name, port in ports.items()
    }
    haproxy = None
    try:
        for name, port in ports.items():
            wait_for_port(port, instances[name])
        haproxy = start_haproxy(tmp_path, front, ports)
        wait_for_port(front, haproxy)
        time.sleep(0.7)  # both servers pass a first health check ("rise 2")

        accepted = threading.Semaphore(0)
        clients = [Client(i, front, accepted.release) for i in range(CLIENTS)]
        for client in clients:
            client.start()
        for _ in range(KILL_AFTER):
            assert accepted.acquire(timeout=30), "no progress before the kill"
        instances["mxa"].send_signal(signal.SIGKILL)
        for client in clients:
            client.join(90)
        assert [None] * CLIENTS == [c.error for c in clients]
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(10)
        for proc in instances.values():
            if proc.poll() is None:
                proc.terminate()
            proc.wait(20)

    acknowledged = {}  # our id -> Message-ID, for every 250 a client saw
    for client in clients:
        assert MESSAGES_PER_CLIENT == len(client.accepted)
        for message_id, our_id in client.accepted.items():
            acknowledged[our_id] = message_id
    assert CLIENTS * MESSAGES_PER_CLIENT == len(acknowledged)
    # Some clients were on the killed instance and had to come back.
    assert sum(c.drops for c in clients) >= 1

    in_broker = rabbit_drain(rabbit.port, "scale", len(acknowledged), seconds=30)
    ids = [properties.message_id for properties, _ in in_broker]
    assert len(ids) == len(set(ids)), "an id was published twice"
    # Every 250 is in the broker.
    assert set(acknowledged) <= set(ids)
    # Published but never answered 250 (the instance died first): the client
    # sent that message again, so deduplicating on Message-ID counts each
    # message once, and only messages that got a 250.
    by_message_id = {
        email.message_from_bytes(body)["Message-ID"] for _, body in in_broker
    }
    assert set(acknowledged.values()) == by_message_id
    # Both instances delivered, and mxb carried on after mxa died.
    received_by = [re.search(rb"\sby (\S+)", body).group(1) for _, body in in_broker]
    assert {b"mxa", b"mxb"} == set(received_by)
    assert b"mxb" == received_by[-1]
