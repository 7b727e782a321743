"""Celery workers and the Redis job store (DESIGN §5).

- ``worker.main(argv)`` — start a worker (``python -m worker``, ``generalrm worker``).
- ``worker.client.JobClient`` — what the API calls: submit, get, list, cancel, reap_stale.
- ``worker.kinds`` — the table of job kinds (queue, spec validator, runner).

Importing this package is cheap and torch-free.
"""


def main(argv: list[str] | None = None) -> None:
    from worker.cli import main as run

    run(argv)
