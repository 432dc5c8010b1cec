"""The usage API's own metrics, on its own registry (the consumer's metrics are not this
process's to show): requests by route and status, and their latency by route.

`route` is the route's template (`/v1/usage`), never the path a client sent: a path is
unbounded (and may carry anything), so a request that matches no route counts as
`(unmatched)`."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REGISTRY = CollectorRegistry(auto_describe=True)
UNMATCHED = "(unmatched)"

REQUESTS = Counter(
    "token_ledger_api_requests_total",
    "Usage API requests answered, by route template and HTTP status",
    ["route", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "token_ledger_api_request_seconds",
    "Usage API request latency (until the answer is sent), by route template",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)


class RequestMetrics:
    """ASGI middleware: one count and one latency observation per HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the application raises before answering

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router records the matched route in the (shared) scope.
            route = scope.get("route")
            template = route.path if isinstance(route, Route) else UNMATCHED
            REQUESTS.labels(template, str(status)).inc()
            LATENCY.labels(template).observe(time.perf_counter() - started)
