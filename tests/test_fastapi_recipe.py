"""The serving guide's FastAPI recipe (examples/fastapi_server.py) under a real ASGI server.

uvicorn runs the example as a user would, over loopback: readiness reports why it is not ready
(a failed self-test, a startup error) and /predict answers 503 then, never 500; a replica that
trips an alert while serving goes unready too.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

import torchwatch as tw

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from safetensors.torch import save_file

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


def _release(directory: pathlib.Path) -> tuple[torch.nn.Module, str]:
    """What a release writes: the weights, their manifest and a canary; returns the model and the digest."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).eval()
    save_file(model.state_dict(), directory / "model.safetensors")
    manifest = tw.Manifest.from_model(model)
    manifest.save(directory / "model.manifest.json")
    tw.Canary.record(model, torch.randn(4, 8), manifest=manifest).save(directory / "model.canary.safetensors")
    return model, manifest.digest


def _request(port: int, path: str, body: object = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()  # json writes NaN as the token NaN
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - http on loopback
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Server:
    def __init__(self, model_dir: pathlib.Path, digest: str | None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "MODEL_DIR": str(model_dir)}
        env.pop("MODEL_DIGEST", None)
        if digest is not None:
            env["MODEL_DIGEST"] = digest
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "fastapi_server:app", "--app-dir", str(EXAMPLES),
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def settled(self) -> tuple[int, dict]:
        """/ready once the self-test has finished (it runs in the background after startup)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"uvicorn exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                code, body = _request(self.port, "/ready")
            except OSError:  # not listening yet
                time.sleep(0.2)
                continue
            if body["reason"] != "self-test running":
                return code, body
            assert code == 503
            time.sleep(0.2)
        pytest.fail("the self-test did not finish within 120 s")

    def close(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return out


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(digest: str | None) -> Server:
        servers.append(Server(tmp_path, digest))
        return servers[-1]

    yield start
    for server in servers:
        log = server.close()
        assert "Traceback" not in log and " 500 " not in log, log


def test_a_validated_model_serves_and_a_tripped_one_is_drained(tmp_path, serve):
    model, digest = _release(tmp_path)
    server = serve(digest)
    assert server.settled() == (200, {"ready": True, "reason": "ok"})
    assert _request(server.port, "/live") == (200, {"live": True})
    rows = torch.randn(5, 8)
    with torch.inference_mode():
        expected = model(rows).argmax(-1).tolist()
    assert _request(server.port, "/predict", rows.tolist()) == (200, {"labels": expected})
    code, body = _request(server.port, "/predict", [[1.0, 2.0]])
    assert code == 422 and "rows of 8 numbers" in body["error"]
    # a NaN reaching the model trips the watch: that answer is withheld and the replica drains
    code, body = _request(server.port, "/predict", [[math.nan] * 8])
    assert code == 503 and body["error"].startswith("unhealthy:")
    code, body = _request(server.port, "/ready")
    assert code == 503 and body["ready"] is False and "nonfinite" in body["reason"]


def test_a_failed_self_test_keeps_it_unready_with_the_reason(tmp_path, serve):
    _, digest = _release(tmp_path)
    weights = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).state_dict()
    save_file(weights, tmp_path / "model.safetensors")  # other weights than the manifest's
    server = serve(digest)
    code, body = server.settled()
    assert code == 503 and body["reason"].startswith("self-test failed:") and "0.weight" in body["reason"]
    code, body = _request(server.port, "/predict", [[0.0] * 8])
    assert code == 503 and "not ready: self-test failed" in body["error"]


def test_a_startup_error_keeps_it_unready_with_the_reason_not_stuck(tmp_path, serve):
    _release(tmp_path)
    server = serve(None)  # MODEL_DIGEST not set in the deployment
    code, body = server.settled()
    assert (code, body["reason"]) == (503, "startup failed: KeyError: 'MODEL_DIGEST'")
    assert _request(server.port, "/predict", [[0.0] * 8])[0] == 503
