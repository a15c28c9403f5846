"""An HTTP proxy in front of a real rollout server that holds every generation request back for a
fixed time: it makes a real round last as long as a test needs (a round that outlasts the
collective timeout, a round slower than training) without touching the code under test."""
from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from megatron_rasft.parallel.net import free_port


class DelayingProxy:
    """Forwards every request to `target` (http://host:port); a POST to a path in `delayed`
    waits `delay_s` seconds first. Use as a context manager; `.url` is the proxy's address and
    `.delayed_requests` counts the requests it held back."""

    def __init__(self, target: str, delay_s: float, delayed: tuple = ("/v1/completions",)):
        self.target, self.delay_s, self.delayed = urlsplit(target), delay_s, delayed
        self.delayed_requests = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "DelayingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                if method == "POST" and self.path.split("?")[0] in proxy.delayed:
                    proxy.delayed_requests += 1
                    time.sleep(proxy.delay_s)
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=3600)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    conn.request(method, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError:
                    self.send_error(502)
                    return
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

        return Handler
