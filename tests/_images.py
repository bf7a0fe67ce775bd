"""Image traffic with the structure of real photos for alert tests: a mix of kinds of scene
(smooth gradients, textures, dark scenes, hard-edged stripes, saturated objects) whose interval
statistics are heavy-tailed, the way a pretrained CNN's are on real photos: a module's abs-max
depends on which kinds an interval happened to hold. And a small CNN in EfficientNet's shape
(conv, BatchNorm, ReLU6 blocks; pooled features; a 100-class head)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import torchwatch as tw

MEAN = np.array([0.485, 0.456, 0.406])[:, None, None]
STD = np.array([0.229, 0.224, 0.225])[:, None, None]
KINDS = (0.35, 0.3, 0.1, 0.1, 0.15)  # how often each kind of scene arrives


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(_block(3, 16, 2), _block(16, 32, 2), _block(32, 32, 1), _block(32, 64, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 100))  # fmt: skip
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.fill_(4.0)  # activations of a few units, some ReLU6 saturation
    return model.eval()


def photo(kind: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One unnormalised RGB image in [0, 1] of a kind of scene."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == 0:  # sky: a smooth gradient
        img = np.stack([0.3 + 0.4 * yy, 0.5 + 0.3 * yy, 0.8 + 0.1 * yy])
    elif kind == 1:  # foliage: high-frequency texture
        img = 0.4 + 0.25 * rng.standard_normal((3, size, size))
    elif kind == 2:  # a night scene
        img = 0.05 + 0.03 * rng.standard_normal((3, size, size))
    elif kind == 3:  # text or stripes: hard edges
        img = np.broadcast_to(((xx * 8).astype(int) % 2).astype(float), (3, size, size)).copy()
    else:  # a saturated red object on a bright background
        img = np.full((3, size, size), 0.9)
        img[0, 8:24, 8:24], img[1:, 8:24, 8:24] = 1.0, 0.0
    img = img + 0.02 * rng.standard_normal(img.shape) + rng.normal(0, 0.05, (3, 1, 1))
    return np.clip(img, 0, 1)


def requests(rng: np.random.Generator, n: int, *, normalize: bool = True) -> list[torch.Tensor]:
    """``n`` requests of 1-8 images each, kinds drawn at the rates of :data:`KINDS`."""
    out = []
    for _ in range(n):
        kinds = rng.choice(len(KINDS), size=int(rng.integers(1, 9)), p=KINDS)
        x = np.stack([photo(int(k), rng) for k in kinds])
        out.append(torch.from_numpy((x - MEAN) / STD if normalize else x).float())
    return out


def serve(model: nn.Module, watch: tw.Watch, batches: list[torch.Tensor]) -> list[tw.Alert]:
    """Run ``batches`` through ``model`` without gradients, flush, and return the alerts they raised."""
    before = len(watch.alerts)
    with torch.no_grad():
        for x in batches:
            model(x)
    watch.flush()
    return watch.alerts[before:]
