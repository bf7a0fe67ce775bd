#!/usr/bin/env bash
# Remake docs/tensorboard.png, docs/tensorboard-alerts.png and docs/report.png: run the demo, serve its
# logs with a real tensorboard on loopback, and screenshot the Custom Scalars and Text tabs and the HTML
# report with headless Chromium (Debian: apt-get install chromium). Look at all three before committing.
set -eu
LOGS=$(mktemp -d)
.venv/bin/torchwatch demo --logdir "$LOGS" > /dev/null
RUN=$(echo "$LOGS"/run-*)
.venv/bin/torchwatch report "$RUN" --html "$LOGS/report.html" > /dev/null || true  # exit 1: the logs hold alerts
.venv/bin/tensorboard --logdir "$RUN/tensorboard" --samples_per_plugin text=1000 --port 6123 --host 127.0.0.1 > /dev/null 2>&1 &
TB=$!
trap 'kill $TB' EXIT
sleep 8
shot() {
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,"$2" \
    --virtual-time-budget=20000 --screenshot="$1" "http://127.0.0.1:6123/?darkMode=false#$3" 2> /dev/null
}
shot docs/tensorboard.png 2400 custom_scalars
shot docs/tensorboard-alerts.png 1400 text
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1500 \
  --screenshot=docs/report.png "file://$LOGS/report.html" 2> /dev/null

# docs/tensorboard-histograms.png: the magnitude-histogram monitor on a small MLP whose inputs grow
# x40 from call 100 (the shift of log2|x| by ~5.3 shows in every module's histogram)
HLOGS=$(mktemp -d)
.venv/bin/python - "$HLOGS" <<'PY'
import sys, torch, torchwatch as tw
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
with tw.attach(model, monitors=[tw.monitors.Histograms()], sinks=[tw.TensorBoardSink(sys.argv[1])],
               flush_every=10, rules=[]), torch.inference_mode():
    for i in range(200):
        model(torch.randn(32, 64) * (1.0 if i < 100 else 40.0))
PY
.venv/bin/tensorboard --logdir "$HLOGS" --port 6124 --host 127.0.0.1 > /dev/null 2>&1 &
TB2=$!
trap 'kill $TB $TB2' EXIT
sleep 8
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1400 \
  --virtual-time-budget=20000 --screenshot=docs/tensorboard-histograms.png \
  "http://127.0.0.1:6124/?darkMode=false#histograms" 2> /dev/null
