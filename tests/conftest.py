from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from a second intra-op thread, and the integration tests run a
# worker process beside this one: on 2 cores, two threads each made tests ~10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def models_from_the_test_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Jobs may load local models only from allowed roots (GENERALRM_MODEL_ROOTS): the tests'
    tiny models live in pytest's temporary tree, so that is one (workers inherit it)."""
    previous = os.environ.get("GENERALRM_MODEL_ROOTS")
    os.environ["GENERALRM_MODEL_ROOTS"] = str(tmp_path_factory.getbasetemp())
    yield
    if previous is None:
        os.environ.pop("GENERALRM_MODEL_ROOTS", None)
    else:
        os.environ["GENERALRM_MODEL_ROOTS"] = previous


@pytest.fixture(scope="session")
def tiny_encoder_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_encoder_rm(tmp_path_factory.mktemp("tiny-encoder-rm"))


@pytest.fixture(scope="session")
def tiny_sentence_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare encoder whose sentence-transformers Pooling says mean (as all-MiniLM-L6-v2)."""
    return tiny.build_sentence_encoder(tmp_path_factory.mktemp("tiny-sentence-encoder"))


@pytest.fixture(scope="session")
def tiny_mean_pooled_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mean-pooled RM saved by generalrm (modules.json, 1_Pooling, 2_Dense)."""
    return tiny.build_mean_pooled_rm(tmp_path_factory.mktemp("tiny-mean-rm") / "model")


@pytest.fixture(scope="session")
def tiny_decoder_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_decoder_rm(tmp_path_factory.mktemp("tiny-decoder-rm"))


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_policy(tmp_path_factory.mktemp("tiny-policy"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_redis(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not answer PING within {timeout}s")


class RedisServer:
    """A redis-server process of the test's own, restartable on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (make install installs it)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_redis(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Own redis-server on a free port, or the one named by GENERALRM_TEST_REDIS_URL."""
    given = os.environ.get("GENERALRM_TEST_REDIS_URL")
    if given:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        server.url = given
        yield server
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
