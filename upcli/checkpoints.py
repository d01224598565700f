"""Checkpoint files: upcli's own format, loading one of a given kind, and reading other people's state dicts.

upcli checkpoints are ``.safetensors`` files: tensors plus one JSON config in the metadata under ``"upcli"``
(``format``, ``version``, ``kind``, ``backbone``, ``layer``, ``dim``, ...). :func:`read_config` reads the config
without touching a weight, so a wrong kind or shape is refused before anything is built. Files are written to a
temporary name, fsynced and renamed: a crash leaves the previous checkpoint intact.

Foreign checkpoints (a backbone's ``.pth``, FeatUp's Lightning ``.ckpt``) go through :func:`read_state_dict`:
safetensors, or ``torch.load(weights_only=True)``; nothing is ever unpickled with the full unpickler.

Importing this module does not import torch.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Container
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import WeightsError, first_line

if TYPE_CHECKING:
    from torch import Tensor

CHECKPOINT_FORMAT = "upcli-checkpoint"
CHECKPOINT_VERSION = 1

# what each loadable kind is, for the error that refuses another kind
KINDS = {
    "upsampler": "an upsampler (make one with `upcli train`)",
    "itpn": "an iTPN (make one with `upcli pretrain itpn`)",
    "sr-net": "an SR network (make one with `upcli pretrain mzsr`)",
}

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def names_checkpoint_file(name: str, registered: Container[str]) -> bool:
    """Whether ``name`` stands for a checkpoint file rather than one of the ``registered`` names: it is not one of
    them, and it ends like a checkpoint, holds a path separator or is an existing file."""
    return name not in registered and (name.endswith(CHECKPOINT_SUFFIXES) or "/" in name or "\\" in name
                                       or os.sep in name or os.path.isfile(name))


# ---- upcli's format ----------------------------------------------------------------------------------------

def checkpoint_bytes(tensors: dict[str, Tensor], config: dict) -> bytes:
    """``tensors`` and ``config`` as the bytes of a checkpoint file (safetensors)."""
    from safetensors.torch import save

    meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **config}
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"upcli": json.dumps(meta)})


def save_checkpoint(path: str | Path, tensors: dict[str, Tensor], config: dict) -> None:
    """Write ``tensors`` and ``config`` to ``path`` (safetensors), atomically."""
    from .io.store import write_atomic

    write_atomic(Path(path), checkpoint_bytes(tensors, config))


def read_config(path: str | Path, kind: str | None = None) -> dict:
    """The JSON config of a checkpoint, without loading a weight; with ``kind``, a checkpoint of another kind is
    refused. Raises ``WeightsError`` for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not our checkpoint"
        raise WeightsError(f"{path} is not a safetensors checkpoint ({type(exc).__name__})") from None
    try:
        config = json.loads(meta["upcli"])
    except (KeyError, ValueError, RecursionError):
        raise WeightsError(f"{path} has no upcli config in its metadata (not made by upcli?)") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: its upcli config is a JSON {type(config).__name__}, not an object")
    version = config.get("version", 0)
    if config.get("format") != CHECKPOINT_FORMAT or not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise WeightsError(f"{path}: unsupported checkpoint format {config.get('format')!r:.40} v{version!r:.20}")
    if kind is not None and config.get("kind") != kind:
        raise WeightsError(f"{path} is a {config.get('kind')} checkpoint, not {KINDS.get(kind, f'a {kind}')}")
    return config


