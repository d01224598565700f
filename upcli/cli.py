"""The ``upcli`` command line. Each command parses its flags and makes one library call.

Exit codes: 0 done; 1 error; 2 usage; 3 finished but some inputs failed; 130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import EXIT_INTERRUPTED, EXIT_SOME_FAILED, EXIT_USAGE, UpcliError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Feature upsampling, zero-shot super-resolution and pretraining for computer vision.",
)
pretrain_app = typer.Typer(no_args_is_help=True, help="Pretrain models: iTPN (hierarchical ViT + pyramid) and MZSR's meta-learned start.")
app.add_typer(pretrain_app, name="pretrain")


def _fail(command: str, message: str, code: int) -> typer.Exit:
    print(f"upcli {command}: {message}", file=sys.stderr)
    return typer.Exit(code)


def _call(command: str, fn, *args, **kwargs):
    """Run a library call; map upcli errors and interrupts to exit codes in one place."""
    try:
        return fn(*args, **kwargs)
    except UpcliError as e:
        raise _fail(command, str(e), e.exit_code) from None
    except KeyboardInterrupt:
        raise _fail(command, _INTERRUPTED.get(command, _INTERRUPTED["upsample"]), EXIT_INTERRUPTED) from None


_INTERRUPTED = {
    "upsample": "interrupted; finished shards are kept, re-run the same command to resume",
    "train": "interrupted; the last steps are checkpointed, add --resume to the same command to continue",
    "fit-image": "interrupted; finished images are kept, re-run the same command to resume",
    "sr": "interrupted; finished images are kept, re-run the same command to resume",
    "pretrain mzsr": "interrupted; the last steps are checkpointed, add --resume to the same command to continue",
    "pretrain itpn": "interrupted; the last steps are checkpointed, add --resume to the same command to continue",
}


UPSAMPLE_EXAMPLE = """Examples:

  upcli upsample ./imgs --out feats/ --backbone dinov2 --weights dinov2_vits14_pretrain.pth

  upcli upsample examples/images --out feats/ --upsampler bilateral --preview 2

  upcli upsample ./imgs --out feats/ --num-shards 8 --shard-index 3   # one of 8 workers

  upcli upsample --verify feats/
