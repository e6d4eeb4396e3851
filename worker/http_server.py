"""The worker's small HTTP side: /metrics (Prometheus), /health (alive) and /ready (can serve).

/health is 200 while the process is alive and, once serving, its loop keeps coming round (a stuck loop is 503,
so an orchestrator restarts it). /ready is 200 only from the moment the model is loaded and warmed and the
worker reads its stream until it starts draining; a worker still loading or draining answers 503."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import metrics
from worker.service import WorkerService


class WorkerHTTPServer:
    def __init__(self, host: str, port: int, stall_s: float):
        self.stall_s = stall_s
        self.service: WorkerService | None = None
        """Set once the model is loaded; until then the worker is alive but not ready."""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(metrics.WORKER), CONTENT_TYPE_LATEST)
                elif path == "/health":
                    ok, status = owner.alive()
                    state = owner.service.state() if owner.service else {}
                    self._json(200 if ok else 503, {"status": status, **state})
                elif path == "/ready":
                    ok, status = owner.ready()
                    self._json(200 if ok else 503, {"status": status})
                else:
                    self._json(404, {"error": {"message": f"no route {path}", "type": "not_found_error"}})

            def _json(self, code: int, body: dict) -> None:
                self._reply(code, json.dumps(body).encode(), "application/json")

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_) -> None:  # scrapes every few seconds would flood the JSON log
                pass

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as error:
            raise SystemExit(
                f"worker HTTP port {host}:{port} is not free ({error}): set LLMFLEET_WORKER_HTTP_PORT"
            ) from None
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    def alive(self) -> tuple[bool, str]:
        service = self.service
        if service is None or not service.serving:
            return True, "ok"
        if service.last_progress and time.time() - service.last_progress > self.stall_s:
            return False, "stalled"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        service = self.service
        if service is None:
            return False, "loading"
        if service.draining:
            return False, "draining"
        if not service.serving:
            return False, "starting"
        return True, "ready"

    def start(self) -> WorkerHTTPServer:
        threading.Thread(target=self.server.serve_forever, name="worker-http", daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
