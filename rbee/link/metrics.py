"""Prometheus metrics of one role (queen or hive), on its own registry: no global state.

Jobs by final state, tokens generated, time to first token and tokens/s histograms,
plus gauges the role fills at scrape time (peers up, heartbeat ages).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from quart import Quart, Response

from rbee.link.jobs import Job

#: (kind, name, state, heartbeat age in seconds) for each peer, read at scrape time.
PeerRows = Callable[[], Iterable[tuple[str, str, str, float | None]]]


class Metrics:
    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("rbee_jobs_total", "Jobs by how they ended", ["role", "state"], registry=self.registry)
        self.tokens = Counter("rbee_tokens_total", "Tokens streamed", ["role"], registry=self.registry)
        self.ttft = Histogram(
            "rbee_time_to_first_token_seconds", "From job creation to its first token", ["role"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry,
        )
        self.rate = Histogram(
            "rbee_tokens_per_second", "Decode speed of finished jobs", ["role"],
            buckets=(1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 400), registry=self.registry,
        )
        self.up = Gauge("rbee_peer_up", "1 if the peer is up", ["kind", "name", "state"], registry=self.registry)
        self.age = Gauge("rbee_heartbeat_age_seconds", "Seconds since the peer's last heartbeat", ["kind", "name"],
                         registry=self.registry)
        self.client_requests = Counter("rbee_client_requests_total", "Requests made with each client key", ["key"],
                                       registry=self.registry)
        self.client_tokens = Counter("rbee_client_tokens_total", "Tokens generated for each client key", ["key"],
                                     registry=self.registry)
        self.role = role

    def job_finished(self, job: Job) -> None:
        last = job.history[-1] if job.history else None
        state = "cancelled" if job.cancelled else ("ok" if last is not None and last.type == "end" else "error")
        self.jobs.labels(self.role, state).inc()
        if job.tokens:
            self.tokens.labels(self.role).inc(job.tokens)
        if job.first_token_at is not None:
            self.ttft.labels(self.role).observe(job.first_token_at - job.created)
        if last is not None and last.type == "end" and last["tokens"]:
            self.rate.labels(self.role).observe(float(last["tokens_per_s"]))

    def mount(self, app: Quart, peers: PeerRows) -> None:
        @app.get("/metrics")
        async def metrics() -> Response:
            self.up.clear()
            self.age.clear()
            for kind, name, state, age in peers():
                self.up.labels(kind, name, state).set(1.0 if state in ("up", "ready", "busy") else 0.0)
                if age is not None:
                    self.age.labels(kind, name).set(age)
            return Response(generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST)
