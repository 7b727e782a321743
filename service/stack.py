"""``generalrm up`` / ``make run``: the whole stack without Docker.

Starts redis-server (unless ``GENERALRM_REDIS_URL`` is set in the environment), one worker
and the API as child processes; Ctrl-C (or SIGTERM) stops all three, the worker first given
time to checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        if not _port_free(port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout}s")


def start_redis(artifacts_dir: Path, port: int) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: run `make install` or set GENERALRM_REDIS_URL")
    data_dir = artifacts_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    # AOF on: queued jobs and job records survive a restart of the stack.
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
         "--dir", str(data_dir.resolve()), "--save", ""],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    _wait_for_port(port, process, "redis-server")
    return process


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, start_new_session=True)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def install_examples(data_dir: Path) -> None:
    """Copy the bundled example data to ``{data_dir}/examples`` once, so that job specs name
    ``examples/prefs.train.jsonl`` here exactly as under docker compose (where it is mounted)."""
    target = data_dir / "examples"
    if EXAMPLES.is_dir() and not target.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(EXAMPLES, target)


def run_stack(redis_port: int) -> int:
    from service.settings import ServiceSettings

    settings = ServiceSettings()
    install_examples(settings.resolved_data_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    children: list[tuple[str, subprocess.Popen]] = []
    try:
        if "GENERALRM_REDIS_URL" not in os.environ:
            if not _port_free(redis_port):
                raise RuntimeError(
                    f"port {redis_port} is taken; set GENERALRM_REDIS_URL to use that Redis"
                )
            children.append(("redis", start_redis(settings.artifacts_dir, redis_port)))
            env["GENERALRM_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        console.print(f"[bold]redis[/]  {env.get('GENERALRM_REDIS_URL', settings.redis_url)}")
        # Own sessions: Ctrl-C reaches only this process, which then stops the children in
        # order (a SIGINT to the worker's job process would kill it before it checkpoints).
        children.append(("worker", _spawn([sys.executable, "-m", "worker"], env)))
        children.append(("api", _spawn([sys.executable, "-m", "service"], env)))
        console.print(f"[bold]api[/]    http://{settings.host}:{settings.port}  (Ctrl-C stops all)")
        stop = {"requested": False}

        def request_stop(_signum, _frame) -> None:
            stop["requested"] = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        while not stop["requested"]:
            for name, process in children:
                if process.poll() is not None:
                    console.print(f"[red]{name} exited with code {process.returncode}; stopping[/]")
                    stop["requested"] = True
            time.sleep(0.3)
        return 0
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    finally:
        _stop_children(children)


def _stop_children(children: list[tuple[str, subprocess.Popen]]) -> None:
    # API first (stop taking work), then the worker (warm shutdown: its job checkpoints),
    # Redis last so that the others can still write their final state.
    order = {"api": 0, "worker": 1, "redis": 2}
    for name, process in sorted(children, key=lambda c: order.get(c[0], 9)):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120 if name == "worker" else 30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        console.print(f"stopped {name}")