"""


@app.command(epilog=UPSAMPLE_EXAMPLE)
def upsample(
    folder: Annotated[Optional[Path], typer.Argument(help="Folder of images, scanned recursively.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder for job.json, shards and manifest.")] = None,
    backbone: Annotated[str, typer.Option(help="Backbone name (see --list-backbones), timm:<model>, or itpn:<checkpoint> (upcli pretrain itpn).")] = "efficientnet-lite0",
    weights: Annotated[Optional[Path], typer.Option(help="Local checkpoint: official DINOv2/DINO .pth, timm or torchvision layout.", dir_okay=False)] = None,
    layer: Annotated[Optional[str], typer.Option(help="Backbone layer to read (default: the entry's own).")] = None,
    upsampler: Annotated[str, typer.Option(help="bilinear, bilateral, jbu or pac (the checkpoint shipped for the backbone), implicit (a field fitted to each image: slow, see fit-image), or a checkpoint PATH from upcli train (jbu, pac, resize-conv).")] = "bilinear",
    sigma_spatial: Annotated[Optional[float], typer.Option(help="bilateral: spatial sigma in low-res pixels.")] = None,
    sigma_color: Annotated[Optional[float], typer.Option(help="bilateral: colour sigma on [0, 1] RGB.")] = None,
    size: Annotated[str, typer.Option(help="Shorter side of the output in pixels, or 'original'.")] = "448",
    dtype: Annotated[str, typer.Option(help="Stored dtype: float16, bfloat16 or float32.")] = "float16",
    compression: Annotated[str, typer.Option(help="none, lzf or gzip.")] = "none",
    shard_size: Annotated[int, typer.Option(help="Images per shard file.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Images per model call (same-size images are batched).")] = 1,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader decode workers (default: cores - 1, at most 4).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    num_shards: Annotated[Optional[int], typer.Option(help="Split the work into N parts (default: from RANK/WORLD_SIZE or SLURM).")] = None,
    shard_index: Annotated[Optional[int], typer.Option(help="Which part this process does, 0..N-1.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad image instead of recording it.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace another job's files in --out.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print images, output shapes and disk use; write nothing.")] = False,
    preview: Annotated[int, typer.Option(help="Write N preview PNGs to OUT/previews.")] = 0,
    verify: Annotated[Optional[Path], typer.Option(help="Check a finished store and rebuild its manifest.", file_okay=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    log_every: Annotated[float, typer.Option(help="Seconds between progress lines when stderr is not a terminal.")] = 30.0,
    list_backbones: Annotated[bool, typer.Option("--list-backbones", help="List backbone names and exit.")] = False,
) -> None:
    """Run a backbone over a folder and write features at image resolution to HDF5 shards."""
    from . import upsample as lib

    if list_backbones:
        from .backbones import get_backbone_cfg, list_backbones as names

        for name in names():
            cfg = get_backbone_cfg(name)
            print(f"{name:22s} dim {cfg.dim:5d}  stride {cfg.stride:3d}  layer {cfg.layer}")
        return
    if verify is not None:
        return _verify(verify)
    if folder is None or out is None and not dry_run:
        raise _fail("upsample", "give an image FOLDER and --out DIR (or --verify DIR)", EXIT_USAGE)
    if dry_run:
        plan = _call("upsample", lib.plan_upsample, folder, backbone=backbone, layer=layer, size=size, dtype=dtype)
        return _print_plan(plan)
    upsampler_args = {k: v for k, v in {"sigma_spatial": sigma_spatial, "sigma_color": sigma_color}.items() if v is not None}
    result = _call(
        "upsample", lib.upsample_folder, folder, out, backbone=backbone, weights=weights, layer=layer, upsampler=upsampler,
        upsampler_args=upsampler_args, size=size, dtype=dtype, compression=compression, shard_size=shard_size,
        batch_size=batch_size, workers=workers, device=device, num_shards=num_shards, shard_index=shard_index,
        strict=strict, overwrite=overwrite, preview=preview, quiet=quiet, log_every=log_every,
    )
    if not quiet:
        rate = result.processed / max(result.seconds, 1e-9)
        print(f"upsample: {result.processed} images written to {out} ({rate:.2f} img/s), {result.failed} failed, "
              f"{result.skipped_shards} shards already done", file=sys.stderr)
        if result.timings:
            print(f"time: {', '.join(f'{k} {v:.2f}s' for k, v in result.timings.items())}", file=sys.stderr)
        if result.failed:
            print(f"failed inputs are listed in {Path(out) / 'failures.jsonl'}", file=sys.stderr)
    raise typer.Exit(result.exit_code)


def _verify(out: Path) -> None:
    from .io.jobs import verify_store

    report = _call("upsample", verify_store, out)
    for problem in report["problems"]:
        print(f"upcli upsample --verify: {problem}", file=sys.stderr)
    print(f"{out}: {report['stored']} stored, {report['failed']} failed, of {report['inputs']} inputs; "
          f"{report['complete_shards']}/{report['shards']} shards complete")
    raise typer.Exit(1 if report["problems"] else 0)


def _print_plan(plan: dict) -> None:
    shapes = list(plan["shapes"].items())
    for rel, shape in shapes[:20]:
        print(f"{rel}\t{'x'.join(map(str, shape))}")
    if len(shapes) > 20:
        print(f"... and {len(shapes) - 20} more")
    for rel, reason in plan["bad"].items():
        print(f"{rel}\tunreadable: {reason}")
    print(f"{plan['images']} images, {len(plan['bad'])} unreadable, about {plan['bytes'] / 2**30:.2f} GiB "
          f"({plan['bytes'] / max(len(shapes), 1) / 2**20:.1f} MiB per image) before compression")


TRAIN_EXAMPLE = """Examples:

  upcli train ./coco --backbone dinov2 --weights dinov2_vits14_pretrain.pth --out jbu-dinov2.safetensors

  upcli train ./photos ./camvid/train --image-size 112,128,96x144 --steps 1500 --out jbu.safetensors --val ./val

  upcli train ./photos ./camvid/train --image-size 112,128,96x144 --steps 3000 --out jbu.safetensors --val ./val --resume   # the same options, to 3000 steps

  torchrun --nproc-per-node 4 -m upcli.cli train ./coco --batch-size 16 --out jbu.safetensors

  upcli upsample ./imgs --out feats/ --upsampler jbu.safetensors        # use the result
