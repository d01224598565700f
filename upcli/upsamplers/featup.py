"""Convert FeatUp's released JBU-stack checkpoints into upcli ``jbu`` checkpoints.

FeatUp (Fu et al., ICLR 2024) ships one JBU stack per backbone as a PyTorch Lightning checkpoint,
``{model}_jbu_stack_cocostuff.ckpt`` (and ``no_norm/...`` variants trained without the channel norm). This module
maps its weights onto :class:`~upcli.upsamplers.jbu.JBUStack` built as
``JBUStack(dim=D, layers=4, key_dim=32, radius=3, guidance="rgb", fixup=True, residual="output",
channel_norm=<norm keys present>, guidance_resize="area")`` and writes an ordinary upcli checkpoint::

    upcli convert featup dinov2_jbu_stack_cocostuff.ckpt featup-dinov2.safetensors --backbone dinov2
    upcli upsample IMAGES --backbone dinov2 --upsampler featup-dinov2.safetensors ...

Key mapping (FeatUp keys may carry the ``upsampler.`` prefix or not; k = 1..4)::

    FeatUp                                     upcli                                   note
    upsampler.up{k}.range_temp                 stages.{k-1}.range_temp                 0-dim or (1,) -> 0-dim
    upsampler.up{k}.sigma_spatial              stages.{k-1}.sigma_spatial              0-dim or (1,) -> 0-dim
    upsampler.up{k}.range_proj.0.{weight,bias} stages.{k-1}.range_proj.0.{weight,bias} conv 3 -> 32
    upsampler.up{k}.range_proj.3.{weight,bias} stages.{k-1}.range_proj.2.{weight,bias} FeatUp's [2] is Dropout2d
    upsampler.up{k}.fixup_proj.0.{weight,bias} stages.{k-1}.fixup_proj.0.{weight,bias} conv 52 -> 49
    upsampler.up{k}.fixup_proj.3.{weight,bias} stages.{k-1}.fixup_proj.2.{weight,bias} FeatUp's [2] is Dropout2d
    upsampler.fixup_proj.1.{weight,bias}       residual.{weight,bias}                  times 0.1 (see below)
    model.1.norm.{weight,bias}                 channel_norm.{weight,bias}              only in the use_norm files
    downsampler.*, scale_net.*, model.*        (ignored)                               training-only / backbone

FeatUp's final step is ``out = x + 0.1 * conv(x)`` (after a Dropout2d that eval mode turns off); ours is
``x + residual(x)`` at the output with ``residual="output"``, so ``residual = 0.1 * conv`` (weight and bias).
Whether the channel norm (a LayerNorm over channels of the backbone features, applied before the stages) is on
is read from the ``model.1.norm.*`` keys. A state dict holding only the upsampler (no ``model.*`` key at all)
does not say; pass ``channel_norm=`` (``--channel-norm`` / ``--no-channel-norm``) for it.

Safety: a ``.ckpt``/``.pth`` is a pickle, and unpickling runs code. Files are read by
:func:`upcli.checkpoints.read_state_dict`: ``torch.load(weights_only=True)`` (or as ``.safetensors``), never with a
full unpickler. Lightning checkpoints
may hold objects that the safe loader refuses (e.g. OmegaConf configs in ``hyper_parameters``); then the error
says how to extract the bare state dict yourself, from a file you trust, and convert that file instead.

What matches and what does not. Each converted stage computes FeatUp's ``JBULearnedRange`` in eval mode: keys
from a 1x1 MLP of the guidance, reflect-padded 7x7 dot products times ``exp(range_temp)`` (clamped to
[1e-4, 1e4]), softmax over the 49 taps times the Gaussian on ``linspace(-1, 1, 7)``^2 renormalised (we add the
log-Gaussian to the logits before the softmax: the same function), plus ``0.1 * fixup_proj(cat[kernel(49),
guidance(3)])``, then the per-pixel 7x7 correlation of the bicubic-upsampled, reflect-padded features (tap
``i * 7 + j`` on padded ``[h + i, w + j]``). Differences:

- FeatUp's stack is fixed at 4 x 2x = 16x the backbone grid, with the stage guidance
  ``adaptive_avg_pool2d(image, (2h, 2w))`` of the ImageNet-normalised image. Ours lands on any requested size
  (``round(log2(ratio))`` stages of about 2x; stage ``s`` uses FeatUp's ``up{min(s, 3) + 1}``). Converted stacks
  pool the guidance as FeatUp (``guidance_resize="area"``), so at exactly 16x they compute FeatUp's function
  (checked in the tests against an independent unfold-based re-implementation). At other ratios (e.g. DINOv2 at
  224: 16 -> 224 instead of FeatUp's 256) the stage sizes differ.
- Maps of at most 3 pixels on a side are replicate- instead of reflect-padded (FeatUp's reflect pad fails there).
- ``sigma_spatial ** 2`` is clamped to >= 1e-6 and the renormalisation has no 1e-7 floor: irrelevant for the
  released weights.
- Backbone features: the converted stack only fits features like the ones FeatUp trained on (same model, same
  layer, same dim). upcli's ``clip`` gives the 768-d tokens before the projection, FeatUp's ``clip`` the 512-d
  projected ones: the dims differ and upcli refuses the pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..checkpoints import read_state_dict
from ..errors import WeightsError
from .checkpoints import save_upsampler
from .jbu import JBUStack

FEATUP_STAGES = 4
NORM_KEYS = ("model.1.norm.weight", "model.1.norm.bias")
_IGNORED = ("downsampler", "scale_net")
# FeatUp's Sequential index -> ours (FeatUp: Conv, GELU, Dropout2d, Conv; ours: Conv, GELU, Conv)
_MLP_INDEX = {0: 0, 3: 2}


def _upsampler_prefix(state_dict: dict[str, Tensor]) -> str:
    return "upsampler." if any(k.startswith("upsampler.") for k in state_dict) else ""


def convert_featup_jbu(state_dict: dict[str, Tensor], dim: int | None = None,
                       channel_norm: bool | None = None) -> JBUStack:
    """Our :class:`JBUStack` (eval mode) holding the weights of FeatUp's JBU stack in ``state_dict``.

    ``dim``: the feature dim you expect (checked against the checkpoint's). ``channel_norm``: ``None`` reads it
    from the ``model.1.norm.*`` keys; ``True`` without those keys uses FeatUp's never-trained affine (1, 0).
    Every parameter of ours is filled from a FeatUp key; a missing key, a wrong shape or an upsampler key
    we do not know is a ``WeightsError`` naming the key.
    """
    prefix = _upsampler_prefix(state_dict)
    used: set[str] = set()

    def get(name: str) -> Tensor:
        key = prefix + name
        if key not in state_dict:
            raise WeightsError(f"the FeatUp state dict has no {key!r} (not a FeatUp JBU stack checkpoint?)")
        used.add(key)
        return state_dict[key]

    final_w, final_b = get("fixup_proj.1.weight"), get("fixup_proj.1.bias")
    if final_w.ndim != 4 or final_w.shape[0] != final_w.shape[1] or tuple(final_w.shape[2:]) != (1, 1):
        raise WeightsError(f"{prefix}fixup_proj.1.weight has shape {tuple(final_w.shape)}, not (dim, dim, 1, 1)")
    feat_dim = int(final_w.shape[0])
    if dim is not None and int(dim) != feat_dim:
        raise WeightsError(f"this FeatUp JBU stack is for {feat_dim}-channel features, not {dim} "
                           "(made for another backbone or layer?)")

    has_norm = all(k in state_dict for k in NORM_KEYS)
    if any(k in state_dict for k in NORM_KEYS) and not has_norm:
        raise WeightsError(f"the FeatUp state dict has only one of {NORM_KEYS}")
    if channel_norm is None:
        if not has_norm and not any(k.startswith("model.") for k in state_dict):
            raise WeightsError("this FeatUp state dict holds no backbone keys, so it does not say whether FeatUp's "
                               "channel norm was on: pass --channel-norm (hub default) or --no-channel-norm (no_norm/)")
        channel_norm = has_norm

    key_dim = int(get("up1.range_proj.0.weight").shape[0])
    taps = int(get("up1.fixup_proj.3.weight").shape[0])
    radius = (round(taps**0.5) - 1) // 2
    stack = JBUStack(dim=feat_dim, layers=FEATUP_STAGES, key_dim=key_dim, radius=radius, guidance="rgb", fixup=True,
                     residual="output", channel_norm=channel_norm, guidance_resize="area")

    mapped: dict[str, tuple[Tensor, str]] = {}  # our key -> (tensor, FeatUp key for messages)
    for k in range(1, FEATUP_STAGES + 1):
        src, dst = f"up{k}.", f"stages.{k - 1}."
        for name in ("range_temp", "sigma_spatial"):
            t = get(src + name)
            if t.numel() != 1:
                raise WeightsError(f"{prefix}{src}{name} has shape {tuple(t.shape)}, not a scalar")
            mapped[dst + name] = (t.reshape(()), prefix + src + name)
        for mlp in ("range_proj", "fixup_proj"):
            for theirs, ours in _MLP_INDEX.items():
                for p in ("weight", "bias"):
                    name = f"{src}{mlp}.{theirs}.{p}"
                    mapped[f"{dst}{mlp}.{ours}.{p}"] = (get(name), prefix + name)
    mapped["residual.weight"] = (0.1 * final_w.float(), prefix + "fixup_proj.1.weight")
    mapped["residual.bias"] = (0.1 * final_b.float(), prefix + "fixup_proj.1.bias")
    if channel_norm:
        for key in NORM_KEYS:
            p = key.rsplit(".", 1)[1]
            mapped[f"channel_norm.{p}"] = ((state_dict[key] if has_norm else stack.channel_norm.state_dict()[p]),
                                           key)

    unknown = sorted(k for k in state_dict if k not in used and _is_upsampler_key(k, prefix))
    if unknown:
        raise WeightsError(f"the FeatUp state dict has upsampler keys this converter does not know "
                           f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): not the released "
                           "JBU stack")
    ours = stack.state_dict()
    for key, (tensor, theirs) in mapped.items():
        if tuple(tensor.shape) != tuple(ours[key].shape):
            raise WeightsError(f"{theirs} has shape {tuple(tensor.shape)}, expected {tuple(ours[key].shape)}")
    try:
        stack.load_state_dict({k: t for k, (t, _) in mapped.items()}, strict=True)
    except RuntimeError as exc:  # a key of ours left unfilled: a bug here, not in the file
        raise WeightsError(f"converted FeatUp weights do not fill the stack: {str(exc).splitlines()[0]}") from None
    return stack.eval()


def _is_upsampler_key(key: str, prefix: str) -> bool:
    if prefix:
        return key.startswith(prefix)
    return not key.startswith("model.") and not any(part in key for part in _IGNORED)


@dataclass(frozen=True)
class FeatUpConversion:
    """What :func:`convert_featup_checkpoint` wrote; :meth:`summary` says it in one line."""

    out: Path
    backbone: str
    layer: str
    dim: int
    channel_norm: bool
    layer_given: bool = False  # the user named the layer: the suggested command names it too

    def summary(self) -> str:
        layer = f" --layer {self.layer}" if self.layer_given else ""
        return (f"wrote {self.out}: FeatUp JBU stack for {self.backbone} layer {self.layer} (dim {self.dim}, channel "
                f"norm {'on' if self.channel_norm else 'off'}); use it with `upcli upsample ... --backbone "
                f"{self.backbone}{layer} --upsampler {self.out}`")


def convert_featup_checkpoint(src, out, backbone: str, layer: str | int | None = None,
                              channel_norm: bool | None = None) -> FeatUpConversion:
    """Convert the FeatUp file ``src`` into the upcli ``jbu`` checkpoint ``out`` for upcli backbone ``backbone``
    (its ``layer``, default the backbone's default layer). The stack's feature dim is checked against that
    layer's before anything is written. ``channel_norm``: see :func:`convert_featup_jbu`."""
    from ..backbones import get_backbone_cfg

    cfg = get_backbone_cfg(backbone, layer)
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise WeightsError(f"refusing to overwrite the FeatUp checkpoint {src}: pick another output path")
    stack = convert_featup_jbu(read_state_dict(src, container="state_dict"), dim=cfg.dim, channel_norm=channel_norm)
    save_upsampler(out, stack, cfg, extra={"converted_from": f"featup:{src.name}"})
    return FeatUpConversion(out, cfg.name, cfg.layer, cfg.dim, bool(stack.config["channel_norm"]), layer is not None)
