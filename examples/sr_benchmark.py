"""The standard SR evaluation: PSNR/SSIM on Y (``scale`` px shaved) of bicubic, ZSSR and MZSR on any HR folder.

The LR inputs are made here from the HR images, for the kernel setting asked for:

    bicubic   MATLAB bicubic (reproduces the stored benchmark LR files)
    gd0.2     isotropic Gaussian, variance 0.2, direct subsampling (MZSR's g^d_0.2: severe aliasing)
    gd2.0     isotropic Gaussian, variance 2.0, direct subsampling (MZSR's g^d_2.0, bit-exact to its test files)
    gdani     anisotropic Gaussian, variances 4 and 1, angle -45 degrees, direct subsampling (MZSR's g^d_ani;
              parameters from memory, not verified)
    gb1.3     isotropic Gaussian, variance 1.3, then bicubic subsampling (MZSR's g^b_1.3)
    or any ``upcli sr --kernel`` spec (gauss:SIGMA, aniso:VAR1,VAR2,THETA, a .npy/.mat file) with --subsample

Methods: bicubic, zssr, mzsr1, mzsr10 (MZSR with 1 or 10 steps; any mzsrN), feedforward (``--init`` alone).

    python examples/sr_benchmark.py --hr-dir ../shared/data/sr/Set5/HR --scale 2 --methods bicubic,zssr
    python examples/sr_benchmark.py --hr-dir ../shared/data/sr/BSD100/HR --kernel gd2.0 \\
        --methods bicubic,mzsr1,mzsr10 --init mzsr-direct.safetensors --json bsd100-gd20.json
    python examples/sr_benchmark.py --hr-dir ../shared/data/sr/BSD100/HR --methods zssr --json bsd100-zssr.json \\
        --resume                                   # hours: stop it at any time, run it again to go on
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from upcli.io.images import load_rgb, scan_images
from upcli.sr.degrade import Degradation, gaussian_kernel, parse_kernel
from upcli.sr.methods import create_sr_method
from upcli.sr.metrics import psnr_y, ssim_y
from upcli.sr.net import SRNet
from upcli.sr.zssr import ZSSRConfig

NAMED_KERNELS = {  # name: (variance 1, variance 2, angle in degrees, subsampling)
    "gd0.2": (0.2, 0.2, 0.0, "direct"),
    "gd2.0": (2.0, 2.0, 0.0, "direct"),
    "gdani": (4.0, 1.0, -45.0, "direct"),
    "gb1.3": (1.3, 1.3, 0.0, "bicubic"),
}


def degradation_for(kernel: str, scale: int, subsample: str | None) -> Degradation:
    if kernel in NAMED_KERNELS:
        v1, v2, theta, sub = NAMED_KERNELS[kernel]
        return Degradation(scale, gaussian_kernel(21, v1, v2, math.radians(theta)), subsample or sub)
    blur = parse_kernel(kernel)
    return Degradation(scale, blur, subsample or ("bicubic" if blur is None else "direct"))


def make_method(name: str, args):
    if name.startswith("mzsr"):
        return create_sr_method("mzsr", init=args.init, steps=int(name[4:] or 10))
    if name == "zssr":
        return create_sr_method("zssr", config=ZSSRConfig(max_iters=args.zssr_iters, seed=args.seed))
    return create_sr_method(name, init=args.init) if name == "feedforward" else create_sr_method(name)


def label(name: str) -> str:
    return f"MZSR({name[4:] or 10})" if name.startswith("mzsr") else {"zssr": "ZSSR", "bicubic": "Bicubic"}.get(name, name)


def warm_up() -> None:
    """One untimed training step and pass of a small SR network, so that the process's one-off start-up (thread
    pool, kernel set-up) is not charged to the first image of whichever method runs first."""
    net = SRNet()
    x = torch.rand(1, 3, 64, 64)
    net(x).mean().backward()
    with torch.no_grad():
        net(torch.rand(1, 3, 128, 128))


def summarise(records: dict) -> dict:
    """Means over the images of each method, and the per-image ``[psnr, ssim, seconds]``."""
    summary = {}
    for name, per_image in records.items():
        values = np.array(list(per_image.values()), dtype=float).reshape(-1, 3)
        summary[name] = {"psnr": float(values[:, 0].mean()), "ssim": float(values[:, 1].mean()),
                         "seconds_per_image": float(values[:, 2].mean()), "images": len(per_image),
                         "per_image": per_image}
    return summary


def write_results(path: str, settings: dict, summary: dict) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"settings": {**settings, "threads": torch.get_num_threads()}, **summary}, indent=1) + "\n")
    tmp.replace(path)


def load_finished(path: str | None, settings: dict, names: list[str]) -> dict:
    """``{image: {method: [psnr, ssim, seconds]}}`` of the images that ``path`` (an earlier run's --json, same
    settings) has for every method in ``names``."""
    if path is None or not Path(path).is_file():
        return {}
    saved = json.loads(Path(path).read_text())
    theirs = {k: v for k, v in saved.get("settings", {}).items() if k != "threads"}
    if theirs != settings:
        sys.exit(f"--resume: {path} was made with other settings "
                 f"({', '.join(k for k in {**settings, **theirs} if settings.get(k) != theirs.get(k))})")
    common = set.intersection(*(set(saved.get(n, {}).get("per_image", {})) for n in names))
    return {image: {n: saved[n]["per_image"][image] for n in names} for image in common}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hr-dir", required=True, help="folder of HR images")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--kernel", default="bicubic", help="bicubic, gd0.2, gd2.0, gdani, gb1.3, or an upcli sr --kernel spec")
    parser.add_argument("--subsample", choices=("bicubic", "direct"), help="override the setting's subsampling")
    parser.add_argument("--methods", default="bicubic,zssr,mzsr1,mzsr10")
    parser.add_argument("--init", help="MZSR / feed-forward network (upcli pretrain mzsr)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--zssr-iters", type=int, default=ZSSRConfig.max_iters, help="ZSSR's most iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here (after every image)")
    parser.add_argument("--resume", action="store_true", help="skip the images that --json already has")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    degradation = degradation_for(args.kernel, args.scale, args.subsample)
    refs = scan_images(args.hr_dir)[: args.limit]
    if not refs:
        sys.exit(f"no images in {args.hr_dir}")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = {"hr_dir": str(args.hr_dir), "scale": args.scale, "kernel": args.kernel,
                "subsample": degradation.subsample, "init": args.init, "zssr_iters": args.zssr_iters, "seed": args.seed}
    done = load_finished(args.json, settings, names) if args.resume else {}
    methods = {name: make_method(name, args) for name in names}
    records = {name: {} for name in names}  # name: {image: [psnr, ssim, seconds]}
    dataset = Path(args.hr_dir).parent.name if Path(args.hr_dir).name.upper() == "HR" else Path(args.hr_dir).name
    print(f"{dataset}: {len(refs)} images, {degradation.describe()}, kernel {args.kernel}"
          + (f"; {len(done)} already in {args.json}" if done else ""), file=sys.stderr)
    warm_up()
    for ref in refs:
        if ref.rel in done:
            for name in names:
                records[name][ref.rel] = done[ref.rel][name]
            continue
        hr = torch.from_numpy(load_rgb(ref.path)).permute(2, 0, 1)[None].float() / 255
        h, w = hr.shape[-2:]
        hr = hr[..., : h - h % args.scale, : w - w % args.scale]  # mod-crop
        lr = degradation(hr, quantize=True)
        for name, method in methods.items():
            start = time.perf_counter()
            sr, _ = method(lr, degradation)
            seconds = time.perf_counter() - start
            sr = sr[..., : hr.shape[-2], : hr.shape[-1]]
            p, s = psnr_y(sr, hr, args.scale), ssim_y(sr, hr, args.scale)
            records[name][ref.rel] = [round(p, 4), round(s, 5), round(seconds, 3)]
            print(f"  {ref.rel:30s} {label(name):10s} {p:6.2f} dB  {s:.4f}  {seconds:7.2f} s", file=sys.stderr, flush=True)
        if args.json:  # after every image: a run that is stopped loses one image at most (--resume)
            write_results(args.json, settings, summarise(records))

    summary = summarise(records)
    header = "| Kernel | Dataset | " + " | ".join(label(n) for n in names) + " |"
    print(f"\nx{args.scale}, PSNR/SSIM on Y ({args.scale} px shaved), {len(refs)} images\n")
    print(header)
    print("|" + "---|" * (len(names) + 2))
    print(f"| {args.kernel} | {dataset} | " + " | ".join(f"{summary[n]['psnr']:.2f}/{summary[n]['ssim']:.4f}" for n in names) + " |")
    print("| s/image | | " + " | ".join(f"{summary[n]['seconds_per_image']:.2f}" for n in names) + " |")
    if args.json:
        write_results(args.json, settings, summary)
    return summary


if __name__ == "__main__":
    main()
