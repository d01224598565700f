"""MZSR (Soh et al., CVPR 2020): a start that adapts to one test image in a few gradient steps.

Meta-test (:func:`adapt`): the LR image's own son, made by the test degradation, is the one training pair;
1-10 plain SGD steps of L1 on the whole image, then the adapted network super-resolves the LR image.

Meta-training (:func:`pretrain_mzsr`, ``upcli pretrain mzsr``), one loop over two stages:

    for step in range(start, pretrain_steps + meta_steps):
        if step < pretrain_steps:                   # stage 1: large-scale bicubic pretraining
            hr = patches; loss = L1(net(upscale(bicubic_down(hr))), hr); Adam
        else:                                       # stage 2: meta-transfer learning (second-order MAML)
            for each task: a random Gaussian kernel, support and query patches degraded by it
                theta_j = theta_(j-1) - alpha * grad L1_support(theta_(j-1)),  j = 1..inner_steps
                task loss = sum_j w_j L1_query(theta_j)      (w: equal, or MAML++'s annealed to the last step)
            Adam step of theta on the mean task loss (gradients through the inner steps)
        every save_every steps: checkpoint OUT and OUT's .train state

Every random choice comes from ``generator(seed, purpose, step, sample)``, so a resumed run, or one split over
torchrun processes, draws the same patches and kernels as one uninterrupted process.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..configs import MZSRConfig
from ..errors import UsageError
from ..io.pool import ImagePool
from ..progress import ProgressReporter
from ..runtime import global_mean, resolve_device, setup_distributed
from ..checkpoints import save_checkpoint
from ..training import (TrainingRun, TrainResult, ensure_finite, generator, load_optimizer_tensors, load_train_state,
                        optimizer_tensors, prepare_output, train_state_path)
from .degrade import Degradation, random_kernel, upscale
from .net import SRNet, load_sr_net, mzsr_net, save_sr_net

_PATCH, _KERNEL = 1, 2  # purposes of the random streams


# ---- meta-test ---------------------------------------------------------------------------------------------

def step_sizes(subsample: str, steps: int) -> list[float]:
    """MZSR's meta-test step sizes: for direct subsampling 2e-2, then 1e-2 to step 4, then 5e-3; for bicubic
    subsampling 1e-2 for 3 steps, then 1e-3."""
    if subsample == "direct":
        return [2e-2 if j == 0 else 1e-2 if j < 4 else 5e-3 for j in range(steps)]
    return [1e-2 if j < 3 else 1e-3 for j in range(steps)]


def adapt(net: SRNet, lr: torch.Tensor, degradation: Degradation, steps: int,
          learning_rates: list[float] | None = None, progress=None) -> tuple[SRNet, list[float]]:
    """A copy of ``net`` after ``steps`` SGD steps on the pair (upscale(degradation(lr)) -> lr); and the losses.
    ``progress(done, steps)`` is called after each step."""
    net = copy.deepcopy(net).train()
    if steps == 0:
        return net, []
    rates = learning_rates or step_sizes(degradation.subsample, steps)
    with torch.no_grad():
        son_up = upscale(degradation(lr), lr.shape[-2:])
    optimizer = torch.optim.SGD(net.parameters(), lr=rates[0])
    losses = []
    for j in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = rates[j]
        loss = F.l1_loss(net(son_up), lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(j + 1, steps)
    return net.eval(), losses


# ---- meta-training -----------------------------------------------------------------------------------------


def loss_weights(cfg: MZSRConfig, meta_step: int) -> list[float]:
    """MAML++'s per-step query weights: uniform at first, annealed linearly to (0.006, ..., 1 - 0.006 (n-1))."""
    n = cfg.inner_steps
    if cfg.anneal_steps is None:
        return [1 / n] * n
    floor = 0.006
    progress = min(meta_step / max(cfg.anneal_steps, 1), 1.0)
    early = 1 / n - progress * (1 / n - floor)
    return [early] * (n - 1) + [1 - (n - 1) * early]


