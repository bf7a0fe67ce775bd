"""A FastAPI replica whose readiness is gated on the startup self-test.

    MODEL_DIR=release/ MODEL_DIGEST=<64 hex digits> uvicorn fastapi_server:app --app-dir examples --port 8080

``MODEL_DIR`` holds what was written at release time: ``model.safetensors`` (the weights),
``model.manifest.json`` (``tw.Manifest``) and ``model.canary.safetensors`` (``tw.Canary.record``);
``MODEL_DIGEST`` pins the manifest's digest. ``/live`` is 200 while the process runs; ``/ready`` is
200 once the self-test passed and while the watch stays healthy, else 503 with the reason;
``/predict`` answers 503 (never 500) until then, and while the circuit breaker is open.
"""

import contextlib
import os
import threading

import torch
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from safetensors.torch import load_file

import torchwatch as tw

MODEL_DIR = os.environ.get("MODEL_DIR", ".")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FEATURES = 8
state = {"ready": False, "reason": "self-test running"}


def build_model() -> torch.nn.Module:
    """The serving architecture with the release's weights, loaded strictly."""
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    model.load_state_dict(load_file(os.path.join(MODEL_DIR, "model.safetensors")))
    return model.eval().to(DEVICE)


def startup_check() -> None:
    try:
        model = build_model()
        report = tw.selftest(
            model,
            manifest=os.path.join(MODEL_DIR, "model.manifest.json"),
            canary=os.path.join(MODEL_DIR, "model.canary.safetensors"),
            expected_digest=os.environ["MODEL_DIGEST"],  # pinned in the deployment
        )
        watch = tw.attach(model, sinks=[tw.IncidentLog(os.path.join(MODEL_DIR, "incidents.jsonl"))])
        watch.verify_fingerprint_every(600, baseline=report.fingerprint)
    except (tw.IntegrityError, tw.CanaryError) as exc:  # not the validated model: say what differs
        state["reason"] = f"self-test failed: {exc}"
        return
    except Exception as exc:  # noqa: BLE001 - a missing file or setting: not ready either, and say why
        state["reason"] = f"startup failed: {type(exc).__name__}: {exc}"
        return
    state.update(watch=watch, breaker=tw.CircuitBreaker(watch, cooldown=30), ready=True, reason="ok")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    threading.Thread(target=startup_check, daemon=True).start()  # /live answers while it runs
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/live")
def live() -> dict:
    return {"live": True}


@app.get("/ready")
def ready(response: Response) -> dict:
    healthy = state["ready"] and state["watch"].healthy
    response.status_code = 200 if healthy else 503
    reason = state["reason"] if not state["ready"] or healthy else f"unhealthy: {state['watch'].last_trip}"
    return {"ready": healthy, "reason": reason}


@app.post("/predict")
def predict(rows: list[list[float]]):
    if not state["ready"]:
        return JSONResponse({"error": f"not ready: {state['reason']}"}, status_code=503)
    if not rows or any(len(row) != FEATURES for row in rows):
        return JSONResponse({"error": f"send a list of rows of {FEATURES} numbers"}, status_code=422)
    try:
        with torch.inference_mode():
            logits = state["breaker"](torch.tensor(rows, device=DEVICE))
    except tw.CircuitOpenError as exc:  # the model tripped an alert: drained until the cool-down ends
        return JSONResponse({"error": f"unhealthy: {exc}"}, status_code=503)
    return {"labels": logits.argmax(-1).tolist()}
