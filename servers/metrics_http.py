"""Serve a Prometheus registry over HTTP from a background thread, in the classic text format.

Always the 0.0.4 text format, whatever the scraper's Accept header asks: prometheus_client's
OpenMetrics output rewrites the colon of names such as ``ctxload:client_*`` to an underscore for a
Prometheus 2 scraper (prometheus/client_python#1177). Used by the GPU exporter and the load
generator's client exporter.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

TEXT_FORMAT = CONTENT_TYPE_PLAIN_0_0_4  # what every Prometheus parses


def serve_registry(registry: CollectorRegistry, host: str, port: int, *, name: str = "metrics-http"
                   ) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve ``registry`` at any path of ``host:port``; returns ``(server, thread)``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", TEXT_FORMAT)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # one line per scrape is noise
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return server, thread
