"""``upcli train``: the loop, checkpoints and resume, DDP against one process, the CLI."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from upcli.checkpoints import read_config
from upcli.errors import UsageError
import upcli.upsamplers.train as train_module
from upcli.configs import parse_image_sizes, parse_input_scales, parse_radius
from upcli.upsamplers import create_upsampler
from upcli.upsamplers.train import (TrainConfig,
                                    shrink, train, train_state_path)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def config(tmp_path, name="jbu.safetensors", **kw):
    base = dict(images=[str(EXAMPLES)], out=str(tmp_path / name), steps=4, batch_size=2,
                image_sizes=[(64, 64), (48, 80)], views=1, save_every=2, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_short_run_lowers_the_held_out_loss(tmp_path):
    sizes = [(96, 96), (64, 96)]
    cfg = config(tmp_path, steps=1, save_every=1, val=str(EXAMPLES), val_images=4, image_sizes=sizes)
    first = train(cfg, quiet=True).val_loss
    cfg = config(tmp_path, name="long.safetensors", steps=25, save_every=25, val=str(EXAMPLES), val_images=4,
                 image_sizes=sizes)
    result = train(cfg, quiet=True)
    assert result.val_loss < first - 0.05, (first, result.val_loss)
    config_ = read_config(cfg.out)
    assert config_["upsampler"] == "jbu" and config_["backbone"] == "efficientnet-lite0" and config_["dim"] == 320
    assert config_["training"]["step"] == 25
    best = read_config(tmp_path / "long.best.safetensors")["training"]
    assert best["val_loss"] <= result.val_loss + 1e-12


def test_resume_reproduces_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = config(tmp_path, name="a.safetensors", save_every=4)
    train(straight, quiet=True)
    split = config(tmp_path, name="b.safetensors", save_every=4)
    real_make_batch = train_module.make_batch

    def interrupted_at_step_2(pool, cfg, step, *args, **kw):
        if step == 2:
            raise KeyboardInterrupt  # as Ctrl-C or SIGTERM: checkpoints the 2 finished steps
        return real_make_batch(pool, cfg, step, *args, **kw)

    monkeypatch.setattr(train_module, "make_batch", interrupted_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(split, quiet=True)
    assert read_config(split.out)["training"] == {"step": 2, "interrupted": True}
    monkeypatch.setattr(train_module, "make_batch", real_make_batch)
    result = train(split, resume=True, quiet=True)
    assert result.start == 2 and len(result.losses) == 2
    a, b = load_file(straight.out), load_file(split.out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa, sb = load_file(train_state_path(straight.out)), load_file(train_state_path(split.out))
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_resume_refuses_other_settings_and_missing_state(tmp_path):
    cfg = config(tmp_path, steps=2)
    with pytest.raises(UsageError, match="no checkpoint to resume"):
        train(cfg, resume=True, quiet=True)
    train(cfg, quiet=True)
    with pytest.raises(UsageError, match="already exists; add --resume .* or --overwrite"):
        train(cfg, quiet=True)
    with pytest.raises(UsageError, match="not both"):
        train(cfg, resume=True, overwrite=True, quiet=True)
    assert train(cfg, resume=True, quiet=True).start == 2  # done already: nothing to train
    from upcli.checkpoints import load_checkpoint, save_checkpoint

    tensors, saved = load_checkpoint(cfg.out)  # as if killed between writing the checkpoint and its state
    save_checkpoint(cfg.out, tensors, {**saved, "training": {"step": 1}})
    with pytest.raises(UsageError, match="at step 1 but jbu.train.safetensors at step 2; the run was killed while saving"):
        train(cfg, resume=True, quiet=True)
    cfg.steps, cfg.lr = 4, 5e-4
    with pytest.raises(UsageError, match="other settings \\(lr\\)"):
        train(cfg, resume=True, quiet=True)
    assert train(cfg, overwrite=True, quiet=True).start == 0


def test_out_is_checked_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="file is a file, not a folder"):
        train(config(tmp_path, name="file/jbu.safetensors"), quiet=True)
    with pytest.raises(UsageError, match="cannot write to .*file/deeper"):
        train(config(tmp_path, name="file/deeper/jbu.safetensors"), quiet=True)
    with pytest.raises(UsageError, match="is a folder"):
        train(config(tmp_path, name=""), quiet=True)
    deep = config(tmp_path, name="new/dir/jbu.safetensors", steps=1, save_every=1, image_sizes=[(64, 64)])
    train(deep, quiet=True)
    assert Path(deep.out).is_file() and not list(Path(deep.out).parent.glob(".upcli-write-test-*"))


def test_parse_image_sizes():
    assert parse_image_sizes("224") == [(224, 224)]
    assert parse_image_sizes("112, 96x144") == [(112, 112), (96, 144)]
    for bad in ("", "abc", "8", "1x2x3"):
        with pytest.raises(UsageError):
            parse_image_sizes(bad)


def test_parse_radius():
    assert parse_radius("3") == 3 and parse_radius("3, 3,2,1,1") == [3, 3, 2, 1, 1]
    for bad in ("", "a", "-1", "8", "3,,2"):
        with pytest.raises(UsageError):
            parse_radius(bad)


def test_parse_input_scales_and_shrink():
    assert parse_input_scales("2") == [2.0] and parse_input_scales("1.5, 2,3") == [1.5, 2.0, 3.0]
    for bad in ("", "two", "0.5", "2,,3"):
        with pytest.raises(UsageError):
            parse_input_scales(bad)
    images = torch.rand(2, 3, 96, 130)
    assert shrink(images, 1.0) is images
    small = shrink(images, 2.0)
    assert small.shape == (2, 3, 48, 65) and 0 <= small.min() and small.max() <= 1
    assert torch.allclose(small.mean((2, 3)), images.mean((2, 3)), atol=1e-2)  # a resize, not a crop
    assert shrink(images, 16.0).shape[-2:] == (16, 16)  # at least 16 px a side


def test_input_scale_feeds_the_upsampler_a_smaller_image(tmp_path, monkeypatch):
    """With --input-scale 2 the backbone sees each crop at half size for the upsampler's input, and the full crop
    for the views; the run trains, resumes exactly, and a run without the option does not resume it."""
    seen = []
    real = train_module.shrink

    def spy(images, scale):
        seen.append((tuple(images.shape[-2:]), scale))
        return real(images, scale)

    monkeypatch.setattr(train_module, "shrink", spy)
    cfg = config(tmp_path, steps=2, save_every=2, image_sizes=[(96, 96)], input_scales=[2.0])
    result = train(cfg, quiet=True)
    assert seen == [((96, 96), 2.0)] * 2 and all(math.isfinite(v) for v in result.losses)
    plain = config(tmp_path, steps=3, save_every=3, image_sizes=[(96, 96)])
    with pytest.raises(UsageError, match="other settings \\(input_scales\\)"):
        train(plain, resume=True, quiet=True)


def test_ddp_two_processes_match_one(tmp_path, torchrun, plain_sgd):
    args = ["train", str(EXAMPLES), "--steps", "3", "--batch-size", "2", "--image-size", "64,48x80", "--views", "1",
            "--save-every", "3", "--device", "cpu", "--lr", "1e-3", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "cli.py"  # the CLI, with plain SGD for NAdam (see conftest.PLAIN_SGD)
    script.write_text(plain_sgd + "from upcli.cli import app\napp()\n")
    init = subprocess.run([sys.executable, str(script), *args[:1], str(EXAMPLES), "--steps", "1", "--lr", "0",
                           "--image-size", "64", "--views", "1", "--device", "cpu", "-q", "--out",
                           str(tmp_path / "init.safetensors")], env=env, capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr[-2000:]
    one = subprocess.run([sys.executable, str(script), *args, "--out", str(tmp_path / "one.safetensors")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(script, *args, "--out", tmp_path / "two.safetensors", env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    # the loss of the last step (a mean over both samples, all-reduced) agrees to float precision ...
    loss_one, loss_two = (read_config(p)["training"]["train_loss"] for p in (one, two))
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    # ... and so does every weight: with plain SGD a weight is start - lr * (its summed gradients), so the two runs
    # differ by gradient rounding only; each tensor stays within 1% of its own largest update (a gradient summed
    # where it should be averaged, or a process's half of the batch lost, would differ by the whole update)
    a, b, start = load_file(one), load_file(two), load_file(tmp_path / "init.safetensors")
    assert a.keys() == b.keys() == start.keys()
    for key in a:
        update = (a[key] - start[key]).abs().max()
        assert update > 0, f"{key} did not move"
        assert (a[key] - b[key]).abs().max() <= 1e-2 * update, key


def test_cli_train_writes_a_checkpoint_that_upsample_uses(cli, tmp_path):
    ckpt = tmp_path / "jbu.safetensors"
    args = ["train", EXAMPLES, "--out", ckpt, "--steps", "2", "--batch-size", "1", "--image-size", "64", "--views", "1",
            "--device", "cpu"]
    run = cli(*args)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "wrote" in run.stderr and ckpt.is_file() and train_state_path(ckpt).is_file()
    again = cli(*args, "--resume")
    assert again.returncode == 0 and "already at step 2 of 2; nothing to do" in again.stderr, again.stderr
    out = tmp_path / "feats"
    run = cli("upsample", EXAMPLES, "--out", out, "--upsampler", ckpt, "--size", "64", "--device", "cpu", "-q")
    assert run.returncode == 0, run.stderr[-2000:]
    from upcli.io.store import FeatureStore

    store = FeatureStore(out)
    assert len(store) == 4 and store[next(iter(store))].shape[0] == 320


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "12"], "sides >= 16"),
    (["--input-scale", "0.5"], "--input-scale: each factor must be between 1 and 16"),
    (["--upsampler", "bilinear"], "must be one of jbu, pac, resize-conv"),
    (["--guidance", "depth"], "--guidance must be one of rgb, conv, features"),
    (["--downsampler", "nope"], "unknown downsampler"),
    (["--radius", "3,x"], "--radius: expected a number or a comma list"),
    (["--radius", "3,9"], "--radius: each radius must be between 0 and 7"),
    (["--radius", "3,2"], "radius must be a number in 0..7 or one per layer (5)"),
    (["--lr", "-1"], "--lr must be 0 or more"),
    (["--image-size", "17"], "gives a 1x1 grid of efficientnet-lite0 features (stride 32)"),
    (["--resume", "--overwrite"], "give --resume or --overwrite, not both"),
    (["--arch", "kernel_size=5"], "--arch sets the attention upsampler; jbu takes"),
    (["--upsampler", "attention", "--arch", "kernel_size"], "--arch: expected KEY=VALUE pairs"),
    (["--upsampler", "attention", "--arch", "kernel_size=5.5"], "--arch: expected KEY=VALUE pairs"),
    (["--upsampler", "attention", "--arch", "kernel=5", "--image-size", "256"], "unexpected keyword argument 'kernel'"),
    (["--upsampler", "attention", "--arch", "head_dim=6", "--image-size", "256"], "head_dim must be a multiple of 4"),
])
def test_cli_train_bad_flags_are_one_line(cli, tmp_path, flags, message):
    run = cli("train", EXAMPLES, "--out", tmp_path / "x.safetensors", "--steps", "1", *flags)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_learning_rate_decays_by_cosine(tmp_path):
    from upcli.upsamplers.train import learning_rate

    cfg = config(tmp_path, steps=101, lr=1e-3)
    rates = [learning_rate(cfg, s) for s in range(101)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4) and rates[50] == pytest.approx(5.5e-4)
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_interrupts_are_held_while_a_checkpoint_pair_is_written():
    import signal

    from upcli.runtime import SignalGuard

    for sig in (signal.SIGINT, signal.SIGTERM):
        before = signal.getsignal(sig)
        reached_the_end = False
        with pytest.raises(KeyboardInterrupt):
            with SignalGuard(defer=True):
                os.kill(os.getpid(), sig)
                reached_the_end = True
        assert reached_the_end and signal.getsignal(sig) is before
    with SignalGuard(defer=True):
        pass  # no signal: nothing raised


def test_a_diverged_run_stops_before_saving_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from upcli.errors import UpcliError

    cfg = config(tmp_path, steps=4, save_every=2)
    real_make_batch = train_module.make_batch

    def nan_from_step_2(pool, cfg, step, *args, **kw):
        images = real_make_batch(pool, cfg, step, *args, **kw)
        return images * float("nan") if step >= 2 else images

    monkeypatch.setattr(train_module, "make_batch", nan_from_step_2)
    with pytest.raises(UpcliError, match="the loss became nan at step 3; stopped before saving"):
        train(cfg, quiet=True)
    assert read_config(cfg.out)["training"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(cfg.out).values())


# ---- the attention upsampler: scale objective, several feature sources ----------------------------------------

def attention_config(tmp_path, name="attention.safetensors", **kw):
    base = dict(upsampler="attention", layer="blocks.1,blocks.2", image_sizes=[(64, 64), (64, 96)],
                input_scales=[2.0, 4.0])
    return config(tmp_path, name, **{**base, **kw})


def test_attention_trains_on_several_sources_and_resumes_exactly(tmp_path, monkeypatch):
    straight = attention_config(tmp_path, "a.safetensors", save_every=4, val=str(EXAMPLES), val_images=2)
    result = train(straight, quiet=True)
    assert all(math.isfinite(v) for v in result.losses) and result.val_loss is not None
    saved = read_config(straight.out)
    assert saved["upsampler"] == "attention" and "backbone" not in saved and "dim" not in saved
    assert saved["feature_sources"] == [{"backbone": "efficientnet-lite0", "layer": "blocks.1"},
                                        {"backbone": "efficientnet-lite0", "layer": "blocks.2"}]
    drawn = []
    real_scale_batch = train_module.scale_batch

    def interrupted_at_step_2(backbone, images, cfg, step, samples, purpose=train_module._PROJ):
        if step == 2 and purpose != train_module._VAL:
            raise KeyboardInterrupt  # checkpoints the 2 finished steps
        drawn.append(backbone.layer)
        return real_scale_batch(backbone, images, cfg, step, samples, purpose)

    monkeypatch.setattr(train_module, "scale_batch", interrupted_at_step_2)
    split = attention_config(tmp_path, "b.safetensors", save_every=4, val=str(EXAMPLES), val_images=2)
    with pytest.raises(KeyboardInterrupt):
        train(split, quiet=True)
    monkeypatch.setattr(train_module, "scale_batch", real_scale_batch)
    train(split, resume=True, quiet=True)
    assert {"blocks.1", "blocks.2"} <= set(drawn)  # both sources drawn
    a, b = load_file(straight.out), load_file(split.out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_scale_objective_projects_before_upsampling_at_no_cost_in_loss():
    from upcli.upsamplers import create_upsampler
    from upcli.upsamplers.scale_objective import ScaleObjective, project, scale_loss

    torch.manual_seed(0)
    up = create_upsampler("attention", pretrained=False)
    lr, image, target = torch.randn(2, 20, 4, 6), torch.rand(2, 3, 32, 48), torch.randn(2, 20, 8, 12)
    proj = torch.randn(2, 20, 7)
    for where in ("pooled", "grid"):
        objective = ScaleObjective(up, target=where, l2_weight=0.5)
        size = (8, 12) if where == "grid" else (32, 48)
        pred = up(lr, image, size)  # every channel, projected afterwards
        pred = torch.nn.functional.adaptive_avg_pool2d(pred, (8, 12))
        want = scale_loss(project(pred, proj), project(target, proj), 0.5)
        torch.testing.assert_close(objective(lr, image, target, proj), want, rtol=1e-5, atol=1e-6)
    same = torch.randn(2, 7, 8, 12)
    assert float(scale_loss(same, same, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(scale_loss(-same, same, 0.0)) == pytest.approx(2.0, abs=1e-5)


@pytest.mark.parametrize("kw, message", [
    (dict(upsampler="jbu", input_scales=[1.0]), "several feature sources"),
    (dict(input_scales=[1.0, 2.0]), "--input-scale must be above 1"),
    (dict(image_sizes=[(32, 32)]), "too few cells"),
])
def test_attention_settings_that_cannot_train_are_one_line_errors(tmp_path, kw, message):
    with pytest.raises(UsageError, match=message):
        train(attention_config(tmp_path, **kw), quiet=True)
    assert not (tmp_path / "attention.safetensors").exists()


def test_cli_arch_sets_the_attention_architecture(cli, tmp_path):
    out = tmp_path / "a.safetensors"
    run = cli("train", EXAMPLES, "--out", out, "--steps", "1", "--upsampler", "attention", "--layer", "blocks.1",
              "--image-size", "64", "--batch-size", "1", "--arch", "kernel_size=3,heads=2")
    assert run.returncode == 0, run.stderr
    assert create_upsampler(str(out)).config == {"heads": 2, "head_dim": 32, "kernel_size": 3, "width": 32, "depth": 3}


def test_attention_defaults_to_shrink_factors_2_to_4_and_jbu_to_1(tmp_path):
    assert TrainConfig(images=[], out="x", upsampler="attention").input_scales == [2.0, 3.0, 4.0]
    assert TrainConfig(images=[], out="x").input_scales == [1.0]


def test_shrink_to_a_whole_number_of_cells():
    images = torch.rand(1, 3, 96, 160)
    assert shrink(images, 3, stride=16).shape[-2:] == (32, 48)
    assert shrink(images, 4, stride=32).shape[-2:] == (64, 64)  # never under 2 cells


def test_train_log_lines_are_timestamped_every_log_every_and_name_the_loss(cli, tmp_path):
    import re

    run = cli("train", EXAMPLES, "--out", tmp_path / "j.safetensors", "--steps", "2", "--image-size", "64",
              "--batch-size", "1", "--log-every", "0")
    assert run.returncode == 0, run.stderr
    steps = [line for line in run.stderr.splitlines() if "/2 steps" in line]
    assert len(steps) == 2, run.stderr  # --log-every 0: a line per step
    for line in steps:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d train: ", line), line
        assert "(Gaussian NLL, can be negative), reconstruction error " in line, line
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in run.stderr.strip().splitlines())
