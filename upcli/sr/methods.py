"""The SR methods behind ``upcli sr`` and ``examples/sr_benchmark.py``, by name (``create_sr_method``).

Each is called as ``method(lr, degradation, progress=None) -> (sr, info)`` with ``lr`` (1, 3, h, w) in [0, 1];
``progress(done, total)``, where given, hears of each training step (ZSSR's iterations, MZSR's adaptation):

- ``bicubic``: MATLAB bicubic interpolation;
- ``feedforward``: one pass of a pretrained network (``init``, made by ``upcli pretrain mzsr``);
- ``zssr``: ZSSR from scratch, or from ``init``;
- ``mzsr``: ``steps`` adaptation steps from a meta-learned ``init``, then one pass.
"""

from __future__ import annotations

import time

import torch

from .._registry import Registry
from ..errors import UsageError
from .degrade import Degradation, upscale
from .mzsr import adapt
from .net import SRNet, load_sr_net
from .zssr import ZSSRConfig, super_resolve, zssr

SR_METHODS: Registry = Registry("SR method")


def create_sr_method(name: str, **kwargs):
    return SR_METHODS.create(name, **kwargs)


def _require_init(name: str, init) -> tuple[SRNet, dict]:
    if init is None:
        raise UsageError(f"{name} needs --init CKPT, a network made by `upcli pretrain mzsr`")
    return load_sr_net(init)


@SR_METHODS.register("bicubic")
class Bicubic:
    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def __call__(self, lr: torch.Tensor, degradation: Degradation, progress=None):
        size = (lr.shape[-2] * degradation.scale, lr.shape[-1] * degradation.scale)
        return upscale(lr, size).clamp(0, 1), {}


@SR_METHODS.register("feedforward")
class FeedForward:
    def __init__(self, init: str | None = None, device: str | torch.device = "cpu"):
        net, self.meta = _require_init("the feed-forward pass", init)
        self.net = net.to(device).eval()
        self.device = torch.device(device)

    def __call__(self, lr: torch.Tensor, degradation: Degradation, progress=None):
        _check_scale(self.meta, degradation)
        return super_resolve(self.net, lr, degradation), {}


@SR_METHODS.register("zssr")
class ZSSR:
    def __init__(self, config: ZSSRConfig | None = None, init: str | None = None, device: str | torch.device = "cpu"):
        self.config = config or ZSSRConfig()
        self.init = load_sr_net(init)[0] if init is not None else None
        self.device = torch.device(device)

    def __call__(self, lr: torch.Tensor, degradation: Degradation, progress=None):
        import copy

        net = copy.deepcopy(self.init) if self.init is not None else None
        result = zssr(lr, degradation, self.config, net=net, progress=progress)
        return result.sr, {"iterations": result.iterations, "train_seconds": round(result.seconds, 3),
                           "final_loss": round(sum(result.losses[-20:]) / max(len(result.losses[-20:]), 1), 6)}


@SR_METHODS.register("mzsr")
class MZSR:
    def __init__(self, init: str | None = None, steps: int = 10, device: str | torch.device = "cpu"):
        if steps < 0:
            raise UsageError(f"--steps must be 0 or more, got {steps}")
        net, self.meta = _require_init("MZSR", init)
        self.net = net.to(device)
        self.steps = steps
        self.device = torch.device(device)

    def __call__(self, lr: torch.Tensor, degradation: Degradation, progress=None):
        _check_scale(self.meta, degradation)
        start = time.perf_counter()
        net, losses = adapt(self.net, lr, degradation, self.steps, progress=progress)
        sr = super_resolve(net, lr, degradation)
        return sr, {"steps": self.steps, "adapt_seconds": round(time.perf_counter() - start, 3),
                    "son_loss": round(losses[-1], 6) if losses else None}


def _check_scale(meta: dict, degradation: Degradation) -> None:
    if meta.get("scale") not in (None, degradation.scale):
        raise UsageError(f"the network was trained for x{meta['scale']}, not x{degradation.scale}")
