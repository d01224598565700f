"""Linear-probe evaluation of feature upsamplers on CamVid (11 classes, void ignored).

    python examples/camvid_probe.py --methods bilinear,bilateral,jbu --json camvid.json
    python examples/camvid_probe.py --methods bilinear,jbu=/tmp/jbu.safetensors --eval-split val
    python examples/camvid_probe.py --limit 4 --methods bilinear,bilateral         # smoke run, seconds
    python examples/camvid_probe.py --limit 10 --methods jbu,implicit,fit-jbu="implicit[base=jbu;steps=100]"
    python examples/camvid_probe.py --layer blocks.4 --methods bilinear,attention    # another feature source

Protocol (FeatUp-style linear probe, CamVid SegNet split, labels 480x360):
* Frozen backbone features of each image, resized so that its shorter side is --input-size (aspect kept), are
  upsampled by each method to the label resolution (the annotation's H x W), guided by the full image.
* Probe: logistic regression per pixel (``nn.Linear(C, 11)`` with bias) on features standardised with the
  train mean/std. Trained on --pixels-per-image random non-void pixels of each train image (the same positions
  for every method, seeded per image), full batch, L-BFGS (strong Wolfe) for --epochs iterations, with an L2
  penalty of 1e-3 on the weights (see ``L2``).
* Evaluation: every non-void pixel of every eval image (label >= 11 is void) goes into an 11 x 11 confusion
  matrix. mIoU = mean over the 11 classes of TP / (TP + FP + FN), skipping classes whose union is 0 (absent
  from both labels and predictions); pixel accuracy = trace / total. Both in percent.
* Fidelity (AnyUp's check that an upsampler keeps the feature space): one probe trained on the low-resolution
  features (label of each feature cell = the label pixel nearest to the cell centre; void cells skipped), then
  applied unchanged to every method's upsampled features on the eval split; its mIoU is "fidelity mIoU".

The low-res features of all images are computed once and kept (a few MB); upsampled features (C x 360 x 480,
~220 MB at C = 320) are made one image at a time, per method, and dropped at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from upcli.backbones import create_backbone
from upcli.errors import UpcliError, UsageError
from upcli.io.images import IMAGE_EXTENSIONS, load_rgb
from upcli.upsamplers import create_upsampler

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "camvid"
DEFAULT_METHODS = "bilinear,bilateral,jbu,pac,attention"  # what ships; add a trained one as LABEL=CHECKPOINT
NUM_CLASSES = 11  # label 11 (and anything above) is void
# L2 penalty on the (standardised) probe weights. With it L-BFGS converges within the default 100 iterations, so the
# scores do not hang on where it stops: on 19 train / 17 val images, bilinear mIoU was 35.9 / 36.1 after 100 / 300
# iterations at 1e-3, against 34.1 / 26.4 with no penalty.
L2 = 1e-3


# ---- data ---------------------------------------------------------------------------------------------------
def find_pairs(root: Path, split: str, limit: int | None) -> list[tuple[Path, Path]]:
    """(image, label) pairs of ``split``, paired by file stem, sorted by name; the first ``limit`` only."""
    images = {p.stem: p for p in (root / split).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    labels = sorted((root / f"{split}annot").glob("*.png"))
    missing = [p.name for p in labels if p.stem not in images]
    if missing:
        raise UsageError(f"{root / split}: no image for label {missing[0]} ({len(missing)} missing)")
    if not labels:
        raise UsageError(f"{root / f'{split}annot'} holds no label PNGs")
    return [(images[p.stem], p) for p in labels[:limit]]


def load_image(path: Path, device: torch.device) -> Tensor:
    """``Tensor[1, 3, H, W]`` float in [0, 1]."""
    rgb = torch.from_numpy(load_rgb(path)).to(device)
    return rgb.permute(2, 0, 1)[None].float() / 255


def load_label(path: Path, device: torch.device) -> Tensor:
    """``Tensor[H, W]`` int64 class ids; every value >= 11 becomes 11 (void)."""
    with Image.open(path) as img:
        label = torch.from_numpy(np.array(img, dtype=np.int64))
    return label.clamp_max(NUM_CLASSES).to(device)


def backbone_input(image: Tensor, input_size: int) -> Tensor:
    """``image`` resized so that its shorter side is ``input_size`` (aspect kept)."""
    H, W = image.shape[-2:]
    scale = input_size / min(H, W)
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


def cell_labels(label: Tensor, grid: tuple[int, int]) -> Tensor:
    """Label of each cell of a ``grid`` laid over ``label``: the pixel nearest to the cell centre, ``(h * w,)``."""
    (H, W), (h, w) = label.shape, grid
    rows = ((torch.arange(h, device=label.device) + 0.5) * H / h).long().clamp_max(H - 1)
    cols = ((torch.arange(w, device=label.device) + 0.5) * W / w).long().clamp_max(W - 1)
    return label[rows[:, None], cols[None, :]].flatten()


def sample_pixels(label: Tensor, n: int, seed: int, index: int) -> Tensor:
    """Flat positions of ``n`` random non-void pixels (all of them if fewer); fixed by ``(seed, index)``."""
    valid = (label.flatten() < NUM_CLASSES).nonzero().squeeze(1).cpu().numpy()
    rng = np.random.default_rng([seed, index])
    chosen = rng.choice(valid, size=min(n, valid.size), replace=False)
    return torch.from_numpy(np.sort(chosen)).to(label.device)


@dataclass
class LowRes:
    """What every method shares for one image: its paths, low-res features and sampled pixel positions."""

    image: Path
    label: Path
    feats: Tensor  # (1, C, h, w), float32
    pixels: Tensor | None = None  # flat positions of the sampled train pixels; None for eval images


def extract_lowres(pairs, backbone: nn.Module, args, device: torch.device, train: bool, desc: str) -> list[LowRes]:
    """Backbone features of every image, once; for train images also the sampled pixel positions."""
    out = []
    for i, (image_path, label_path) in enumerate(tqdm(pairs, desc=desc, file=sys.stderr, leave=False)):
        feats = backbone(backbone_input(load_image(image_path, device), args.input_size))
        pixels = None
        if train:
            pixels = sample_pixels(load_label(label_path, device), args.pixels_per_image, args.seed, i)
        out.append(LowRes(image_path, label_path, feats, pixels))
    return out


# ---- probe --------------------------------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """A trained probe with the standardisation folded in: ``logits = weight @ feats + bias``."""

    weight: Tensor  # (11, C)
    bias: Tensor  # (11,)

    def predict(self, feats: Tensor) -> Tensor:
        """``Tensor[1, C, H, W]`` -> class ids ``Tensor[H, W]``; one matmul on a view, no copy of ``feats``."""
        logits = self.weight @ feats[0].flatten(1) + self.bias[:, None]  # (11, H * W)
        return logits.argmax(0).view(feats.shape[-2:])


def fit_probe(x: Tensor, y: Tensor, epochs: int, seed: int) -> LinearProbe:
    """Logistic regression on standardised ``x (N, C)``, labels ``y (N,)``; full-batch L-BFGS. Overwrites ``x``."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x.sub_(mean).div_(std)  # in place: x can be hundreds of MB
    torch.manual_seed(seed)
    linear = nn.Linear(x.shape[1], NUM_CLASSES).to(x.device)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=epochs, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(x), y) + L2 * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # the caller runs under no_grad
        opt.step(closure)
    with torch.no_grad():  # W ((x - m) / s) + b  ==  (W / s) x + (b - (W / s) m)
        weight = linear.weight / std
        return LinearProbe(weight, linear.bias - weight @ mean)


