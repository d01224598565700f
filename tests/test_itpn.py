"""iTPN: HiViT + pyramid (masking, shapes), its pretraining objectives and loop, and ``--backbone itpn:``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from upcli.backbones import create_backbone, get_backbone_cfg
from upcli.backbones.itpn import (
    ITPN,
    LEVEL_STRIDES,
    LEVELS,
    arch_config,
    random_ids_keep,
    sincos_embedding,
    to_map,
    to_tokens,
)
from upcli.checkpoints import read_config
from upcli.errors import UsageError
from upcli.io import FeatureStore
from upcli.io.pool import ImagePool
from upcli.pretrain import itpn as itpn_pretrain
from upcli.pretrain.itpn import (
    ITPNPretrainConfig,
    build_pretrainer,
    learning_rate,
    patch_pixels,
    pretrain_itpn,
)
from upcli.training import train_state_path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "images"
SMALL = {"dim": 64, "heads": 4, "depth": 2, "mlp_depth": 1, "fpn_dim": 32, "fpn_depth": 1}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def small_model(seed: int = 0) -> ITPN:
    torch.manual_seed(seed)
    return ITPN(arch_config("tiny", **SMALL)).eval()


def small_cfg(tmp_path, **kwargs) -> ITPNPretrainConfig:
    base = dict(images=[str(EXAMPLES)], out=str(tmp_path / "itpn.safetensors"), image_size=32, batch_size=2, steps=2,
                arch_overrides=SMALL, device="cpu", save_every=100)
    return ITPNPretrainConfig(**{**base, **kwargs})


def test_token_layout_round_trips():
    x = torch.randn(2, 5, 12, 20)
    for s in (1, 2, 4):
        assert torch.equal(to_map(to_tokens(x, s), (12 // s, 20 // s)), x)
    tokens = to_tokens(x, 4)  # patch (row 1, col 2) holds pixels [4:8, 8:12]
    assert torch.equal(tokens[:, 1 * 5 + 2].permute(0, 3, 1, 2), x[:, :, 4:8, 8:12])


def test_masked_input_equals_the_visible_patches_alone():
    model = small_model()
    images = torch.randn(2, 3, 48, 64)  # 3 x 4 patches
    ids_keep = random_ids_keep(2, 12, 0.75, [torch.Generator().manual_seed(i) for i in range(2)])
    with torch.no_grad():
        masked = model(images, ids_keep)
        # the early stages of each visible patch, run as a 16x16 image of its own
        for b in range(2):
            for j, patch in enumerate(ids_keep[b].tolist()):
                r, c = divmod(patch, 4)
                alone = model(images[b:b + 1, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16])
                for level in ("s1", "s2"):
                    torch.testing.assert_close(masked[level][b, j], alone[level][0, 0], rtol=1e-5, atol=1e-5)
        # the attention stage sees the visible tokens and their own positions, nothing else
        x = model.merge2(masked["s2"]).flatten(1, 3)
        x = x + model.position_embedding((3, 4), "cpu")[ids_keep]
        for block in model.blocks:
            x = block(x)
        torch.testing.assert_close(masked["s3"], model.norm(x), rtol=1e-5, atol=1e-5)
        # what the dropped patches hold changes nothing
        changed = images.clone()
        for b in range(2):
            for patch in set(range(12)) - set(ids_keep[b].tolist()):
                r, c = divmod(patch, 4)
                changed[b, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16] = torch.randn(3, 16, 16)
        again = model(changed, ids_keep)
        for level in LEVELS:
            assert torch.equal(again[level], masked[level]), level
        # and keeping every patch is the unmasked network
        full = model(images)
        everything = model(images, torch.arange(12).expand(2, -1))
        for level in LEVELS:
            torch.testing.assert_close(everything[level], full[level])


def test_pyramid_shapes_for_non_square_input():
    model = small_model()
    levels = model(torch.randn(2, 3, 48, 80))
    assert levels["s3"].shape == (2, 15, 64)
    for name, (s, dim) in {"s1": (4, 16), "s2": (2, 32), "p16": (1, 32), "p8": (2, 32), "p4": (4, 32)}.items():
        assert levels[name].shape == (2, 15, s, s, dim), name
    maps = model.forward_intermediates(torch.randn(2, 3, 48, 80), indices=range(len(LEVELS)))
    for name, feats in zip(LEVELS, maps):
        assert feats.shape[-2:] == (48 // LEVEL_STRIDES[name], 80 // LEVEL_STRIDES[name]), name
    # sides that are not multiples of 16 are padded, and each map cropped to its cells
    p4, p16 = model.forward_intermediates(torch.randn(1, 3, 36, 52), indices=[5, 3])
    assert p4.shape == (1, 32, 9, 13) and p16.shape == (1, 32, 3, 4)


def test_position_embedding_is_sincos_on_the_pretraining_grid():
    emb = sincos_embedding((14, 14), 64, 14)
    assert emb.shape == (196, 64)
    assert torch.allclose(emb[0, :16], torch.zeros(16), atol=1e-6)  # sin(x = 0)
    assert torch.allclose(emb[0, 16:32], torch.ones(16))  # cos(x = 0)
    # a 7-wide grid sits on the positions 0.5, 2.5, ... of the 14-wide one
    assert torch.allclose(sincos_embedding((1, 7), 64, 14)[0, :16], torch.sin(torch.tensor(0.5) * emb.new_tensor(
        [1 / 10000 ** (i / 16) for i in range(16)])), atol=1e-6)


def test_itpn_backbone_specs(tmp_path):
    cfg = get_backbone_cfg("itpn:tiny")
    assert (cfg.layer, cfg.dim, cfg.stride) == ("p4", 128, 4)
    assert get_backbone_cfg("itpn:base", layer="s3").dim == 512
    with pytest.raises(UsageError, match="p4"):
        get_backbone_cfg("itpn:tiny", layer="blocks.6")
    with pytest.raises(UsageError, match="not an arch"):
        get_backbone_cfg(f"itpn:{tmp_path / 'missing.safetensors'}")
    backbone = create_backbone("itpn:tiny", layer="p8")
    feats = backbone(torch.rand(1, 3, 50, 70))
    assert feats.shape == (1, 128, 6, 9)
    # random init is seeded: the same baseline every time
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(create_backbone("itpn:tiny", layer="p8")(x), backbone(x))


def test_pixel_targets_are_normalised_per_patch():
    images = torch.rand(2, 3, 32, 48)
    pixels = patch_pixels(images)
    assert pixels.shape == (2, 6, 768)
    assert torch.allclose(pixels.mean(-1), torch.zeros(2, 6), atol=1e-5)
    assert torch.allclose(pixels.std(-1), torch.ones(2, 6), atol=1e-3)


def test_streaming_pool_draws_the_same_crops_and_workers_the_same_batches(tmp_path):
    memory, stream = ImagePool(str(EXAMPLES), 64), ImagePool(str(EXAMPLES), 64, stream=True)
    assert not memory.stream and stream.stream and len(stream) == len(memory) == 4
    for seed in range(3):
        a = memory.resized_crop(torch.Generator().manual_seed(seed), 32)
        b = stream.resized_crop(torch.Generator().manual_seed(seed), 32)
        assert a.shape == (3, 32, 32) and torch.equal(a, b)
        # `upcli train` draws plain crops, and streams sets of more than STREAM_OVER images
        assert torch.equal(memory.crop(torch.Generator().manual_seed(seed), (40, 56)),
                           stream.crop(torch.Generator().manual_seed(seed), (40, 56)))
    cfg = small_cfg(tmp_path, batch_size=3)
    here = list(itpn_pretrain.crop_batches(stream, cfg, range(2, 5), range(3)))
    cfg.workers = 2
    there = list(itpn_pretrain.crop_batches(stream, cfg, range(2, 5), range(3)))
    assert len(here) == len(there) == 3 and all(torch.equal(a, b) for a, b in zip(here, there))


def test_images_skipped_inside_loader_workers_are_counted_in_the_main_process(tmp_path):
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(EXAMPLES, root)
    for i in range(4):
        (root / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    stream = ImagePool(str(root), 64, stream=True)
    cfg = small_cfg(tmp_path, batch_size=3, workers=2)
    batches = list(itpn_pretrain.crop_batches(stream, cfg, range(3), range(3)))
    assert len(batches) == 3 and all(b.shape == (3, 3, cfg.image_size, cfg.image_size) for b in batches)
    assert stream.skipped and all("broken" in reason for reason in stream.skipped)


def test_learning_rate_warms_up_then_decays():
    cfg = ITPNPretrainConfig(images=[], out="", lr=1e-3, min_lr=1e-5, warmup=0.1)
    lrs = [learning_rate(cfg, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-5, rel=0.1)


@pytest.mark.parametrize("teacher,positions", [("ema", "all"), ("efficientnet-lite0", "all"), ("ema", "masked")])
def test_a_few_steps_lower_both_losses(teacher, positions, tmp_path):
    cfg = small_cfg(tmp_path, teacher=teacher, image_size=64, teacher_layer="blocks.4" if teacher != "ema" else None,
                    feature_positions=positions)
    torch.manual_seed(0)
    model, teacher_net = build_pretrainer(cfg)
    assert (model.level_heads is not None) == (positions == "all")
    images = itpn_pretrain.crop_batch(ImagePool(str(EXAMPLES), 128), cfg, 0, range(4))
    ids_keep = itpn_pretrain.mask_batch(cfg, 0, range(4), 16)
    targets = teacher_net.targets(images)
    assert set(targets) == {"p16", "p8", "p4"} and targets["p4"].shape[:4] == (4, 16, 4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before, _ = model(images, ids_keep, targets)
    for _ in range(15):
        losses, _ = model(images, ids_keep, targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    after, _ = model(images, ids_keep, targets)
    assert after["pixel"] < 0.9 * before["pixel"]
    assert after["feature"] < 0.9 * before["feature"]


def test_no_masking_trains_on_features_alone(tmp_path):
    with pytest.raises(UsageError, match="drops no patch"):
        small_cfg(tmp_path, mask_ratio=0.0).check()
    for bad in ({"save_every": 0}, {"workers": -1}, {"preview_every": -1}):
        with pytest.raises(UsageError, match="--save-every must be at least 1"):
            small_cfg(tmp_path, **bad).check()
    with pytest.raises(UsageError, match="drops no patch"):
        small_cfg(tmp_path, mask_ratio=0.0, pixel_weight=0.0, feature_positions="masked").check()
    cfg = small_cfg(tmp_path, mask_ratio=0.0, pixel_weight=0.0, teacher="efficientnet-lite0", image_size=64,
                    teacher_layer="blocks.4")
    cfg.check()
    torch.manual_seed(0)
    model, teacher_net = build_pretrainer(cfg)
    images = itpn_pretrain.crop_batch(ImagePool(str(EXAMPLES), 128), cfg, 0, range(2))
    ids_keep = itpn_pretrain.mask_batch(cfg, 0, range(2), 16)
    assert ids_keep.shape == (2, 16)
    losses, _ = model(images, ids_keep, teacher_net.targets(images))
    assert losses["pixel"] == 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_resume_after_an_interrupt_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = small_cfg(tmp_path / "a", steps=4, preview_every=2)
    pretrain_itpn(straight, quiet=True)
    assert sorted(p.name for p in itpn_pretrain.preview_dir(straight.out).iterdir()) == ["step_000002.png",
                                                                                       "step_000004.png"]
    cfg = small_cfg(tmp_path / "b", steps=4)
    real = itpn_pretrain.crop_batch

    def interrupt_at_step_2(pool, cfg_, step, samples):
        if step == 2:
            raise KeyboardInterrupt
        return real(pool, cfg_, step, samples)

    monkeypatch.setattr(itpn_pretrain, "crop_batch", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain_itpn(cfg, quiet=True)
    training = read_config(cfg.out)["training"]
    assert training["step"] == 2 and training["steps"] == 4 and training["interrupted"]
    monkeypatch.setattr(itpn_pretrain, "crop_batch", real)
    result = pretrain_itpn(cfg, resume=True, quiet=True)
    assert result.start == 2 and len(result.losses["pixel"]) == 2
    a, b = load_file(straight.out), load_file(cfg.out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    ema_a, ema_b = load_file(train_state_path(straight.out)), load_file(train_state_path(cfg.out))
    for key in ema_a:
        torch.testing.assert_close(ema_a[key], ema_b[key], rtol=1e-5, atol=1e-6, msg=key)
    with pytest.raises(UsageError, match="other settings"):
        pretrain_itpn(small_cfg(tmp_path / "b", steps=6, mask_ratio=0.5), resume=True, quiet=True)


def test_ddp_on_two_processes_matches_one(tmp_path, torchrun, plain_sgd):
    script = tmp_path / "run.py"
    script.write_text(
        plain_sgd +
        "import sys, json\n"
        "from upcli.pretrain.itpn import ITPNPretrainConfig, pretrain_itpn\n"
        f"cfg = ITPNPretrainConfig(images=[{str(EXAMPLES)!r}], out=sys.argv[1], image_size=32, batch_size=4, steps=3,\n"
        f"                         arch_overrides={SMALL!r}, device='cpu', lr=0.1, warmup=0)\n"
        "result = pretrain_itpn(cfg, quiet=True)\n"
        "open(sys.argv[1] + '.json', 'w').write(json.dumps(result.losses))\n")
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.safetensors")], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(script, tmp_path / "two.safetensors", env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    losses_one = json.loads((tmp_path / "one.safetensors.json").read_text())
    losses_two = json.loads((tmp_path / "two.safetensors.json").read_text())
    for name in ("pixel", "feature"):
        assert len(losses_one[name]) == 3 and losses_one[name] == pytest.approx(losses_two[name], rel=1e-4), name
    # plain SGD (see conftest.PLAIN_SGD): every element agrees, and the weights moved well past the tolerance
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    torch.manual_seed(0)
    start, _ = build_pretrainer(small_cfg(tmp_path))
    moved = (a["backbone.blocks.0.attn.qkv.weight"] - start.backbone.blocks[0].attn.qkv.weight).abs().max()
    assert moved > 1e-4


def test_cli_pretrains_and_upsample_reads_the_itpn_backbone(cli, tmp_path):
    ckpt = tmp_path / "itpn.safetensors"
    run = cli("pretrain", "itpn", EXAMPLES, "--out", ckpt, "--steps", "1", "--batch-size", "2", "--image-size",
                  "32", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "images/s" in run.stderr
    config = read_config(ckpt)
    assert config["kind"] == "itpn" and config["arch"] == "tiny" and config["training"]["step"] == 1
    again = cli("pretrain", "itpn", EXAMPLES, "--out", ckpt, "--steps", "1", "--batch-size", "2", "--image-size",
                    "32", "--device", "cpu", "--resume")
    assert again.returncode == 0 and "already at step 1 of 1; nothing to do" in again.stderr, again.stderr
    out = tmp_path / "feats"
    up = cli("upsample", EXAMPLES, "--backbone", f"itpn:{ckpt}", "--out", out, "--size", "64", "--workers", "0",
                 "-q")
    assert up.returncode == 0, up.stderr
    store = FeatureStore(out)
    assert len(store) == 4
    for source in store:
        feats = store[source]
        assert feats.shape[0] == 128 and min(feats.shape[1:]) == 64 and torch.isfinite(feats.float()).all()
        assert store.attrs(source)["backbone"] == f"itpn:{ckpt}" and store.attrs(source)["layer"] == "p4"
    # the pretrained weights are the ones used: the stored stride-4 features equal the backbone's own
    backbone = create_backbone(f"itpn:{ckpt}")
    state = load_file(ckpt)
    assert torch.equal(backbone.model.out4.mlp.fc1.weight, state["backbone.out4.mlp.fc1.weight"])
    # train and fit-image take it too (stride 4: two JBU stages)
    jbu = cli("train", EXAMPLES, "--backbone", f"itpn:{ckpt}", "--out", tmp_path / "jbu.safetensors", "--steps",
                  "1", "--batch-size", "1", "--image-size", "64", "--views", "1", "--device", "cpu", "-q")
    assert jbu.returncode == 0, jbu.stderr
    assert read_config(tmp_path / "jbu.safetensors")["backbone"] == f"itpn:{ckpt}"
    fit = cli("fit-image", EXAMPLES / "chelsea.png", "--backbone", f"itpn:{ckpt}", "--layer", "p16", "--out",
                  tmp_path / "fit", "--steps", "2", "--views", "2", "--size", "64", "--device", "cpu", "-q")
    assert fit.returncode == 0, fit.stderr
    assert FeatureStore(tmp_path / "fit")["chelsea.png"].shape[0] == 128
    bad = cli("upsample", EXAMPLES, "--backbone", f"itpn:{tmp_path / 'none.safetensors'}", "--out", tmp_path / "x")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    missing = cli("pretrain", "itpn", EXAMPLES, "--out", tmp_path / "new.safetensors", "--resume", "--device", "cpu")
    (tmp_path / "file").write_text("")
    unwritable = cli("pretrain", "itpn", EXAMPLES, "--out", tmp_path / "file" / "i.safetensors", "--device", "cpu")
    assert unwritable.returncode == 2 and "is a file, not a folder" in unwritable.stderr, unwritable.stderr
    assert missing.returncode == 2 and "no checkpoint to resume" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = cli("pretrain", "itpn", empty, "--out", tmp_path / "e.safetensors")
    assert nothing.returncode != 0 and len(nothing.stderr.strip().splitlines()) == 1, nothing.stderr
    size = cli("pretrain", "itpn", EXAMPLES, "--out", tmp_path / "e.safetensors", "--image-size", "100")
    assert size.returncode == 2 and "multiple of 16" in size.stderr
