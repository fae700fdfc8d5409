"""The gateway's Prometheus metrics at `/metrics`: requests by route and status, their latency, SSE clients.

Routes are labelled by their template (`/v1/jobs/{job_id}`), never the path itself, so job
ids do not multiply the series; requests no route matched count under `unmatched`.
Latency is to the response's start (an event stream's open time, not its length).
"""
from __future__ import annotations

import time
from typing import Callable

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))


class MeasureRequests:
    """ASGI middleware (not BaseHTTPMiddleware, which would sit between an event stream and its client's
    disconnect): counts and times each response when it starts, labelled by the route the router matched."""

    def __init__(self, app, requests: Counter, latency: Histogram):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()

        async def measured_send(message):
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")  # set in this scope by the router
                self.requests.labels(scope["method"], route, str(message["status"])).inc()
                self.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, measured_send)


def install_metrics(app: FastAPI, sse_clients: Callable[[], int]) -> None:
    registry = CollectorRegistry()
    requests = Counter("maskfleet_gateway_requests", "HTTP requests answered", ["method", "route", "status"],
                       registry=registry)
    latency = Histogram("maskfleet_gateway_request_seconds", "Time to the response's start", ["method", "route"],
                        buckets=LATENCY_BUCKETS, registry=registry)
    streams = Gauge("maskfleet_gateway_sse_clients", "Event streams open", registry=registry)
    streams.set_function(sse_clients)

    app.add_middleware(MeasureRequests, requests=requests, latency=latency)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