def lowres_training_set(train: list[LowRes], device: torch.device) -> tuple[Tensor, Tensor]:
    """Every non-void feature cell of the train images, with the label at the cell centre."""
    xs, ys = [], []
    for item in train:
        feats = item.feats[0]
        cells = cell_labels(load_label(item.label, device), tuple(feats.shape[-2:]))
        keep = cells < NUM_CLASSES
        xs.append(feats.flatten(1).T[keep])
        ys.append(cells[keep])
    return torch.cat(xs), torch.cat(ys)


# ---- metrics ------------------------------------------------------------------------------------------------
def confusion(pred: Tensor, label: Tensor) -> Tensor:
    """11 x 11 counts (rows: label, columns: prediction) over the non-void pixels."""
    valid = label < NUM_CLASSES
    index = label[valid] * NUM_CLASSES + pred[valid]
    return torch.bincount(index, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES).cpu()


def miou(conf: Tensor) -> float:
    """Mean IoU in percent over the classes with a non-empty union (in the labels or the predictions)."""
    tp = conf.diag().double()
    union = conf.sum(0) + conf.sum(1) - conf.diag()
    present = union > 0
    return float((tp[present] / union[present]).mean() * 100) if present.any() else 0.0


def pixel_accuracy(conf: Tensor) -> float:
    return float(conf.diag().sum() / conf.sum().clamp_min(1) * 100)


