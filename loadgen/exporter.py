"""The client's own view as Prometheus metrics (``ctxload:`` prefix, labels target and stage).

An explicit registry served on its own port, so Grafana can show what the load generator sees
beside what the servers report.  The address to bind is ``CTXLOAD_EXPORTER_HOST`` (default
127.0.0.1; a container sets 0.0.0.0 so Prometheus in another container reaches it), and the
port the scenario's ``metrics.exporter_port``, which ``CTXLOAD_EXPORTER_PORT`` overrides.
"""

from __future__ import annotations

from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rundir.errors import ERROR_KINDS
from servers.metrics_http import serve_registry
from servers import settings

# From 1 ms to an hour: a million-token prefill is minutes, not the default 10 s top bucket.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80,
                160, 320, 640, 1280, 2560, 3600)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5, 10, 30)


def bind_host() -> str:
    return settings.exporter_host()


def port_override() -> int | None:
    return settings.exporter_port()


class ClientMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, lab = self.registry, ["target", "stage"]
        self.ttft = Histogram("ctxload:client_time_to_first_token_seconds", "TTFT seen by the client",
                              lab, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("ctxload:client_inter_token_latency_seconds", "Gaps between token events",
                             lab, buckets=ITL_BUCKETS, registry=r)
        self.prompt_tokens = Gauge("ctxload:client_prompt_tokens", "Prompt length under test", lab, registry=r)
        self.users = Gauge("ctxload:client_users", "Concurrent streams of the stage", lab, registry=r)
        self.requests = Counter("ctxload:client_requests", "Finished requests", lab + ["status"], registry=r)
        self.errors = Counter("ctxload:client_errors", "Failed requests by kind", lab + ["kind"], registry=r)
        self.port: int | None = None
        self.server: ThreadingHTTPServer | None = None

    def serve(self, port: int = 0, addr: str | None = None) -> int:
        """Serve ``/metrics`` (any path) from a thread, always in the classic text format
        (0.0.4): prometheus_client's OpenMetrics output turns the colon of ``ctxload:`` names
        into an underscore for a Prometheus 2 scraper."""
        self.server, _ = serve_registry(self.registry, addr or bind_host(), port,
                                        name="ctxload-exporter")
        self.port = self.server.server_address[1]
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def stage(self, target: str, stage: str, users: int, prompt_tokens: int | None) -> None:
        """Open a stage's series before its first request ends, at zero, so ``rate()`` and
        ``histogram_quantile()`` see a stage shorter than two scrapes."""
        self.users.labels(target, stage).set(users)
        if prompt_tokens is not None:
            self.prompt_tokens.labels(target, stage).set(prompt_tokens)
        self.ttft.labels(target, stage)
        self.itl.labels(target, stage)
        for status in ("ok", "error"):
            self.requests.labels(target, stage, status)
        for kind in ERROR_KINDS:
            self.errors.labels(target, stage, kind)

    def record(self, rec: dict) -> None:
        t, s = rec["target"], rec["stage"]
        self.requests.labels(t, s, rec["status"]).inc()
        if rec["status"] != "ok":
            self.errors.labels(t, s, rec["error_kind"]).inc()
            return
        self.ttft.labels(t, s).observe(rec["ttft_s"])
        h = self.itl.labels(t, s)
        for g in rec["itl_s"]:
            h.observe(g)
