"""The ``upcli`` command line. Each command parses its flags and makes one library call inside ``errors(...)``.

Exit codes: 0 done; 1 error; 2 usage; 3 finished but some inputs failed; 130 interrupted.
Defaults come from the library's config objects (``upcli.configs``), which import without torch.
"""

import contextlib
import dataclasses
import functools
import inspect
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from .configs import (ADAPT_STEPS, FeatureOptions, FitConfig, ITPNPretrainConfig, JobOptions, MZSRConfig, TrainConfig, TrainingOptions,
                      ZSSRConfig, parse_arch)
from .errors import EXIT_INTERRUPTED, UpcliError
from .io.images import DEFAULT_SIZE

app = typer.Typer(
    no_args_is_help=True, add_completion=True, pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Feature upsampling, zero-shot super-resolution and pretraining for computer vision.",
)
pretrain_app = typer.Typer(no_args_is_help=True, help="Pretrain models: iTPN (hierarchical ViT + pyramid) and MZSR's meta-learned start.")
convert_app = typer.Typer(no_args_is_help=True, help="Convert other tools' checkpoints into upcli checkpoints.")
app.add_typer(pretrain_app, name="pretrain")
app.add_typer(convert_app, name="convert")


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"upcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print upcli's version and exit.")] = False) -> None:
    """Feature upsampling, zero-shot super-resolution and pretraining for computer vision."""

RESUME_JOB = "interrupted; finished results are kept, re-run the same command to resume"
RESUME_TRAINING = "interrupted; the last steps are checkpointed, add --resume to the same command to continue"


@contextlib.contextmanager
def errors(command: str, interrupted: str = RESUME_JOB):
    """Map upcli errors and interrupts to a one-line message and an exit code, in one place."""
    try:
        yield
    except UpcliError as e:
        print(f"upcli {command}: {e}", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        print(f"upcli {command}: {interrupted}", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED) from None


# ---- flags ------------------------------------------------------------------------------------------------

def flags_of(config, names: str | None = None) -> list[inspect.Parameter]:
    """The flags of ``config``'s fields made with ``upcli.configs.option`` (or only ``names``): type, default and
    help all come from the config."""
    hints = typing.get_type_hints(config)
    params = []
    for f in dataclasses.fields(config):
        if "help" in f.metadata and (names is None or f.name in names.split()):
            meta = dict(f.metadata)
            decls, argument = meta.pop("flag"), meta.pop("argument", False)
            info = typer.Argument(**meta) if argument else typer.Option(*decls, **meta)
            default = ... if f.default is dataclasses.MISSING else f.default
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[hints[f.name], info],
                                            default=default))
    return params


def with_flags(*groups):
    """Give a command the flags of each ``(config, names)`` group; it receives one dict of their values per group,
    in its first parameters, and its own flags after."""

    def decorate(command):
        own = list(inspect.signature(command, eval_str=True).parameters.values())[len(groups):]
        grouped = [flags_of(config, names) for config, names in groups]

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = [{p.name: kwargs.pop(p.name) for p in params} for params in grouped]
            return command(*values, **kwargs)

        wrapper.__signature__ = inspect.Signature(own + [p for params in grouped for p in params])
        del wrapper.__wrapped__  # typer must see the new signature, not the command's
        return wrapper

    return decorate


def _path(value: Optional[Path]) -> Optional[str]:
    return str(value) if value is not None else None


# ---- jobs: upsample, fit-image, sr -------------------------------------------------------------------------