# ---- one method ---------------------------------------------------------------------------------------------
class Timer:
    """Upsamples one image at a time and adds up the seconds spent in the upsampler only."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.calls = device, 0.0, 0

    def upsample(self, up: nn.Module, item: LowRes) -> tuple[Tensor, Tensor]:
        """Features of ``item`` at its label resolution, and the label."""
        image, label = load_image(item.image, self.device), load_label(item.label, self.device)
        self.sync()
        start = time.perf_counter()
        feats = up(item.feats, image, size=tuple(label.shape))
        self.sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return feats, label

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def evaluate_method(name: str, up: nn.Module, train: list[LowRes], evals: list[LowRes], lr_probe: LinearProbe,
                    args, device: torch.device) -> dict:
    """Train this method's probe on the sampled train pixels, then score it (and the low-res probe) on ``evals``."""
    timer = Timer(device)
    # 1. sampled train pixels of the upsampled features, written into one preallocated matrix
    total = sum(len(item.pixels) for item in train)
    x = torch.empty(total, train[0].feats.shape[1], device=device)
    y = torch.empty(total, dtype=torch.long, device=device)
    row = 0
    for item in tqdm(train, desc=f"{name}: train features", file=sys.stderr, leave=False):
        feats, label = timer.upsample(up, item)
        n = len(item.pixels)
        x[row:row + n] = feats[0].flatten(1)[:, item.pixels].T
        y[row:row + n] = label.flatten()[item.pixels]
        row += n
        del feats
    print(f"{name}: fitting the probe on {total} pixels", file=sys.stderr)
    probe = fit_probe(x, y, args.epochs, args.seed)
    del x, y

    # 2. every non-void eval pixel, with this probe and with the low-res probe
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    fid_conf = torch.zeros_like(conf)
    for item in tqdm(evals, desc=f"{name}: evaluate", file=sys.stderr, leave=False):
        feats, label = timer.upsample(up, item)
        conf += confusion(probe.predict(feats), label)
        fid_conf += confusion(lr_probe.predict(feats), label)
        del feats
    return {
        "miou": round(miou(conf), 2),
        "pixel_acc": round(pixel_accuracy(conf), 2),
        "fidelity_miou": round(miou(fid_conf), 2),
        "upsample_s_per_image": round(timer.seconds / max(timer.calls, 1), 4),
    }


# ---- command line -------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, exit 2 (argparse prints the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def parse_methods(text: str, parser: Parser) -> dict[str, str]:
    """``"bilinear,jbu=/tmp/x.safetensors"`` -> ``{"bilinear": "bilinear", "jbu": "/tmp/x.safetensors"}``."""
    methods = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        label, sep, spec = entry.partition("=")
        label, spec = label.strip(), (spec.strip() if sep else label.strip())
        if not label or not spec:
            parser.error(f"bad --methods entry {entry!r}: use NAME or LABEL=PATH")
        if label in methods:
            parser.error(f"--methods names {label!r} twice")
        methods[label] = spec
    if not methods:
        parser.error("--methods is empty")
    return methods


def split_spec(spec: str) -> tuple[str, dict]:
    """``"implicit[base=jbu;steps=100]"`` -> ``("implicit", {"base": "jbu", "steps": 100})``; numbers are parsed."""
    name, _, options = spec.partition("[")
    kwargs = {}
    for item in filter(None, options.rstrip("]").split(";")):
        key, _, value = item.partition("=")
        for cast in (int, float, str):
            try:
                kwargs[key.strip()] = cast(value.strip())
                break
            except ValueError:
                continue
    return name, kwargs


