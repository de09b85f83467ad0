"""The ``keel`` command: config checking, and ``keel serve`` with several worker processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from keel.testing.fake_upstream import FakeUpstreamThread

KEEL = str(Path(sys.executable).parent / "keel")


def test_check_reports_errors_with_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: a\n    model: m\n    retries: 3\n")
    out = subprocess.run([KEEL, "check", "--config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "models[0].retries: unknown key" in out.stderr


def test_check_sample_config() -> None:
    out = subprocess.run([KEEL, "check"], capture_output=True, text=True, env={**os.environ, "KEEL_CONFIG": ""})
    assert out.returncode == 0, out.stderr
    assert "assistant" in out.stdout


@pytest.fixture
def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_with_two_workers(tmp_path: Path, fake: FakeUpstreamThread, port: int) -> None:
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"models:\n  - {{name: smart, model: up, api_base: '{fake.base_url}/v1'}}\n")
    proc = subprocess.Popen(
        [KEEL, "serve", "--config", str(cfg), "--port", str(port), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=5)
        deadline = time.monotonic() + 30
        while True:
            try:
                c.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        answers = {
            c.chat.completions.create(model="smart", messages=[{"role": "user", "content": f"q{i}"}])
            .choices[0]
            .message.content
            for i in range(20)
        }
        assert answers == {f"Echo: q{i}" for i in range(20)}
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}" in out and "2 workers" in out