@app.command(epilog="""Examples:

  upcli upsample ./imgs --out feats/ --backbone dinov2 --weights dinov2_vits14_pretrain.pth

  upcli upsample examples/images --out feats/ --upsampler bilateral --preview 2

  upcli upsample examples/images --out feats/ --upsampler jbu --preview 4 --compare bilinear,attention   # side by side

  upcli upsample ./imgs --out feats/ --num-shards 8 --shard-index 3   # one of 8 workers

  upcli upsample ./imgs --out feats/ --upsampler jbu --store compact   # ~300x smaller; maps rendered on read

  upcli upsample --expand feats/ --out feats-full/                     # a compact store made full

  upcli upsample --verify feats/
""")
@with_flags((JobOptions, None), (FeatureOptions, None))
def upsample(
    job: dict,
    features: dict,
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Images: files, folders (scanned recursively) and quoted glob patterns ('imgs/**/*.jpg'), any number; or --files-from.", show_default=False)] = None,
    upsampler: Annotated[str, typer.Option(help="bilinear, bilateral, jbu or pac (the checkpoint shipped for the backbone), attention (one shipped model for every backbone and layer), implicit (a field fitted to each image: slow, see fit-image), or a checkpoint PATH from upcli train (jbu, pac, resize-conv, attention).")] = "bilinear",
    sigma_spatial: Annotated[Optional[float], typer.Option(help="bilateral: spatial sigma in low-res pixels.")] = None,
    sigma_color: Annotated[Optional[float], typer.Option(help="bilateral: colour sigma on [0, 1] RGB.")] = None,
    size: Annotated[str, typer.Option(help="Shorter side of the output in pixels, or 'original'.")] = str(DEFAULT_SIZE),
    store: Annotated[str, typer.Option(help="full: the dense maps; compact: the low-res features and the image bytes, a few hundred times smaller, the maps rendered when read (FeatureStore, same calls).")] = "full",
    compare: Annotated[Optional[str], typer.Option(help="More upsamplers to show beside --upsampler in the previews, e.g. bilinear,bilateral (with --preview N; the store holds --upsampler's only).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(help="Print images, output shapes and disk use; write nothing.")] = False,
    verify: Annotated[Optional[Path], typer.Option(help="Check a finished store and rebuild its manifest.", file_okay=False)] = None,
    repair: Annotated[bool, typer.Option(help="With --verify: rebuild the manifest from job.json even where the shards are of another job.")] = False,
    expand: Annotated[Optional[Path], typer.Option(help="Render a compact store's maps into a full store at --out (resumable, like any job).", file_okay=False)] = None,
    list_backbones: Annotated[bool, typer.Option("--list-backbones", help="List backbone names and exit.")] = False,
) -> None:
    """Run a backbone over images and write features at image resolution to HDF5 shards."""
    from .upsample import upsample_command

    upsampler_args = {k: v for k, v in {"sigma_spatial": sigma_spatial, "sigma_color": sigma_color}.items() if v is not None}
    with errors("upsample"):
        code = upsample_command(inputs, JobOptions(**job), FeatureOptions(**features), list_backbones=list_backbones,
                                verify=verify, repair=repair, expand=expand, dry_run=dry_run, upsampler=upsampler,
                                upsampler_args=upsampler_args, size=size, store=store, compare=compare)
    raise typer.Exit(code)


@app.command("fit-image", epilog="""Examples:

  upcli fit-image examples/images/chelsea.png --out cat/ --size 896 --preview 1

  upcli fit-image ./imgs --out feats/ --scale 2 --save-field          # 2x each image, keep the fields

  upcli fit-image ./imgs --out feats-1k/ --size 1024 --from-fields feats/fields   # re-render, no refit
""")
@with_flags((JobOptions, None), (FeatureOptions, None), (FitConfig, None))
def fit_image(
    job: dict,
    features: dict,
    fit: dict,
    images: Annotated[Optional[list[str]], typer.Argument(help="Images: files, folders (scanned recursively) and quoted glob patterns ('imgs/**/*.jpg'), any number; or --files-from.", show_default=False)] = None,
    size: Annotated[Optional[str], typer.Option(help=f"Shorter side of the output in pixels (any, also above the image's), or 'original'. (default: {DEFAULT_SIZE})", show_default=False)] = None,
    scale: Annotated[Optional[float], typer.Option(help="Output size as a multiple of the image's own, e.g. 2 (instead of --size).")] = None,
    save_field: Annotated[bool, typer.Option("--save-field", help="Keep each fitted field in OUT/fields/ for re-rendering.")] = False,
    from_fields: Annotated[Optional[Path], typer.Option(help="Render the fields saved by an earlier --save-field run instead of fitting.", file_okay=False)] = None,
    store: Annotated[str, typer.Option(help="full: the dense maps; compact: each fitted field (in OUT/fields, as --save-field), the low-res features and the image bytes, the maps rendered when read.")] = "full",
) -> None:
    """Fit FeatUp's implicit upsampler to each image and write its features at any resolution (HDF5 store)."""
    from .fit_image import fit_images

    with errors("fit-image"):
        result = fit_images(images, JobOptions(**job), FeatureOptions(**features), FitConfig(**fit), size=size, scale=scale,
                            save_fields=save_field, from_fields=from_fields, store=store)
    raise typer.Exit(result.exit_code)


@app.command(epilog="""Examples:

  upcli sr ./lr --scale 2 --zero-shot --out sr/                         # ZSSR: trains on each image (minutes)

  upcli sr ./lr --scale 2 --zero-shot --init mzsr.safetensors --steps 10 --out sr/   # MZSR: 10 steps (seconds)

  upcli sr photo.png --scale 2 --zero-shot --kernel gauss:1.4 --out sr/  # LR made by a blur + direct subsampling

  upcli sr ./lr --scale 2 --init mzsr.safetensors --out sr/             # one pass of the pretrained network
""")
@with_flags((JobOptions, None), (ZSSRConfig, None))
def sr(
    job: dict,
    zssr: dict,
    images: Annotated[Optional[list[str]], typer.Argument(help="Low-resolution images: files, folders (scanned recursively) and quoted glob patterns, any number; or --files-from.", show_default=False)] = None,
    scale: Annotated[int, typer.Option(help="Upscaling factor: 2, 3 or 4.")] = 2,
    zero_shot: Annotated[bool, typer.Option("--zero-shot", help="Learn from each test image: ZSSR, or MZSR's adaptation with --init.")] = False,
    init: Annotated[Optional[Path], typer.Option(help="A network made by `upcli pretrain mzsr`.", dir_okay=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"MZSR adaptation steps per image. (default: {ADAPT_STEPS})", show_default=False)] = None,
    kernel: Annotated[str, typer.Option(help="How the LR was blurred: bicubic, gauss:SIGMA, aniso:VAR1,VAR2,THETA_DEG, or a .npy/.mat file.")] = "bicubic",
    subsample: Annotated[Optional[str], typer.Option(help="bicubic or direct (default: bicubic for --kernel bicubic, else direct).", show_default=False)] = None,
) -> None:
    """Super-resolve images: zero-shot (ZSSR, or MZSR from a meta-learned start) or with a pretrained network."""
    from .sr.job import super_resolve_images

    with errors("sr"):
        result = super_resolve_images(images, JobOptions(**job), scale=scale, zero_shot=zero_shot, init=_path(init),
                                      steps=steps, kernel=kernel, subsample=subsample, zssr=ZSSRConfig(**zssr))
    raise typer.Exit(result.exit_code)


# ---- training ---------------------------------------------------------------------------------------------

@app.command(epilog="""Examples:

  upcli train ./coco --backbone dinov2 --weights dinov2_vits14_pretrain.pth --out jbu-dinov2.safetensors

  upcli train ./photos ./camvid/train --image-size 112,128,96x144 --steps 1500 --out jbu.safetensors --val ./val

  upcli train ./photos ./camvid/train --image-size 112,128,96x144 --steps 3000 --out jbu.safetensors --val ./val --resume   # the same options, to 3000 steps

  torchrun --nproc-per-node 4 -m upcli.cli train ./coco --batch-size 16 --out jbu.safetensors

  upcli train ./photos --upsampler attention --layer blocks.6,blocks.2,blocks.1 --image-size 256,320 --out attention.safetensors   # one model for any backbone
""")
@with_flags((TrainingOptions, None), (TrainConfig, None))
def train(
    common: dict,
    settings: dict,
    ctx: typer.Context,
    image_size: Annotated[str, typer.Option(help="Training crop size: N, HxW, or a comma list for multi-resolution training (one is drawn per step).")] = "224",
    input_scale: Annotated[Optional[str], typer.Option(help="Feed the upsampler the features of each crop shrunk by this factor (or a comma list, one drawn per step), so that it learns the features of a sharper image; 1: FeatUp's objective. Default: 2,3,4 for attention, else 1.", show_default=False)] = None,
    guidance: Annotated[str, typer.Option(help="jbu: rgb (the pixel), conv (a 3x3 conv of the image) or features (the pixel and a projection of the features).")] = "rgb",
    fixup: Annotated[bool, typer.Option(help="jbu: FeatUp's additive kernel correction.")] = False,
    radius: Annotated[str, typer.Option(help="jbu: kernel radius of every stage (3: FeatUp's 7x7), or one per stage from the coarsest, e.g. 3,3,3,2,1 (as many as the stack's layers, log2 of the backbone's stride: 5 for efficientnet-lite0).")] = "3",
    arch: Annotated[Optional[str], typer.Option(help="attention: its architecture as KEY=VALUE pairs, e.g. kernel_size=5,heads=8 (keys: heads, head_dim, kernel_size, width, depth).", show_default=False)] = None,
) -> None:
    """Train a learned upsampler: JBU, PAC or resize-conv by FeatUp's multi-view reconstruction, attention by the scale objective."""
    from .upsamplers.train import train as run

    common = TrainingOptions(**common)
    jbu_only = {"guidance": guidance, "fixup": fixup, "radius": radius}
    if settings["upsampler"] != "jbu":  # the library refuses those given for another upsampler
        jbu_only = {k: v for k, v in jbu_only.items() if ctx.get_parameter_source(k).name == "COMMANDLINE"}  # typer vendors click
    with errors("train", RESUME_TRAINING):
        cfg = TrainConfig(**common.config(), **settings, image_sizes=image_size, input_scales=input_scale,
                          upsampler_args={**jbu_only, **parse_arch(arch)})
        result = run(cfg, **common.run())
    raise typer.Exit(result.exit_code)


@pretrain_app.command("mzsr", epilog="""Examples:

  upcli pretrain mzsr ../shared/data/sr-train --scale 2 --out mzsr-x2.safetensors      # about an hour on 2 CPU cores

  upcli pretrain mzsr ./div2k --init mzsr.safetensors --pretrain-steps 0 --subsample direct --out mzsr-d.safetensors

  torchrun --nproc-per-node 4 -m upcli.cli pretrain mzsr ./div2k --out mzsr.safetensors
""")
@with_flags((TrainingOptions, None), (MZSRConfig, None))
def pretrain_mzsr(common: dict, settings: dict) -> None:
    """Meta-train MZSR's start: bicubic pretraining, then second-order MAML over random blur kernels."""
    from .sr.mzsr import pretrain_mzsr as run

    common = TrainingOptions(**common)
    with errors("pretrain mzsr", RESUME_TRAINING):
        result = run(MZSRConfig(**common.config(), **settings), **common.run())
    raise typer.Exit(result.exit_code)


@pretrain_app.command("itpn", epilog="""Examples:

  upcli pretrain itpn ./photos --arch tiny --teacher efficientnet-lite0 --teacher-layer blocks.4 --steps 2000 --batch-size 16 --image-size 160 --mask-ratio 0.5 --pixel-weight 0.1 --out itpn-t.safetensors

  upcli pretrain itpn ./imagenet --arch base --epochs 400 --batch-size 64 --out itpn-b.safetensors --resume   # continue (the same options)

  upcli upsample ./imgs --backbone itpn:itpn-t.safetensors --out feats/  # its stride-4 pyramid level (--layer p4)
""")
@with_flags((TrainingOptions, None), (ITPNPretrainConfig, None))
def pretrain_itpn(common: dict, settings: dict) -> None:
    """Pretrain a hierarchical ViT (HiViT) and its feature pyramid together (iTPN): masked pixels plus masked features."""
    from .pretrain.itpn import pretrain_itpn as run

    common = TrainingOptions(**common)
    with errors("pretrain itpn", RESUME_TRAINING):
        result = run(ITPNPretrainConfig(**common.config(), **settings), **common.run())
    raise typer.Exit(result.exit_code)


# ---- conversion ---------------------------------------------------------------------------------------------

@convert_app.command("featup", epilog="""Example:

  upcli convert featup dinov2_jbu_stack_cocostuff.ckpt featup-dinov2.safetensors --backbone dinov2
""")
def convert_featup(
    checkpoint: Annotated[Path, typer.Argument(help="FeatUp JBU-stack checkpoint (.ckpt/.pth/.safetensors); pickles are read with weights_only=True only.", dir_okay=False, show_default=False)],
    out: Annotated[Path, typer.Argument(help="upcli checkpoint to write, e.g. featup-dinov2.safetensors", dir_okay=False, show_default=False)],
    backbone: Annotated[str, typer.Option(help="upcli backbone name the stack was trained for.")],
    layer: Annotated[Optional[str], typer.Option(help="Backbone layer (default: the backbone's default layer).")] = None,
    channel_norm: Annotated[Optional[bool], typer.Option("--channel-norm/--no-channel-norm", help="Force FeatUp's channel norm on or off (default: read from the checkpoint).", show_default=False)] = None,
) -> None:
    """Convert FeatUp's JBU stack into an upcli checkpoint for `upcli upsample --upsampler OUT`."""
    from .upsamplers.featup import convert_featup_checkpoint

    with errors("convert featup"):
        print(convert_featup_checkpoint(checkpoint, out, backbone, layer, channel_norm).summary())


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"upcli: warning: {message}\n"


def _interrupted_by_sigterm(signum, frame):
    print("upcli: interrupted by SIGTERM", file=sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED)


def main() -> None:
    import signal
    import warnings

    warnings.formatwarning = _one_line_warning
    # from the first moment: SIGTERM during start-up (imports, loading) exits 130 with a line, not 143 silently;
    # the commands' own SignalGuard turns it into Ctrl-C while they work, so that files are closed cleanly
    signal.signal(signal.SIGTERM, _interrupted_by_sigterm)
    app()


if __name__ == "__main__":
    main()