def build_parser() -> Parser:
    parser = Parser(prog="camvid_probe.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA,
                        help="folder with train/, trainannot/, <split>/, <split>annot/ (default: %(default)s)")
    parser.add_argument("--eval-split", choices=("val", "test"), default="val")
    parser.add_argument("--backbone", default="efficientnet-lite0",
                        help="backbone name, timm:<model> or itpn:<checkpoint> (default: %(default)s)")
    parser.add_argument("--weights", default=None, help="local backbone checkpoint, as for `upcli upsample`")
    parser.add_argument("--layer", default=None, help="backbone layer (default: the backbone's own)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma list of upsampler names or LABEL=CHECKPOINT (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--input-size", type=positive_int, default=224,
                        help="shorter image side fed to the backbone (default: %(default)s)")
    parser.add_argument("--pixels-per-image", type=positive_int, default=1000,
                        help="non-void train pixels sampled per image for the probe (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=100,
                        help="full-batch L-BFGS iterations of each probe (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N images of each split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    return parser


def print_table(results: dict) -> None:
    print(f"{'method':<16} {'mIoU':>6} {'pixel acc':>9} {'fidelity mIoU':>13} {'upsample s/img':>14}")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:<16} skipped: {r['skipped']}")
        else:
            print(f"{name:<16} {r['miou']:>6.2f} {r['pixel_acc']:>9.2f} {r['fidelity_miou']:>13.2f} "
                  f"{r['upsample_s_per_image']:>14.4f}")


@torch.no_grad()
def run(args, methods: dict[str, str]) -> dict:
    device = torch.device(args.device)
    train_pairs = find_pairs(args.data_root, "train", args.limit)
    eval_pairs = find_pairs(args.data_root, args.eval_split, args.limit)
    backbone = create_backbone(args.backbone, weights=args.weights, layer=args.layer).eval().to(device)

    # every upsampler first, so that a skipped one shows before the long part
    upsamplers, results = {}, {}
    for name, spec in methods.items():
        try:
            kind, options = split_spec(spec)
            upsamplers[name] = create_upsampler(kind, backbone=backbone, **options).eval().to(device)
        except UpcliError as err:
            results[name] = {"skipped": str(err)}
            print(f"{name}: skipped: {err}", file=sys.stderr)

    train = extract_lowres(train_pairs, backbone, args, device, train=True, desc="backbone: train")
    evals = extract_lowres(eval_pairs, backbone, args, device, train=False, desc=f"backbone: {args.eval_split}")
    print(f"low-res probe: fitting on the feature cells of {len(train)} train images", file=sys.stderr)
    lr_probe = fit_probe(*lowres_training_set(train, device), args.epochs, args.seed)
    for name, up in upsamplers.items():
        results[name] = evaluate_method(name, up, train, evals, lr_probe, args, device)
    results = {name: results[name] for name in methods}  # in the order asked for

    results["_config"] = {
        "backbone": backbone.name, "layer": str(backbone.layer), "weights": args.weights, "input_size": args.input_size, "eval_split": args.eval_split,
        "pixels_per_image": args.pixels_per_image, "epochs": args.epochs, "seed": args.seed,
        "train_images": len(train), "eval_images": len(evals), "data_root": str(args.data_root),
        "probe": f"nn.Linear(C, {NUM_CLASSES}) on train-standardised features, full-batch L-BFGS, L2 {L2}",
        "miou": f"mean over the {NUM_CLASSES} classes of TP / (TP + FP + FN), classes with empty union skipped",
    }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    methods = parse_methods(args.methods, parser)
    args.data_root = args.data_root.expanduser().resolve()
    for folder in ("train", "trainannot", args.eval_split, f"{args.eval_split}annot"):
        if not (args.data_root / folder).is_dir():
            parser.error(f"no folder {args.data_root / folder} (see --data-root)")
    try:
        results = run(args, methods)
    except UpcliError as err:
        parser.exit(err.exit_code, f"{parser.prog}: error: {err}\n")  # 2 for bad data, 1 otherwise

    print_table({k: v for k, v in results.items() if k != "_config"})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
