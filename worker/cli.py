"""``python -m worker`` / ``generalrm worker``: start a Celery worker on the job queues."""

from __future__ import annotations

import argparse
import os
import socket

from worker.celery_app import QUEUES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Run a generalrm worker. One worker process per GPU: start one worker per "
        "GPU (CUDA_VISIBLE_DEVICES=i) rather than raising --concurrency.",
    )
    parser.add_argument("--queues", "-Q", default=",".join(QUEUES),
                        help="comma-separated queues to consume (default: %(default)s)")
    parser.add_argument("--concurrency", "-c", type=int, default=1,
                        help="job processes at once (default: %(default)s)")
    parser.add_argument("--loglevel", "-l", default=os.environ.get("GENERALRM_LOG_LEVEL", "info"))
    parser.add_argument("--hostname", "-n",
                        default=os.environ.get("GENERALRM_WORKER_NAME")
                        or f"generalrm@{socket.gethostname()}-{os.getpid()}",
                        help="unique worker (Celery node) name; a health check pings it "
                        "(default: $GENERALRM_WORKER_NAME, else %(default)s)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.queues.split(",")) - set(QUEUES))
    if unknown:
        parser.error(f"unknown queue(s) {unknown}; queues are {list(QUEUES)}")
    if args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from worker.celery_app import app

    app.worker_main([
        "worker", "--queues", args.queues, "--concurrency", str(args.concurrency),
        "--pool", "prefork", "--loglevel", args.loglevel, "--hostname", args.hostname,
        "--without-gossip", "--without-mingle",
    ])