"""


@app.command(epilog=TRAIN_EXAMPLE)
def train(
    images: Annotated[list[Path], typer.Argument(help="Folders of training images (unlabeled), scanned recursively.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors); training state goes beside it.", dir_okay=False)],
    backbone: Annotated[str, typer.Option(help="Backbone name, timm:<model> or itpn:<checkpoint>.")] = "efficientnet-lite0",
    weights: Annotated[Optional[Path], typer.Option(help="Local backbone checkpoint.", dir_okay=False)] = None,
    layer: Annotated[Optional[str], typer.Option(help="Backbone layer (default: the entry's own).")] = None,
    upsampler: Annotated[str, typer.Option(help="jbu, pac or resize-conv.")] = "jbu",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps in all (also when resuming).")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step, over all processes.")] = 4,
    lr: Annotated[float, typer.Option(help="NAdam learning rate.")] = 1e-3,
    image_size: Annotated[str, typer.Option(help="Training crop size: N, HxW, or a comma list for multi-resolution training (one is drawn per step).")] = "224",
    input_scale: Annotated[str, typer.Option(help="Feed the upsampler the features of each crop shrunk by this factor (or a comma list, one drawn per step), so that it learns the features of a sharper image; 1: FeatUp's objective.")] = "1",
    views: Annotated[int, typer.Option(min=1, help="Jittered views per image and step.")] = 2,
    downsampler: Annotated[str, typer.Option(help="attention or simple.")] = "attention",
    guidance: Annotated[str, typer.Option(help="jbu: rgb (the pixel), conv (a 3x3 conv of the image) or features (the pixel and a projection of the features).")] = "rgb",
    fixup: Annotated[bool, typer.Option(help="jbu: FeatUp's additive kernel correction.")] = False,
    radius: Annotated[str, typer.Option(help="jbu: kernel radius of every stage (3: FeatUp's 7x7), or one per stage from the coarsest, e.g. 3,3,3,2,1 (as many as the stack's layers, log2 of the backbone's stride: 5 for efficientnet-lite0).")] = "3",
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    save_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 100,
    val: Annotated[Optional[Path], typer.Option(help="Folder of held-out images: report the reconstruction loss at each checkpoint.", file_okay=False)] = None,
    resume: Annotated[bool, typer.Option(help="Continue from --out and its training state.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start a new run in place of an existing --out.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
) -> None:
    """Train a learned upsampler (JBU, PAC or resize-conv) by FeatUp's multi-view reconstruction."""
    from .upsamplers import train as lib

    upsampler_args = ({"guidance": guidance, "fixup": fixup, "radius": _call("train", lib.parse_radius, radius)}
                      if upsampler == "jbu" else {})
    cfg = lib.TrainConfig(
        images=[str(p) for p in images], out=str(out), backbone=backbone, upsampler=upsampler, steps=steps,
        batch_size=batch_size, lr=lr, image_sizes=_call("train", lib.parse_image_sizes, image_size),
        input_scales=_call("train", lib.parse_input_scales, input_scale), views=views,
        downsampler=downsampler, seed=seed, save_every=save_every, val=str(val) if val else None,
        weights=str(weights) if weights else None, layer=layer, upsampler_args=upsampler_args, device=device,
    )
    result = _call("train", lib.train, cfg, resume=resume, quiet=quiet, overwrite=overwrite)
    if not quiet and result["losses"]:
        val_text = f", val loss {result['val_loss']:.4f}" if result["val_loss"] is not None else ""
        print(f"train: steps {result['start']}..{result['steps']} in {result['seconds']:.0f} s, last loss "
              f"{result['losses'][-1]:.4f}{val_text}; wrote {out}", file=sys.stderr)
    _finish_training("train", result, quiet)


def _finish_training(command: str, result: dict, quiet: bool) -> None:
    """The end of a training command: say if a resumed run had nothing left to do; exit 3 if images were skipped."""
    if not quiet and result["start"] >= result["steps"]:
        print(f"{command}: already at step {result['start']} of {result['steps']}; nothing to do (raise the step "
              "count to train further)", file=sys.stderr)
    if result["skipped"]:
        print(f"{command}: {len(result['skipped'])} unreadable images were skipped (first: {result['skipped'][0]})",
              file=sys.stderr)
        raise typer.Exit(EXIT_SOME_FAILED)