def pretrain_learning_rate(cfg: MZSRConfig, step: int) -> float:
    return cfg.pretrain_lr * 0.5 ** (int(step >= cfg.pretrain_steps // 2) + int(step >= 3 * cfg.pretrain_steps // 4))


def bicubic_batch(pool: ImagePool, cfg: MZSRConfig, step: int, samples: range, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: (bicubic-upscaled LR, HR) patches, the LR made by MATLAB bicubic and rounded to 8 bits."""
    hr = torch.stack([pool.patch(generator(cfg.seed, _PATCH, step, s), cfg.pretrain_patch) for s in samples]).to(device)
    lr = Degradation(cfg.scale)(hr, quantize=True)
    return upscale(lr, hr.shape[-2:]), hr


def task_batch(pool: ImagePool, cfg: MZSRConfig, step: int, task: int, device):
    """Stage 2: one task's support and query pairs, all degraded by the task's random kernel (or none)."""
    g = generator(cfg.seed, _KERNEL, step, task)
    plain = float(torch.rand((), generator=g)) < cfg.plain_tasks
    kernel = None if plain else random_kernel(cfg.scale, g, cfg.kernel_size)
    degradation = Degradation(cfg.scale, kernel, cfg.subsample)
    count = 2 * cfg.task_batch
    hr = torch.stack([pool.patch(generator(cfg.seed, _PATCH, step, task * count + s), cfg.task_patch)
                      for s in range(count)]).to(device)
    lr = degradation(hr, quantize=True)
    inputs = upscale(lr, hr.shape[-2:])
    half = cfg.task_batch
    return (inputs[:half], hr[:half]), (inputs[half:], hr[half:])


def task_loss(net: SRNet, support, query, cfg: MZSRConfig, weights: list[float]) -> torch.Tensor:
    """Second-order MAML: query losses after each inner SGD step, weighted; differentiable in ``net``'s weights."""
    params = dict(net.named_parameters())
    total = 0.0
    for j in range(cfg.inner_steps):
        loss = F.l1_loss(functional_call(net, params, (support[0],)), support[1])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {name: p - cfg.inner_lr * g for (name, p), g in zip(params.items(), grads)}
        total = total + weights[j] * F.l1_loss(functional_call(net, params, (query[0],)), query[1])
    return total


def pretrain_mzsr(cfg: MZSRConfig, resume: bool = False, quiet: bool = False, overwrite: bool = False, log_every: float = 10.0) -> TrainResult:
    """Run (or continue) ``upcli pretrain mzsr``; writes ``cfg.out`` (the network) and its ``.train`` state."""
    cfg.check()
    device = resolve_device(cfg.device)
    dist = setup_distributed(device)
    mine = dist.local_batch(cfg.pretrain_batch, "MZSR's stage-1 batch size")
    out, state_path = Path(cfg.out), train_state_path(cfg.out)
    prepare_output(out, resume, overwrite)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    net = mzsr_net().to(device)
    if cfg.init is not None:
        start_net, meta = load_sr_net(cfg.init)
        if start_net.config != net.config or meta.get("scale", cfg.scale) != cfg.scale:
            raise UsageError(f"--init {cfg.init}: a x{meta.get('scale')} network of another shape, not MZSR's x{cfg.scale}")
        net.load_state_dict(start_net.state_dict())
    start, optimizer = 0, None
    if resume:
        start, optimizer = _resume(cfg, net, out, state_path)
    reporter = ProgressReporter("pretrain mzsr", quiet=quiet or not dist.is_main, unit="steps", log_every=log_every)
    pool = ImagePool(cfg.images, None, reporter)
    my_tasks = range(dist.rank, cfg.tasks, dist.world_size)

    def save(step: int, checkpoint: Path, state_path: Path, **info) -> None:
        tensors, optim_json = optimizer_tensors(optimizer)
        save_sr_net(checkpoint, net, {"scale": cfg.scale, "subsample": cfg.subsample, "pretrain_steps": min(step, cfg.pretrain_steps),
                               "meta_steps": max(step - cfg.pretrain_steps, 0), "training": {"step": step, **info}})
        save_checkpoint(state_path, tensors, {"kind": "mzsr-train-state", "step": step, "optimizer": optim_json,
                                              "stage": optimizer.stage, "train_config": cfg.identity()})

    run = TrainingRun("pretrain mzsr", dist, reporter, save, start, cfg.steps, out)
    run.parallel(net)
    history = []
    with run:
        for step in range(start, cfg.steps):
            stage = 1 if step < cfg.pretrain_steps else 2
            if optimizer is None or optimizer.stage != stage:  # a fresh Adam for each stage
                optimizer = torch.optim.Adam(net.parameters(), lr=cfg.pretrain_lr if stage == 1 else cfg.meta_lr)
                optimizer.stage = stage
            optimizer.zero_grad(set_to_none=True)
            if stage == 1:
                for group in optimizer.param_groups:
                    group["lr"] = pretrain_learning_rate(cfg, step)
                inputs, hr = bicubic_batch(pool, cfg, step, mine, device)
                loss = F.l1_loss(run.model(inputs), hr)
                loss.backward()
            else:
                weights = loss_weights(cfg, step - cfg.pretrain_steps)
                loss = torch.zeros((), device=device)
                for task in my_tasks:  # one graph at a time
                    support, query = task_batch(pool, cfg, step, task, device)
                    task_value = task_loss(net, support, query, cfg, weights) / cfg.tasks
                    task_value.backward()
                    loss += task_value.detach()
                if dist.world_size > 1:
                    for p in net.parameters():
                        torch.distributed.all_reduce(p.grad)
                    loss = loss * dist.world_size  # global_mean below divides by it
            optimizer.step()
            value = ensure_finite(global_mean(loss.detach(), dist.world_size), step, out)
            history.append(value)
            done = step + 1
            run.step_done(done, f"stage {stage}, loss {value:.4f}")
            if done % cfg.save_every == 0 or done == cfg.steps or done == cfg.pretrain_steps:
                run.checkpoint(done, loss=value)
    return run.result(losses=history, skipped=pool.skipped)


def _resume(cfg: MZSRConfig, net: SRNet, out: Path, state_path: Path):
    state, config = load_train_state(out, state_path, "mzsr-train-state", cfg.identity())
    saved, _ = load_sr_net(out)
    net.load_state_dict(saved.state_dict())
    step = int(config["step"])
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.pretrain_lr if config["stage"] == 1 else cfg.meta_lr)
    optimizer.stage = 1 if step < cfg.pretrain_steps else 2
    if optimizer.stage == config["stage"]:
        load_optimizer_tensors(optimizer, state, config["optimizer"])
    return step, optimizer
