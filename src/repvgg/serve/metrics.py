"""The server's Prometheus metrics (prometheus-client), in a registry of each app's own so that two apps in one
process (tests, embedding) count apart."""

from __future__ import annotations

from typing import Any

__all__ = ["ServerMetrics"]

#: Latency buckets in seconds, from a small model's few milliseconds to a queue's seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Batch-size buckets: powers of two up to the largest ``--max-batch``.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """Requests by endpoint and status, request latency, batch sizes and seconds, and the images waiting."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("repvgg_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("repvgg_request_seconds", "seconds from a request's arrival to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_images = Histogram("repvgg_batch_images", "images in each forward pass of the model",
                                      buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("repvgg_batch_seconds", "seconds each forward pass of the model took",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Gauge("repvgg_queue_images", "images waiting for the model", registry=self.registry)
        self._series: dict[tuple[str, int], tuple[Any, Any]] = {}  # each endpoint's and status's, looked up once

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        series = self._series.get((endpoint, status))
        if series is None:  # the endpoints are the app's routes (or "unmatched"), the statuses a few: bounded
            series = self._series[(endpoint, status)] = (self.requests.labels(endpoint=endpoint, status=str(status)),
                                                         self.latency.labels(endpoint=endpoint))
        series[0].inc()
        series[1].observe(seconds)

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.batch_seconds.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def track_queue(self, depth: Any) -> None:
        """Report ``depth()`` (the images waiting) whenever the metrics are read."""
        self.queue.set_function(depth)
