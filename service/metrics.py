"""Prometheus metrics of one app instance (own registry, so several apps can live in a test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "generalrm_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "generalrm_request_latency_seconds", "HTTP request latency", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "generalrm_queue_depth", "Scoring requests waiting for the inference thread", registry=r
        )
        self.batch_size = Histogram(
            "generalrm_batch_size", "Items per forward pass", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "generalrm_batch_tokens", "Padded tokens per forward pass", buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.items = Counter("generalrm_items_scored", "Items scored", registry=r)
        self.rejected = Counter(
            "generalrm_requests_rejected", "Requests refused because the queue was full", registry=r
        )
        self.forward_seconds = Histogram(
            "generalrm_forward_seconds", "Forward pass time", buckets=LATENCY_BUCKETS, registry=r
        )
        self.model_info = Gauge(
            "generalrm_model_info", "The served reward model and the precision it computes in "
            "(value 1)", ["model", "precision"], registry=r,
        )
        self.model_fallback = Gauge(
            "generalrm_model_fallback",
            "1 while the served version is a fallback: the referenced one could not load",
            registry=r,
        )
        self.model_swaps = Counter(
            "generalrm_model_swaps", "Served-model swaps", ["outcome"], registry=r
        )
        self.jobs = Gauge("generalrm_jobs", "Jobs by status", ["status"], registry=r)
        self.job_processes = Gauge(
            "generalrm_job_processes",
            "Processes running jobs now (a job launched over N processes counts N)", registry=r)
        self.job_queue_depth = Gauge(
            "generalrm_job_queue_depth", "Job messages waiting per Celery queue", ["queue"], registry=r
        )