def build_checked(path: str | Path, build, prefix: str = ""):
    """The module ``build()`` makes from checkpoint ``path``'s config, built only after a dry run on the meta
    device (nothing allocated) has shown that every tensor it has is in the file, with the same shape: a config
    can then never ask for more memory than the file holds, however it was edited. One-line ``WeightsError``."""
    import torch
    from safetensors import safe_open

    try:
        with torch.device("meta"):
            ghost = build()
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to build means a bad config
        raise WeightsError(f"{path}: its config describes no model that can be built ({type(exc).__name__}: "
                           f"{first_line(exc)})") from None
    with safe_open(str(path), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    for name, tensor in ghost.state_dict().items():
        key = prefix + name
        if key not in shapes:
            raise WeightsError(f"{path}: has no tensor {key!r}, which the model in its config has")
        if shapes[key] != tuple(tensor.shape):
            raise WeightsError(f"{path}: tensor {key!r} is {list(shapes[key])}, but its config makes it "
                               f"{list(tensor.shape)}")
    return build()


def check_finite(path: str | Path, tensors: dict) -> None:
    """Refuse weights with NaN or infinite values (a diverged run's), naming the first such tensor."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise WeightsError(f"{path}: tensor {key!r} has NaN or infinite values")


def load_checkpoint(path: str | Path, kind: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, config)``, after :func:`read_config` has checked the file (and its ``kind``)."""
    from safetensors.torch import load_file

    config = read_config(path, kind)
    return load_file(str(path)), config


# ---- foreign state dicts -----------------------------------------------------------------------------------

# Containers that wrap a state dict, tried in order: Lightning/timm train, DINOv2 train ("model"), DINO v1 train.
_CONTAINER_KEYS = ("state_dict", "model", "teacher", "student", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
_SUBMODEL_PREFIXES = ("teacher.", "backbone.")  # DINO(v2) train checkpoints: keep the teacher's backbone only


def read_state_dict(path, container: str | None = None) -> dict[str, Tensor]:
    """The tensors of someone else's checkpoint ``path``, unwrapped by :func:`clean_state_dict`. Every problem is
    one ``WeightsError`` line naming the file.

    ``container``: where files of this kind keep their weights (Lightning: ``"state_dict"``); a file the safe
    loader refuses then gets an error that shows how to extract them from a file you trust.
    """
    obj = _read_tensor_file(Path(path), container)
    try:
        return clean_state_dict(obj)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None


def _read_tensor_file(path: Path, container: str | None) -> object:
    """Read ``path`` without running arbitrary pickled code: safetensors, or ``torch.load(weights_only=True)``."""
    import torch

    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if not _is_torch_file(path):
            raise WeightsError(f"{path}: cannot read checkpoint: not a PyTorch or .safetensors file")
        return torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as e:
        text = str(e)
        if "TorchScript" in text:
            raise WeightsError(f"{path}: is a TorchScript archive; save its torch.jit.load(...).state_dict() "
                               "with torch.save and pass that") from None
        if "Unsupported operand" in text:  # junk after a pickle's first byte
            raise WeightsError(f"{path}: cannot read checkpoint: bad pickle data") from None
        if "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise WeightsError(f"{path}: refused to unpickle a Python object{what}; "
                               f"{_unpickle_remedy(path, container)}") from None
        raise WeightsError(f"{path}: cannot read checkpoint: {first_line(e)}") from None


def _unpickle_remedy(path: Path, container: str | None) -> str:
    if container is None:
        return "only tensor checkpoints load (re-save with torch.save(model.state_dict(), ...) or use .safetensors)"
    extracted = path.with_name(f"{path.stem}-state.pth")
    return (f"if you trust the file, extract its weights with `python -c \"import torch; "
            f"torch.save(torch.load('{path}', weights_only=False)['{container}'], '{extracted}')\"` and pass "
            f"{extracted} instead")


def _is_torch_file(path: Path) -> bool:
    with open(path, "rb") as f:
        legacy = f.read(1) == b"\x80"  # torch.save(_use_new_zipfile_serialization=False): a bare pickle
    return legacy or zipfile.is_zipfile(path)


def clean_state_dict(obj: object) -> dict[str, Tensor]:
    """Unwrap train containers and wrapper prefixes into a flat ``{key: tensor}`` dict."""
    import torch

    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise WeightsError(f"holds a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"holds no tensors (top-level keys: {', '.join(map(str, list(obj)[:5]))})")

    def strip(key: str) -> str:
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        return key

    sd = {strip(k): v for k, v in sd.items()}
    for prefix in _SUBMODEL_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd
