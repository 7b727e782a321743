"""``generalrm up``: Redis, a worker and the API from one command; SIGINT stops all three."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.worker.harness import wait_for

pytestmark = pytest.mark.integration


def _children(pid: int) -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.add(int(proc.name))
    return found


def test_up_serves_runs_jobs_and_stops_everything_on_ctrl_c(tmp_path: Path, tiny_encoder_rm: Path) -> None:
    api_port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENERALRM_")}
    env.update(
        GENERALRM_MODEL=str(tiny_encoder_rm), GENERALRM_PORT=str(api_port),
        GENERALRM_ARTIFACTS_DIR=str(tmp_path / "artifacts"), GENERALRM_ENABLE_DIAGNOSTIC_JOBS="1",
        HF_HUB_OFFLINE="1",
    )
    stack = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--redis-port", str(redis_port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{api_port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{url}/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 120, "the stack's API never became ready")
        children = _children(stack.pid)
        assert len(children) == 3  # redis-server, worker, api
        score = httpx.post(f"{url}/score", json={"items": [{"prompt": "hi", "response": "good"}]})
        assert score.status_code == 200
        # the bundled examples were installed where job specs expect them
        assert (tmp_path / "artifacts" / "data" / "examples" / "prefs.train.jsonl").is_file()
        job = httpx.post(f"{url}/jobs", json={"kind": "sleep_steps", "spec": {"steps": 2, "step_seconds": 0.05}})
        assert job.status_code == 202, job.text
        status_url = job.json()["status_url"]
        wait_for(lambda: httpx.get(status_url).json()["status"] == "succeeded", 120, "job did not run")
    finally:
        stack.send_signal(signal.SIGINT)
        try:
            stack.wait(timeout=180)
        except subprocess.TimeoutExpired:
            stack.kill()
            raise
    output = stack.stdout.read()
    assert stack.returncode == 0, output
    for name in ("api", "worker", "redis"):
        assert f"stopped {name}" in output
    time.sleep(0.2)
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.parametrize("how", ["setting", "option"])
def test_the_stacks_redis_port_is_a_setting_and_an_option(tmp_path: Path, how: str) -> None:
    import socket

    with socket.socket() as taken:  # a port in use: `up` must refuse it before starting anything
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENERALRM_")}
        env["GENERALRM_ARTIFACTS_DIR"] = str(tmp_path / "artifacts")
        args = [sys.executable, "-m", "service.cli", "up"]
        if how == "setting":
            env["GENERALRM_STACK_REDIS_PORT"] = str(port)
        else:
            env["GENERALRM_STACK_REDIS_PORT"] = "1"  # the option wins over the setting
            args += ["--redis-port", str(port)]
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"port {port} is taken" in result.stdout + result.stderr
