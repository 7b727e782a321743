from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.settings import ServiceSettings as Settings
from tests.conftest import free_port


class LiveServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 120, headers: dict | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(f"{self.url}/ready", headers=headers).status_code == 200:
                return
            time.sleep(0.05)
        raise RuntimeError("server never became ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextmanager
def live_server(wait: bool = True, **overrides) -> Iterator[LiveServer]:
    """A real uvicorn server on a free port, serving the real app."""
    overrides.setdefault("artifacts_dir", "artifacts-test-unused")
    server = LiveServer(Settings(**overrides))
    server.start()
    try:
        if wait:
            server.wait_ready(headers={"X-API-Key": overrides.get("api_key") or ""})
        yield server
    finally:
        server.stop()


@pytest.fixture
def serve() -> Callable[..., contextmanager]:
    return live_server
