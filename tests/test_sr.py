"""``upcli sr`` and ``upcli pretrain mzsr``: degradations against the benchmark files, ZSSR, MZSR, the job."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upcli.errors import UsageError, WeightsError
from upcli.io.images import load_rgb, scan_images
from upcli.sr.degrade import (Degradation, correlate, gaussian_kernel, imresize, load_kernel, parse_kernel,
                              random_kernel, upscale)
from upcli.sr.metrics import psnr_y, ssim_y
from upcli.sr.mzsr import MZSRConfig, adapt, loss_weights, pretrain_mzsr, step_sizes
from upcli.sr.net import SRNet, load_sr_net, mzsr_net, save_sr_net, zssr_net
from upcli.sr.zssr import ZSSRConfig, _slope_is_flat, back_project, father_crop, super_resolve, zssr
from upcli.training import train_state_path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sr"
EXAMPLES = REPO / "examples" / "images"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/sr is not here")


def read(path) -> torch.Tensor:
    return torch.from_numpy(load_rgb(path)).permute(2, 0, 1)[None].double() / 255


def photo(size=(40, 48)) -> torch.Tensor:
    rgb = read(EXAMPLES / "chelsea.png").float()
    return imresize(rgb, size=size).clamp(0, 1)


# ---- degradations ------------------------------------------------------------------------------------------

@needs_data
@pytest.mark.parametrize("scale", [2, 4])
def test_imresize_reproduces_the_stored_matlab_lr_images(scale):
    total = close = exact = 0
    for dataset in ("Set5", "Set14", "BSD100"):
        for ref in scan_images(DATA / dataset / "HR"):
            lr_name = ref.rel.replace("SRF_2_HR", f"SRF_{scale}_LR")
            lr = read(DATA / dataset / "LR_bicubic" / f"X{scale}" / lr_name)
            h, w = lr.shape[-2:]
            hr = read(ref.path)[..., : h * scale, : w * scale]
            ours = imresize(hr, 1 / scale, quantize=True)
            assert ours.shape == lr.shape, ref.rel
            diff = (ours - lr).abs().mul(255).round()
            total += diff.numel()
            close += int((diff <= 1).sum())
            exact += int((diff == 0).sum())
    assert close / total >= 0.999 and exact / total >= 0.99, (close / total, exact / total)


@needs_data
def test_direct_subsampling_reproduces_mzsr_g20_files_bit_exactly():
    kernel = load_kernel(DATA / "Set5" / "LR_mzsr_g20_direct" / "X2" / "kernel.mat")
    assert torch.allclose(kernel, gaussian_kernel(21, 2.0), atol=1e-7)  # MZSR's "g2.0": covariance 2.0 I
    degradation = Degradation(2, kernel.double(), "direct")
    names = ["baby", "bird", "butterfly", "head", "woman"]
    for i, name in enumerate(names):
        hr = read(DATA / "Set5" / "HR" / f"img_{i + 1:03d}_SRF_2_HR.png")
        lr = read(DATA / "Set5" / "LR_mzsr_g20_direct" / "X2" / f"{name}.png")
        assert torch.equal(degradation(hr, quantize=True).mul(255).round(), lr.mul(255).round()), name


def test_imresize_sizes_and_constants():
    x = torch.full((1, 3, 13, 10), 0.3)
    assert imresize(x, 2.0).shape[-2:] == (26, 20)
    assert imresize(x, 0.5).shape[-2:] == (7, 5)  # MATLAB: ceil
    assert imresize(x, size=(9, 31)).shape[-2:] == (9, 31)
    assert torch.allclose(imresize(x, 0.5), x[..., :7, :5], atol=1e-6)
    # upscaling interpolates: the LR pixel centres are kept for odd factors
    y = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    assert torch.allclose(imresize(y, 3.0)[..., 1::3, 1::3], y, atol=1e-12)


def test_gaussian_kernel_has_the_asked_covariance_and_angle():
    k = gaussian_kernel(41, 6.0, 1.5, math.radians(30)).double()
    c = torch.arange(41, dtype=torch.float64) - 20
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    cov = torch.tensor([[(k * xx * xx).sum(), (k * xx * yy).sum()], [(k * xx * yy).sum(), (k * yy * yy).sum()]])
    t = math.radians(30)
    rot = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)
    expected = rot @ torch.diag(torch.tensor([6.0, 1.5], dtype=torch.float64)) @ rot.T
    assert torch.allclose(cov, expected, atol=1e-3)
    assert abs(float(k.sum()) - 1) < 1e-6 and torch.equal(gaussian_kernel(15, 2.0), gaussian_kernel(15, 2.0).flip(0))


def test_random_kernels_follow_mzsr_sampling():
    for i in range(20):
        k = random_kernel(2, torch.Generator().manual_seed(i), size=41).double()
        c = torch.arange(41, dtype=torch.float64) - 20
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        cov = torch.tensor([[(k * xx * xx).sum(), (k * xx * yy).sum()], [(k * xx * yy).sum(), (k * yy * yy).sum()]])
        low, high = torch.linalg.eigvalsh(cov).tolist()
        assert 1 - 1e-3 <= low <= high <= 5 + 1e-3  # lambda2 ~ U[1, lambda1], lambda1 ~ U[1, 2.5 s]
    assert random_kernel(2, torch.Generator().manual_seed(0)).shape == (15, 15)


def test_kernel_files_and_specs(tmp_path):
    from scipy.io import savemat

    k = np.random.default_rng(0).random((9, 7))
    np.save(tmp_path / "k.npy", k)
    savemat(tmp_path / "k.mat", {"Kernel": k})
    for path in (tmp_path / "k.npy", tmp_path / "k.mat"):
        loaded = load_kernel(path)
        assert loaded.shape == (9, 7) and torch.allclose(loaded.double(), torch.from_numpy(k / k.sum()), atol=1e-6)
        assert torch.equal(parse_kernel(str(path)), loaded)
    np.save(tmp_path / "bad.npy", np.zeros((3, 3, 3)))
    (tmp_path / "junk.mat").write_bytes(b"not a mat file")
    (tmp_path / "empty.npy").write_bytes(b"")
    for bad in ("bad.npy", "junk.mat", "missing.npy", "empty.npy"):
        with pytest.raises(UsageError, match="kernel file"):
            load_kernel(tmp_path / bad)
    assert parse_kernel("bicubic") is None
    assert torch.allclose(parse_kernel("gauss:1.5"), gaussian_kernel(15, 2.25))
    assert torch.allclose(parse_kernel("aniso:4,1,90"), gaussian_kernel(17, 1.0, 4.0), atol=1e-6)
    for bad in ("gauss:-1", "gauss:x", "box:3", "aniso:1,2", "gauss:1e200", "gauss:26", "aniso:1,1e9,0", "aniso:1,2,inf"):
        with pytest.raises(UsageError, match="--kernel"):
            parse_kernel(bad)


def test_direct_subsampling_takes_every_sth_pixel_and_correlates_without_flip():
    x = torch.rand(1, 3, 12, 10, dtype=torch.float64)
    delta = torch.zeros(5, 5, dtype=torch.float64)
    delta[2, 2] = 1
    assert torch.equal(Degradation(3, delta, "direct")(x), x[..., ::3, ::3])
    shift = torch.zeros(3, 3, dtype=torch.float64)
    shift[1, 2] = 1  # correlation reads the right neighbour
    assert torch.equal(correlate(x, shift)[..., :-1], x[..., 1:])
    assert not Degradation(2, delta, "direct").symmetric and Degradation(2).symmetric
    assert not Degradation(2, gaussian_kernel(15, 3.0, 1.0, 0.3), "bicubic").symmetric
    with pytest.raises(UsageError, match="scale"):
        Degradation(5)


# ---- metrics -----------------------------------------------------------------------------------------------

def test_psnr_and_ssim():
    hr = photo()
    assert psnr_y(hr, hr, 2) == float("inf") and ssim_y(hr, hr, 2) == pytest.approx(1.0)
    noisy = (hr + 0.02 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert 25 < psnr_y(noisy, hr, 2) < 40 and 0.5 < ssim_y(noisy, hr, 2) < 1


@needs_data
def test_bicubic_baseline_matches_the_published_set5_figure():
    from examples.sr_benchmark import main

    result = main(["--hr-dir", str(DATA / "Set5" / "HR"), "--methods", "bicubic"])
    assert abs(result["bicubic"]["psnr"] - 33.64) < 0.1 and abs(result["bicubic"]["ssim"] - 0.9293) < 0.003


@needs_data
def test_benchmark_resumes_from_its_json(tmp_path, capsys):
    from examples.sr_benchmark import main

    out = tmp_path / "bench.json"
    args = ["--hr-dir", str(DATA / "Set5" / "HR"), "--methods", "bicubic", "--json", str(out)]
    first = main([*args, "--limit", "2"])
    assert json.loads(out.read_text())["bicubic"]["images"] == 2
    capsys.readouterr()
    whole = main([*args, "--resume"])
    assert "2 already in" in capsys.readouterr().err
    assert whole["bicubic"]["images"] == 5
    for image, record in first["bicubic"]["per_image"].items():
        assert whole["bicubic"]["per_image"][image] == record
    assert whole["bicubic"]["psnr"] == pytest.approx(main(args)["bicubic"]["psnr"])
    with pytest.raises(SystemExit, match="other settings \\(scale\\)"):
        main([*args, "--scale", "3", "--resume"])


# ---- ZSSR --------------------------------------------------------------------------------------------------

def test_father_crops_have_the_size_and_stay_in_range():
    image = photo((40, 60))
    cfg = ZSSRConfig()
    for i in range(40):
        crop = father_crop(image, (24, 32), torch.Generator().manual_seed(i), cfg, rotate=i % 2 == 0)
        assert crop.shape == (1, 3, 24, 32) and 0 <= crop.min() and crop.max() <= 1


def test_learning_rate_policy_sees_a_falling_line():
    falling = [(i * 50, 1.0 - 0.1 * i) for i in range(5)]
    flat = [(i * 50, 0.5 + 0.01 * (-1) ** i) for i in range(5)]
    assert not _slope_is_flat(falling, 1.5) and _slope_is_flat(flat, 1.5)


def test_zssr_steps_lower_the_loss_and_give_the_output_size():
    lr = photo((32, 40))
    result = zssr(lr, Degradation(2), ZSSRConfig(crop=24, max_iters=40, test_every=10, policy_every=20, min_iters=20))
    assert result.sr.shape == (1, 3, 64, 80) and 0 <= result.sr.min() and result.sr.max() <= 1
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10])
    assert len(result.reconstruction) == 4


def test_ensemble_of_a_zero_network_is_bicubic_and_back_projection_fits_the_input():
    net = zssr_net()
    for conv in net.body:
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.zeros_(conv.weight)
    lr = photo((20, 28))
    degradation = Degradation(2)
    plain = super_resolve(net, lr, degradation)
    assert torch.allclose(plain, upscale(lr, (40, 56)).clamp(0, 1))
    assert torch.allclose(super_resolve(net, lr, degradation, ensemble=True), plain, atol=1e-5)
    before = (degradation(plain) - lr).abs().mean()
    after = (degradation(back_project(plain, lr, degradation, 5)) - lr).abs().mean()
    assert after < 0.5 * before


def test_tiled_inference_equals_one_pass():
    from upcli.sr.zssr import run_tiled

    torch.manual_seed(0)
    net = mzsr_net().eval()
    x = torch.rand(1, 3, 37, 50)
    with torch.no_grad():
        assert torch.allclose(run_tiled(net, x, tile=16), net(x), atol=1e-5)


# ---- MZSR --------------------------------------------------------------------------------------------------

def test_adaptation_steps_lower_the_son_loss():
    torch.manual_seed(0)
    net = mzsr_net()
    lr = photo((32, 32))
    adapted, losses = adapt(net, lr, Degradation(2, gaussian_kernel(15, 2.0), "direct"), 5)
    assert losses[-1] < losses[0] and adapted is not net
    unchanged, none = adapt(net, lr, Degradation(2, None, "bicubic"), 0)  # --steps 0: the start as it is
    assert none == [] and all(torch.equal(a, b) for a, b in zip(unchanged.state_dict().values(), net.state_dict().values()))
    assert step_sizes("direct", 6) == [2e-2, 1e-2, 1e-2, 1e-2, 5e-3, 5e-3] and step_sizes("bicubic", 4)[-1] == 1e-3


@pytest.mark.parametrize("option, message", [
    ({"plain_tasks": 2.0}, "--plain-tasks is a share of the tasks, between 0 and 1"),
    ({"meta_lr": 0.0}, "must be positive"),
])
def test_pretrain_config_refuses_impossible_values(option, message):
    with pytest.raises(UsageError, match=message):
        MZSRConfig(images=[], out="x", **option).check()


def test_loss_weights_anneal_to_the_last_step():
    cfg = MZSRConfig(images=[], out="x", anneal_steps=50)
    assert loss_weights(cfg, 0) == pytest.approx([0.2] * 5)
    assert loss_weights(cfg, 50) == pytest.approx([0.006] * 4 + [0.976])
    assert sum(loss_weights(cfg, 20)) == pytest.approx(1)
    assert loss_weights(MZSRConfig(images=[], out="x"), 500) == pytest.approx([0.2] * 5)  # the default: equal


def training_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(["chelsea.png", "coffee.png"]):
        Image.fromarray(load_rgb(EXAMPLES / name)[::6, ::6]).save(root / f"t{i}.png")
    return root


def tiny(root: Path, out: Path, **kw) -> MZSRConfig:
    base = dict(images=[str(root)], out=str(out), pretrain_steps=3, meta_steps=2, pretrain_batch=2, pretrain_patch=16,
                tasks=2, task_batch=2, task_patch=16, inner_steps=2, kernel_size=7, save_every=100, device="cpu")
    return MZSRConfig(**{**base, **kw})


def test_pretrain_checkpoint_round_trip_and_resume_equals_one_run(tmp_path):
    root = training_folder(tmp_path / "train")
    straight = tiny(root, tmp_path / "straight.safetensors")
    result = pretrain_mzsr(straight, quiet=True)
    assert len(result.losses) == 5 and all(math.isfinite(v) for v in result.losses)
    net, meta = load_sr_net(straight.out)
    assert meta["scale"] == 2 and meta["pretrain_steps"] == 3 and meta["meta_steps"] == 2
    assert sum(p.numel() for p in mzsr_net().parameters()) == 225_091

    # stop inside stage 2 (after the stage switch), then resume: the same weights as one run
    first = tiny(root, tmp_path / "split.safetensors", meta_steps=1)
    pretrain_mzsr(first, quiet=True)
    pretrain_mzsr(tiny(root, tmp_path / "split.safetensors"), resume=True, quiet=True)
    resumed, _ = load_sr_net(tmp_path / "split.safetensors")
    for (name, a), b in zip(net.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    # and stopped inside stage 1
    pretrain_mzsr(tiny(root, tmp_path / "s1.safetensors", pretrain_steps=3, meta_steps=0, save_every=2), quiet=True)
    train_state_path(tmp_path / "s1.safetensors")  # exists
    with pytest.raises(UsageError, match="other settings"):
        pretrain_mzsr(tiny(root, tmp_path / "s1.safetensors", tasks=3), resume=True, quiet=True)


def test_meta_step_gradients_reach_every_weight(tmp_path):
    from upcli.io.pool import ImagePool
    from upcli.sr.mzsr import task_batch, task_loss

    root = training_folder(tmp_path / "train")
    cfg = tiny(root, tmp_path / "x.safetensors")
    net = mzsr_net()
    support, query = task_batch(ImagePool([str(root)]), cfg, 0, 0, "cpu")
    task_loss(net, support, query, cfg, loss_weights(cfg, 0)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_load_sr_net_refuses_other_checkpoints(tmp_path):
    from upcli.checkpoints import save_checkpoint

    save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(1)}, {"kind": "upsampler"})
    with pytest.raises(WeightsError, match="not an SR network"):
        load_sr_net(tmp_path / "other.safetensors")
    save_sr_net(tmp_path / "small.safetensors", SRNet(depth=3, width=8), {"scale": 2})
    net, _ = load_sr_net(tmp_path / "small.safetensors")
    assert net.config["depth"] == 3


# ---- the command -------------------------------------------------------------------------------------------

def sr_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    Image.fromarray(load_rgb(EXAMPLES / "chelsea.png")[::12, ::12]).save(root / "cat.png")
    Image.fromarray(load_rgb(EXAMPLES / "coffee.png")[::14, ::13]).save(root / "sub" / "coffee.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root




def test_sr_command_writes_pngs_records_a_corrupt_image_and_resumes(cli, tmp_path):
    images = sr_folder(tmp_path / "lr")
    ckpt = tmp_path / "mzsr.safetensors"
    save_sr_net(ckpt, mzsr_net(), {"scale": 2, "subsample": "bicubic"})
    out = tmp_path / "out"
    run = cli("sr", images, "--zero-shot", "--init", ckpt, "--steps", "2", "--out", out, "--preview", "2", "--device", "cpu")
    assert run.returncode == 3, run.stderr
    cat, coffee = load_rgb(images / "cat.png"), load_rgb(images / "sub" / "coffee.jpg")
    assert load_rgb(out / "cat.png").shape == (cat.shape[0] * 2, cat.shape[1] * 2, 3)
    assert load_rgb(out / "sub" / "coffee.png").shape == (coffee.shape[0] * 2, coffee.shape[1] * 2, 3)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["source"] for f in failures] == ["broken.png"]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in manifest) == ["cat.png", "sub/coffee.png"]
    assert len(list((out / "previews").glob("*.png"))) == 1

    (out / "cat.png").unlink()  # a lost output is redone, the rest is skipped
    before = (out / "sub" / "coffee.png").stat().st_mtime_ns
    again = cli("sr", images, "--zero-shot", "--init", ckpt, "--steps", "2", "--out", out, "--device", "cpu")
    assert again.returncode == 3 and "2 of 3 shards already complete" in again.stderr
    assert (out / "cat.png").is_file() and (out / "sub" / "coffee.png").stat().st_mtime_ns == before

    other = cli("sr", images, "--zero-shot", "--init", ckpt, "--steps", "3", "--out", out, "--device", "cpu")
    assert other.returncode == 1 and "another job" in other.stderr


def test_zssr_from_python_on_one_image(tmp_path):
    from upcli.configs import JobOptions
    from upcli.sr.job import super_resolve_images

    images = sr_folder(tmp_path / "lr")
    result = super_resolve_images(images / "cat.png", JobOptions(tmp_path / "out", quiet=True, workers=0, device="cpu"),
                                  zero_shot=True, kernel="gauss:1.2", zssr=ZSSRConfig(max_iters=5, crop=16))
    assert result.exit_code == 0 and result.processed == 1
    record = json.loads((tmp_path / "out" / "shard-00000.json").read_text())
    assert record["images"][0]["method"] == "zssr" and record["images"][0]["iterations"] == 5
    from upcli.io.store import verify_store

    report = verify_store(tmp_path / "out")  # an image store: PNG shards, not HDF5
    assert report["problems"] == [] and report["stored"] == 1 and report["complete_shards"] == 1
    png = tmp_path / "out" / "cat.png"
    whole = png.read_bytes()
    png.write_bytes(whole[: len(whole) // 2])  # truncated: still there, no longer the recorded PNG
    assert verify_store(tmp_path / "out")["problems"] == ["shard-00000.json: incomplete or unreadable"]
    again = super_resolve_images(images / "cat.png", JobOptions(tmp_path / "out", quiet=True, workers=0, device="cpu"),
                                 zero_shot=True, kernel="gauss:1.2", zssr=ZSSRConfig(max_iters=5, crop=16))
    assert again.processed == 1 and png.read_bytes() == whole  # made again, bit-exact
    assert verify_store(tmp_path / "out")["problems"] == []
    png.unlink()
    assert verify_store(tmp_path / "out")["problems"] == ["shard-00000.json: incomplete or unreadable"]


@pytest.mark.parametrize("args, message, code", [
    (["--scale", "2"], "give --init", 2),
    (["--zero-shot", "--scale", "5"], "--scale must be 2, 3 or 4", 2),
    (["--zero-shot", "--kernel", "box"], "--kernel 'box'", 2),
    (["--zero-shot", "--subsample", "nearest"], "subsampling must be one of", 2),
    (["--zero-shot", "--init", "missing.safetensors"], "does not exist", 1),
    (["--zero-shot", "--init", "x.safetensors"], "not a safetensors checkpoint", 1),
    (["--steps", "3", "--init", "x.safetensors"], "needs --zero-shot", 2),
    (["--zero-shot", "--steps", "3"], "needs --init CKPT", 2),
    (["--zero-shot", "--max-iters", "-5"], "--max-iters must be at least 1", 2),
    (["--zero-shot", "--noise", "-1"], "--noise must be 0 or more", 2),
])
def test_sr_bad_options_fail_in_one_line(cli, tmp_path, monkeypatch, args, message, code):
    images = sr_folder(tmp_path / "lr")
    (tmp_path / "x.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    run = cli("sr", images, "--out", tmp_path / "out", *args)
    assert run.returncode == code and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "out" / "cat.png").exists()


def test_inputs_that_differ_only_in_suffix_get_outputs_apart(tmp_path):
    from upcli.configs import JobOptions
    from upcli.sr.job import super_resolve_images

    images = tmp_path / "lr"
    images.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(images / "a.png")
    Image.fromarray(rgb[::-1].copy()).save(images / "a.bmp")
    Image.fromarray(rgb).save(images / "b.png")
    result = super_resolve_images(images, JobOptions(tmp_path / "out", quiet=True, workers=0, device="cpu"),
                                  zero_shot=True, zssr=ZSSRConfig(max_iters=1, crop=16))
    assert result.exit_code == 0 and result.processed == 3
    out = tmp_path / "out"
    manifest = {r["source"]: r["key"] for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert manifest == {"a.bmp": "a.bmp.png", "a.png": "a.png.png", "b.png": "b.png"}
    assert all((out / key).is_file() for key in manifest.values())


def test_sr_refuses_to_overwrite_its_inputs(cli, tmp_path):
    images = sr_folder(tmp_path / "lr")
    run = cli("sr", images, "--out", images, "--zero-shot", "--max-iters", "1")
    assert run.returncode == 2 and "would overwrite the input broken.png" in run.stderr, run.stderr
    assert not (images / "job.json").exists()


def test_pretrain_mzsr_command_trains_and_resumes(cli, tmp_path):
    root = training_folder(tmp_path / "train")
    out = tmp_path / "m.safetensors"
    common = ["pretrain", "mzsr", root, "--out", out, "--pretrain-steps", "2", "--tasks", "1", "--device", "cpu"]
    run = cli(*common, "--meta-steps", "0", "--save-every", "1")
    assert run.returncode == 0 and out.is_file(), run.stderr
    again = cli(*common, "--meta-steps", "0")
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr
    done = cli(*common, "--meta-steps", "0", "--resume")
    assert done.returncode == 0 and "already at step 2 of 2" in done.stderr, done.stderr
    (tmp_path / "file").write_text("")
    unwritable = cli(*common[:3], "--out", tmp_path / "file" / "m.safetensors", *common[5:], "--meta-steps", "0")
    assert unwritable.returncode == 2 and "is a file, not a folder" in unwritable.stderr, unwritable.stderr
    missing = cli("pretrain", "mzsr", root, "--out", tmp_path / "none.safetensors", "--resume", "--device", "cpu")
    assert missing.returncode == 2 and "no checkpoint to resume" in missing.stderr
    bad = cli("pretrain", "mzsr", tmp_path / "empty", "--out", tmp_path / "e.safetensors")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_pretrain_under_torchrun_matches_one_process(tmp_path, torchrun, plain_sgd):
    root = training_folder(tmp_path / "train")
    script = tmp_path / "run.py"
    script.write_text(
        plain_sgd +  # Adam becomes plain SGD at the same lr: see conftest.PLAIN_SGD
        "import sys, json\n"
        "from upcli.sr.mzsr import MZSRConfig, pretrain_mzsr\n"
        f"cfg = MZSRConfig(images=[{str(root)!r}], out=sys.argv[1], pretrain_steps=2, meta_steps=2, pretrain_batch=2,\n"
        "                 pretrain_patch=16, tasks=2, task_batch=2, task_patch=16, inner_steps=2, kernel_size=7, device='cpu',\n"
        "                 pretrain_lr=1e-3, meta_lr=1e-3)\n"
        "result = pretrain_mzsr(cfg, quiet=True)\n"
        "open(sys.argv[1] + '.json', 'w').write(json.dumps(result.losses))\n")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.safetensors")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(script, tmp_path / "two.safetensors", env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    losses_one = json.loads((tmp_path / "one.safetensors.json").read_text())
    losses_two = json.loads((tmp_path / "two.safetensors.json").read_text())
    assert losses_one == pytest.approx(losses_two, rel=1e-4)  # stage 1 (DDP) and stage 2 (tasks split) alike
    a, b = load_sr_net(tmp_path / "one.safetensors")[0], load_sr_net(tmp_path / "two.safetensors")[0]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)


def test_piped_zssr_logs_timestamped_iterations_every_log_every(cli, tmp_path):
    import re

    image = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(image)
    run = cli("sr", image, "--zero-shot", "--max-iters", "5", "--log-every", "0", "--out", tmp_path / "o",
                  "--device", "cpu")
    assert run.returncode == 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines), run.stderr
    steps = [line.split(" ", 2)[2] for line in lines if "iterations" in line]
    assert steps == [f"sr: small.png: {i}/5 iterations" for i in range(1, 6)], run.stderr


def test_pretrain_mzsr_logs_a_timestamped_line_every_log_every(tmp_path, capsys):
    import re

    root = training_folder(tmp_path / "train")
    pretrain_mzsr(tiny(root, tmp_path / "m.safetensors"), log_every=0)
    lines = capsys.readouterr().err.strip().splitlines()
    steps = [line for line in lines if "/5 steps" in line]
    assert len(steps) == 5 and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d pretrain mzsr: ", line) for line in steps)
