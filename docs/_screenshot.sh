#!/usr/bin/env bash
# Remake docs/tensorboard.png: run the demo, serve its logs with a real tensorboard on loopback, and
# screenshot the Custom Scalars tab with headless Chromium (Debian: apt-get install chromium).
set -eu
LOGS=$(mktemp -d)
.venv/bin/torchwatch demo --logdir "$LOGS" > /dev/null
.venv/bin/tensorboard --logdir "$(echo "$LOGS"/run-*)/tensorboard" --port 6123 --host 127.0.0.1 > /dev/null 2>&1 &
TB=$!
trap 'kill $TB' EXIT
sleep 8
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,2400 \
  --virtual-time-budget=20000 --screenshot=docs/tensorboard.png "http://127.0.0.1:6123/?darkMode=false#custom_scalars"