FIT_EXAMPLE = """Examples:

  upcli fit-image examples/images/chelsea.png --out cat/ --size 896 --preview 1

  upcli fit-image ./imgs --out feats/ --scale 2 --save-field          # 2x each image, keep the fields

  upcli fit-image ./imgs --out feats-1k/ --size 1024 --from-fields feats/fields   # re-render, no refit
"""


@app.command("fit-image", epilog=FIT_EXAMPLE)
def fit_image(
    images: Annotated[Path, typer.Argument(help="An image, or a folder of images (scanned recursively).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: the same store as upcli upsample.")],
    backbone: Annotated[str, typer.Option(help="Backbone name (see upcli upsample --list-backbones), timm:<model>, or itpn:<checkpoint>.")] = "efficientnet-lite0",
    weights: Annotated[Optional[Path], typer.Option(help="Local backbone checkpoint.", dir_okay=False)] = None,
    layer: Annotated[Optional[str], typer.Option(help="Backbone layer to read (default: the entry's own).")] = None,
    size: Annotated[Optional[str], typer.Option(help="Shorter side of the output in pixels (any, also above the image's), or 'original'. (default: 448)", show_default=False)] = None,
    scale: Annotated[Optional[float], typer.Option(help="Output size as a multiple of the image's own, e.g. 2 (instead of --size).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimisation steps per image. (default: 200)", show_default=False)] = None,
    views: Annotated[Optional[int], typer.Option(help="Jittered views featurised per image, cached (FeatUp: 3000). (default: 48)", show_default=False)] = None,
    fit_size: Annotated[Optional[int], typer.Option(help="Shorter side of the image the views are made from. (default: 224)", show_default=False)] = None,
    base: Annotated[Optional[str], typer.Option(help="Upsampler the field starts from and corrects: bilinear, jbu, ... (default: bilinear)", show_default=False)] = None,
    colour: Annotated[bool, typer.Option("--colour/--no-colour", help="Feed the field the pixel colours too (FeatUp); off: position only, which probed better.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the views, points and initial weights.")] = 0,
    save_field: Annotated[bool, typer.Option("--save-field", help="Keep each fitted field in OUT/fields/ for re-rendering.")] = False,
    from_fields: Annotated[Optional[Path], typer.Option(help="Render the fields saved by an earlier --save-field run instead of fitting.", file_okay=False)] = None,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float16, bfloat16 or float32.")] = "float16",
    compression: Annotated[str, typer.Option(help="none, lzf or gzip.")] = "none",
    shard_size: Annotated[int, typer.Option(help="Images per shard file (1: an interruption loses one image at most).")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    num_shards: Annotated[Optional[int], typer.Option(help="Split the work into N parts (default: from RANK/WORLD_SIZE or SLURM).")] = None,
    shard_index: Annotated[Optional[int], typer.Option(help="Which part this process does, 0..N-1.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad image instead of recording it.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace another job's files in --out.")] = False,
    preview: Annotated[int, typer.Option(help="Write N preview PNGs to OUT/previews.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    log_every: Annotated[float, typer.Option(help="Seconds between progress lines when stderr is not a terminal.")] = 30.0,
) -> None:
    """Fit FeatUp's implicit upsampler to each image and write its features at any resolution (HDF5 store)."""
    from .fit_image import fit_images
    from .upsamplers.implicit import FitConfig

    options = {"steps": steps, "views": views, "fit_size": fit_size, "base": base}
    fit = FitConfig(seed=seed, colour=colour, **{k: v for k, v in options.items() if v is not None})
    result = _call(
        "fit-image", fit_images, images, out, backbone=backbone, weights=weights, layer=layer, size=size, scale=scale,
        fit=fit, save_fields=save_field, from_fields=from_fields, dtype=dtype, compression=compression,
        shard_size=shard_size, device=device, num_shards=num_shards, shard_index=shard_index, strict=strict,
        overwrite=overwrite, preview=preview, quiet=quiet, log_every=log_every,
    )
    if not quiet:
        print(f"fit-image: {result.processed} images written to {out} ({result.seconds / max(result.processed, 1):.1f} s "
              f"per image), {result.failed} failed, {result.skipped_shards} shards already done", file=sys.stderr)
        if result.failed:
            print(f"failed inputs are listed in {Path(out) / 'failures.jsonl'}", file=sys.stderr)
    raise typer.Exit(result.exit_code)


SR_EXAMPLE = """Examples:

  upcli sr ./lr --scale 2 --zero-shot --out sr/                         # ZSSR: trains on each image (minutes)

  upcli sr ./lr --scale 2 --zero-shot --init mzsr.safetensors --steps 10 --out sr/   # MZSR: 10 steps (seconds)

  upcli sr photo.png --scale 2 --zero-shot --kernel gauss:1.4 --out sr/  # LR made by a blur + direct subsampling

  upcli sr ./lr --scale 2 --init mzsr.safetensors --out sr/             # one pass of the pretrained network
"""


@app.command(epilog=SR_EXAMPLE)
def sr(
    images: Annotated[Path, typer.Argument(help="A low-resolution image, or a folder of them (scanned recursively).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: one PNG per image, mirroring the input tree.")],
    scale: Annotated[int, typer.Option(help="Upscaling factor: 2, 3 or 4.")] = 2,
    zero_shot: Annotated[bool, typer.Option("--zero-shot", help="Learn from each test image: ZSSR, or MZSR's adaptation with --init.")] = False,
    init: Annotated[Optional[Path], typer.Option(help="A network made by `upcli pretrain mzsr`.", dir_okay=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="MZSR adaptation steps per image. (default: 10)", show_default=False)] = None,
    kernel: Annotated[str, typer.Option(help="How the LR was blurred: bicubic, gauss:SIGMA, aniso:VAR1,VAR2,THETA_DEG, or a .npy/.mat file.")] = "bicubic",
    subsample: Annotated[Optional[str], typer.Option(help="bicubic or direct (default: bicubic for --kernel bicubic, else direct).", show_default=False)] = None,
    max_iters: Annotated[Optional[int], typer.Option(help="ZSSR: most training iterations per image. (default: 3000)", show_default=False)] = None,
    noise: Annotated[Optional[float], typer.Option(help="ZSSR: noise std added to the sons, for noisy real images (ZSSR: 0.0125). (default: 0)", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="ZSSR: seed of the crops and initial weights.")] = 0,
    shard_size: Annotated[int, typer.Option(help="Images per shard (1: an interruption loses one image at most).")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    num_shards: Annotated[Optional[int], typer.Option(help="Split the work into N parts (default: from RANK/WORLD_SIZE or SLURM).")] = None,
    shard_index: Annotated[Optional[int], typer.Option(help="Which part this process does, 0..N-1.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad image instead of recording it.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace another job's files in --out.")] = False,
    preview: Annotated[int, typer.Option(help="Write N side-by-side crops (bicubic | SR) to OUT/previews.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    log_every: Annotated[float, typer.Option(help="Seconds between progress lines when stderr is not a terminal.")] = 30.0,
) -> None:
    """Super-resolve images: zero-shot (ZSSR, or MZSR from a meta-learned start) or with a pretrained network."""
    from .sr.job import super_resolve_images
    from .sr.zssr import ZSSRConfig

    options = {"max_iters": max_iters, "noise_std": noise}
    zssr = ZSSRConfig(seed=seed, **{k: v for k, v in options.items() if v is not None})
    result = _call(
        "sr", super_resolve_images, images, out, scale=scale, zero_shot=zero_shot, init=init, steps=steps,
        kernel=kernel, subsample=subsample, zssr=zssr, shard_size=shard_size, device=device, num_shards=num_shards,
        shard_index=shard_index, strict=strict, overwrite=overwrite, preview=preview, quiet=quiet, log_every=log_every,
    )
    if not quiet:
        print(f"sr: {result.processed} images written to {out} ({result.seconds / max(result.processed, 1):.2f} s per image), "
              f"{result.failed} failed, {result.skipped_shards} shards already done", file=sys.stderr)
        if result.failed:
            print(f"failed inputs are listed in {Path(out) / 'failures.jsonl'}", file=sys.stderr)
    raise typer.Exit(result.exit_code)


MZSR_EXAMPLE = """Examples:

  upcli pretrain mzsr ../shared/data/sr-train --scale 2 --out mzsr-x2.safetensors      # about an hour on 2 CPU cores

  upcli pretrain mzsr ./div2k --subsample direct --pretrain-steps 100000 --meta-steps 20000 --out mzsr-d.safetensors

  upcli pretrain mzsr ./div2k --init mzsr.safetensors --pretrain-steps 0 --subsample direct --out mzsr-d.safetensors

  upcli pretrain mzsr ./div2k --out mzsr.safetensors --resume         # continue after a crash or Ctrl-C

  torchrun --nproc-per-node 4 -m upcli.cli pretrain mzsr ./div2k --out mzsr.safetensors
"""


@pretrain_app.command("mzsr", epilog=MZSR_EXAMPLE)
def pretrain_mzsr(
    images: Annotated[list[Path], typer.Argument(help="Folders of HR training images, scanned recursively.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors); training state goes beside it.", dir_okay=False)],
    scale: Annotated[int, typer.Option(help="2, 3 or 4.")] = 2,
    subsample: Annotated[str, typer.Option(help="How task LR images are made after the blur: bicubic or direct.")] = "bicubic",
    pretrain_steps: Annotated[Optional[int], typer.Option(help="Stage 1 steps, bicubic pretraining (paper: 800k). (default: 5000)", show_default=False)] = None,
    meta_steps: Annotated[Optional[int], typer.Option(help="Stage 2 steps, meta-transfer learning (paper: 100k). (default: 100)", show_default=False)] = None,
    tasks: Annotated[Optional[int], typer.Option(help="Tasks (kernels) per meta-step. (default: 5)", show_default=False)] = None,
    plain_tasks: Annotated[Optional[float], typer.Option(help="Share of tasks without blur. (default: 0.2)", show_default=False)] = None,
    meta_lr: Annotated[Optional[float], typer.Option(help="Adam learning rate of stage 2 (paper: 1e-4). (default: 0.0001)", show_default=False)] = None,
    init: Annotated[Optional[Path], typer.Option(help="Start from this network (e.g. a finished stage 1, with --pretrain-steps 0).", dir_okay=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    save_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints. (default: 200)", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="Continue from --out and its training state.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start a new run in place of an existing --out.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
) -> None:
    """Meta-train MZSR's start: bicubic pretraining, then second-order MAML over random blur kernels."""
    from .sr.mzsr import MZSRConfig, pretrain_mzsr as run

    options = {"pretrain_steps": pretrain_steps, "meta_steps": meta_steps, "tasks": tasks, "save_every": save_every,
               "plain_tasks": plain_tasks, "meta_lr": meta_lr}
    cfg = MZSRConfig(images=[str(p) for p in images], out=str(out), scale=scale, subsample=subsample, seed=seed,
                     init=str(init) if init else None, device=device, **{k: v for k, v in options.items() if v is not None})
    result = _call("pretrain mzsr", run, cfg, resume=resume, quiet=quiet, overwrite=overwrite)
    if not quiet and result["losses"]:
        print(f"pretrain mzsr: steps {result['start']}..{result['steps']} in {result['seconds']:.0f} s, last loss "
              f"{result['losses'][-1]:.4f}; wrote {out}", file=sys.stderr)
    _finish_training("pretrain mzsr", result, quiet)


ITPN_EXAMPLE = """Examples:

  upcli pretrain itpn ./photos --arch tiny --teacher efficientnet-lite0 --teacher-layer blocks.4 --steps 2000 --batch-size 16 --image-size 160 --mask-ratio 0.5 --pixel-weight 0.1 --out itpn-t.safetensors

  upcli pretrain itpn ./imagenet --arch base --epochs 400 --batch-size 64 --preview-every 1000 --out itpn-b.safetensors

  upcli pretrain itpn ./imagenet --arch base --epochs 400 --batch-size 64 --out itpn-b.safetensors --resume   # continue (the same options)

  torchrun --nproc-per-node 8 -m upcli.cli pretrain itpn ./imagenet --arch base --out itpn-b.safetensors

  upcli upsample ./imgs --backbone itpn:itpn-t.safetensors --out feats/  # its stride-4 pyramid level (--layer p4)
"""


@pretrain_app.command("itpn", epilog=ITPN_EXAMPLE)
def pretrain_itpn(
    images: Annotated[list[Path], typer.Argument(help="Folders of training images, scanned recursively.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors); training state goes beside it.", dir_okay=False)],
    arch: Annotated[str, typer.Option(help="tiny, small or base.")] = "tiny",
    steps: Annotated[Optional[int], typer.Option(help="Optimiser steps. (default: 1000, unless --epochs)", show_default=False)] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the images, instead of --steps.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step, over all processes.")] = 32,
    image_size: Annotated[int, typer.Option(help="Side of the random resized crops, a multiple of 16.")] = 224,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate, after linear warmup; cosine decay after.")] = 1e-3,
    warmup: Annotated[float, typer.Option(help="Share of the steps spent warming up.")] = 0.05,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = 0.05,
    mask_ratio: Annotated[float, typer.Option(help="Share of the 16x16 patches dropped.")] = 0.75,
    pixel_weight: Annotated[float, typer.Option(help="Weight of masked pixel reconstruction.")] = 1.0,
    feature_weight: Annotated[float, typer.Option(help="Weight of masked feature modelling (0: pixels only).")] = 1.0,
    feature_positions: Annotated[str, typer.Option(help="Where feature targets are scored: masked (the dropped patches, through the decoder) or all (each level also at its visible patches).")] = "all",
    teacher: Annotated[str, typer.Option(help="Feature targets: ema (a moving average of the network) or a backbone, e.g. efficientnet-lite0, dinov2, clip.")] = "ema",
    teacher_layer: Annotated[Optional[str], typer.Option(help="Layer of a backbone teacher. (default: its default)", show_default=False)] = None,
    teacher_weights: Annotated[Optional[Path], typer.Option(help="Local weights file of a backbone teacher.", dir_okay=False)] = None,
    ema_decay: Annotated[float, typer.Option(help="Decay of the EMA teacher.")] = 0.998,
    drop_path: Annotated[float, typer.Option(help="Stochastic depth of the attention blocks.")] = 0.0,
    workers: Annotated[Optional[int], typer.Option(help="Data-loading processes. (default: 0 when the images fit in memory; up to 8 when more than 5000 are streamed from disk)", show_default=False)] = None,
    preview_every: Annotated[int, typer.Option(help="Write a reconstruction PNG every N steps beside --out (0: never).")] = 0,
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from --out and its training state.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start a new run in place of an existing --out.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
) -> None:
    """Pretrain a hierarchical ViT (HiViT) and its feature pyramid together (iTPN): masked pixels plus masked features."""
    from .pretrain.itpn import ITPNPretrainConfig, pretrain_itpn as run

    cfg = ITPNPretrainConfig(
        images=[str(p) for p in images], out=str(out), arch=arch, steps=steps, epochs=epochs, batch_size=batch_size,
        image_size=image_size, lr=lr, warmup=warmup, weight_decay=weight_decay, mask_ratio=mask_ratio,
        pixel_weight=pixel_weight, feature_weight=feature_weight, feature_positions=feature_positions,
        teacher=teacher, teacher_layer=teacher_layer,
        teacher_weights=str(teacher_weights) if teacher_weights else None, ema_decay=ema_decay, drop_path=drop_path,
        workers=workers, preview_every=preview_every, save_every=save_every, seed=seed, device=device)
    result = _call("pretrain itpn", run, cfg, resume=resume, quiet=quiet, overwrite=overwrite)
    if not quiet and result["losses"]["pixel"]:
        last = ", ".join(f"{name} {values[-1]:.4f}" for name, values in result["losses"].items() if values)
        print(f"pretrain itpn: steps {result['start']}..{result['steps']} in {result['seconds']:.0f} s "
              f"({result['images_per_second']:.2f} images/s), last losses {last}; wrote {out}", file=sys.stderr)
    _finish_training("pretrain itpn", result, quiet)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"upcli: warning: {message}\n"


def main() -> None:
    import warnings

    warnings.formatwarning = _one_line_warning
    app()


if __name__ == "__main__":
    main()
