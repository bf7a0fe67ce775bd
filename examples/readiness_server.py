"""Gate readiness on the startup self-test: /ready answers 503 until the model proved it is the
validated one, and keeps answering 503 (with the reason) if it is not.

    python examples/readiness_server.py            # serves on 127.0.0.1:8080
    curl -i 127.0.0.1:8080/ready                   # 503 while the self-test runs, then 200
    curl -s 127.0.0.1:8080/predict -d '[[0.1, ...12 numbers]]'

A load balancer or Kubernetes readinessProbe that polls /ready never routes traffic to a replica
that loaded the wrong weights or computes differently. /live stays 200 so the process is not
restarted in a loop while a person looks at the reason.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from torch import nn

import torchwatch as tw


class ReadinessServer:
    """A tiny HTTP front for one model: /live, /ready (gated by tw.selftest) and /predict."""

    def __init__(self, model: nn.Module, *, manifest: str, canary: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.model, self.manifest, self.canary = model, manifest, canary
        self.ready = False
        self.reason = "self-test not run yet"
        self.report: tw.SelfTestReport | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep the example's output readable
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/live":
                    self._send(200, {"live": True})
                elif self.path == "/ready":
                    self._send(200 if server.ready else 503, {"ready": server.ready, "reason": server.reason})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                if self.path != "/predict":
                    self._send(404, {"error": "not found"})
                elif not server.ready:
                    self._send(503, {"error": f"not ready: {server.reason}"})
                else:
                    rows = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    with torch.inference_mode():
                        logits = server.model(torch.tensor(rows, dtype=torch.float32))
                    self._send(200, {"labels": logits.argmax(-1).tolist()})

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run_selftest(self) -> None:
        """Run the self-test (call it in the background at startup); /ready turns 200 only if it passes."""
        try:
            self.report = tw.selftest(self.model, manifest=self.manifest, canary=self.canary)
        except (tw.IntegrityError, tw.CanaryError) as exc:
            self.reason = str(exc).splitlines()[0] + " — " + "; ".join(str(exc).splitlines()[1:3]).strip()
            return
        except tw.TorchwatchError as exc:  # unreadable or mismatched files
            self.reason = f"self-test could not run: {exc}"
            return
        self.reason = f"self-test passed in {self.report.seconds:.2f} s"
        self.ready = True

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def model_factory() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 10)).eval()


def main() -> None:
    workdir = tempfile.mkdtemp(prefix="torchwatch-ready-")
    manifest, canary = os.path.join(workdir, "model.manifest.json"), os.path.join(workdir, "model.canary.safetensors")
    validated = model_factory()  # at release time: record what the validated model is and does
    tw.Manifest.from_model(validated).save(manifest)
    tw.Canary.record(validated, torch.randn(32, 12), manifest=tw.Manifest.load(manifest)).save(canary)

    server = ReadinessServer(model_factory(), manifest=manifest, canary=canary, port=8080)
    server.start()
    print(f"serving on http://127.0.0.1:{server.port} (/live, /ready, /predict)")
    server.run_selftest()
    print(f"ready={server.ready}: {server.reason}")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
