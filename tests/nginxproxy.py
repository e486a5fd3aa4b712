"""A private nginx mail proxy (``xclient on;``) in front of a backend, for tests.

nginx's mail proxy asks an C{auth_http} server where to send each client; the
test serves that from a thread (http.server) and records what nginx asked.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .helpers import free_port, stop_process

MAIL_MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")

CONFIG = """\
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
load_module {module};
events {{ worker_connections 64; }}
mail {{
    server_name proxy.test;
    auth_http 127.0.0.1:{auth_port}/auth;
    proxy_pass_error_message on;
    xclient on;
    server {{
        listen 127.0.0.1:{port};
        protocol smtp;
        smtp_auth none;
    }}
}}
"""


class NginxMailProxy:
    """nginx on 127.0.0.1:C{port} proxying SMTP to 127.0.0.1:C{backend_port}."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.port = free_port()
        self.auth_requests: list[dict[str, str]] = []
        self.prefix = Path(tempfile.mkdtemp(prefix="nginx-mail-"))
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._auth_handler())
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        conf = self.prefix / "nginx.conf"
        conf.write_text(
            CONFIG.format(
                prefix=self.prefix,
                module=MAIL_MODULE,
                auth_port=self._http.server_address[1],
                port=self.port,
            )
        )
        (self.prefix / "logs").mkdir()
        self.process = subprocess.Popen(
            ["nginx", "-p", str(self.prefix), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_listening()

    def _auth_handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class AuthHandler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.auth_requests.append(dict(self.headers.items()))
                self.send_response(200)
                self.send_header("Auth-Status", "OK")
                self.send_header("Auth-Server", "127.0.0.1")
                self.send_header("Auth-Port", str(proxy.backend_port))
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        return AuthHandler

    def _wait_listening(self) -> None:
        import socket

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nginx did not listen: {self.log()}")

    def log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        stop_process(self.process)
        self._http.shutdown()
        self._http.server_close()
        shutil.rmtree(self.prefix, ignore_errors=True)
