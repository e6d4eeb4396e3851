"""A worker's tiny HTTP side: GET routes answering JSON, on a daemon thread, so probes and scrapers never wait
on a model step. Routes are plain callables returning (status, body), so other endpoints plug in the same way."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Route = Callable[[], tuple[int, dict | str]]


class WorkerHTTPServer:
    def __init__(self, host: str, port: int, routes: dict[str, Route]):
        self.routes = routes
        routes_ = routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                route = routes_.get(self.path.split("?", 1)[0])
                status, body = route() if route else (404, {"error": f"no route {self.path}"})
                text = body if isinstance(body, str) else json.dumps(body)
                payload = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]

    def start(self) -> WorkerHTTPServer:
        threading.Thread(target=self._server.serve_forever, name="worker-http", daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
