"""``generalrm jobs ...`` and ``generalrm models ...`` against a live API and a real worker,
and against nothing at all (one line naming the URL, exit code 1, no traceback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from service.cli import app
from service.jobs_cli import _spec
from service.stack import install_examples
from tests.conftest import free_port
from tests.integration.stack import serving_production_rm
from tests.worker.harness import JobHarness, write_tiny_preferences

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

REMOTE_COMMANDS = [
    ["jobs", "list"], ["jobs", "submit", "train_rm", "--set", "train_file=x.jsonl"],
    ["jobs", "watch", "abc"], ["jobs", "cancel", "abc"],
    ["models", "list"], ["models", "promote", "rm", "v2"], ["models", "rollback", "rm"],
]


@pytest.mark.parametrize("command", REMOTE_COMMANDS, ids=" ".join)
def test_without_a_server_every_command_says_which_url_did_not_answer(command):
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, [*command, "--url", url])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no generalrm API answered at {url}")
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


@pytest.fixture
def stack(tmp_path: Path, redis_server, tiny_encoder_rm: Path) -> Iterator[tuple[JobHarness, str]]:
    harness = JobHarness(tmp_path, redis_server.url)
    write_tiny_preferences(harness.data_dir / "train.jsonl", 32, seed=0)
    write_tiny_preferences(harness.data_dir / "eval.jsonl", 8, seed=1)
    with serving_production_rm(harness, tiny_encoder_rm, model_poll_seconds=0.2) as url:
        yield harness, url
    harness.close()


def test_the_shipped_job_specs_pass_the_servers_checks(stack, tmp_path):
    harness, _ = stack
    install_examples(harness.data_dir)  # as `generalrm up` and compose do
    for name in ("train_rm.yaml", "evaluate.yaml"):
        kind, spec = _spec(None, REPO / "examples" / "jobs" / name, [])
        assert harness.client.validate(kind, spec)["model"], name


def test_submit_watch_list_cancel_and_models(stack, tmp_path):
    harness, url = stack
    harness.start_worker()
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump({"kind": "train_rm", "spec": {
        "train_file": "train.jsonl", "eval_file": "eval.jsonl", "model": "rm@v1", "name": "rm",
        "params": {"max_steps": 40, "batch_size": 4, "max_length": 32, "learning_rate": 1e-3,
                   "device": "cpu"}}}))
    env = {"GENERALRM_URL": url, "COLUMNS": "80"}
    submitted = runner.invoke(app, ["jobs", "submit", "--spec", str(spec_file),
                                    "--set", "params.warmup_ratio=0.0", "--watch",
                                    "--interval", "0.2"], env=env)
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.splitlines()[0].strip()
    assert len(job_id) == 32
    assert '"succeeded"' in submitted.output
    assert "loss" in submitted.output and "eta" in submitted.output  # the progress line
    record = harness.client.get(job_id)
    assert record["status"] == "succeeded" and record["spec"]["params"]["warmup_ratio"] == 0.0

    listed = runner.invoke(app, ["jobs", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert all(len(line) <= 80 for line in listed.output.splitlines()), listed.output
    assert job_id[:12] in listed.output and "succeeded" in listed.output and "rm@v2" in listed.output

    watched = runner.invoke(app, ["jobs", "watch", job_id[:8]], env=env)
    assert watched.exit_code == 0 and '"succeeded"' in watched.output
    cancelled = runner.invoke(app, ["jobs", "cancel", job_id[:8]], env=env)
    assert cancelled.exit_code == 0 and f"{job_id}: succeeded" in cancelled.output
    unknown = runner.invoke(app, ["jobs", "watch", "zzzz"], env=env)
    assert unknown.exit_code == 1 and "0 recent jobs start with 'zzzz'" in unknown.output

    models = runner.invoke(app, ["models", "list"], env=env)
    assert models.exit_code == 0, models.output
    assert "latest=v2" in models.output and "production=v1" in models.output
    assert "served: rm@v1" in models.output
    promoted = runner.invoke(app, ["models", "promote", "rm", "v2"], env=env)
    assert promoted.exit_code == 0, promoted.output
    assert "rm:production -> v2 (served: rm@v2, swapped)" in promoted.output
    rolled = runner.invoke(app, ["models", "rollback", "rm"], env=env)
    assert rolled.exit_code == 0 and "rm:production -> v1 (served: rm@v1" in rolled.output
    again = runner.invoke(app, ["models", "rollback", "rm"], env=env)
    assert again.exit_code == 1 and "oldest version" in again.output
    to = runner.invoke(app, ["models", "rollback", "rm", "--alias", "latest", "--to", "v1"], env=env)
    assert to.exit_code == 0 and "rm:latest -> v1" in to.output
    bad = runner.invoke(app, ["jobs", "submit", "train_rm", "--set", "train_file=missing.jsonl"], env=env)
    assert bad.exit_code == 1 and "422 invalid_spec" in bad.output and "missing.jsonl" in bad.output
