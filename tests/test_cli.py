"""The command line end to end, with the real efficientnet-lite0 weights (offline)."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from upcli.cli import app
from upcli.io import FeatureStore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def small_images(root: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        path = root / ("a" if i % 2 else "b") / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 56 - 2 * i, 3), dtype=np.uint8)).save(path)
    return root


def test_help_lists_commands_with_examples():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("upsample", "train", "fit-image", "sr", "pretrain"):
        assert name in result.output
    for command in (["upsample"], ["train"], ["fit-image"], ["sr"], ["pretrain", "itpn"], ["pretrain", "mzsr"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "Example" in result.output, command
    assert "itpn" in invoke("pretrain", "--help").output


def test_main_job_on_examples(tmp_path):
    out = tmp_path / "out"
    result = invoke("upsample", EXAMPLES, "--backbone", "efficientnet-lite0", "--upsampler", "bilateral",
                    "--out", out, "--preview", "2", "--workers", "1")
    assert result.exit_code == 0, result.output
    store = FeatureStore(out)
    assert sorted(store) == ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
    for source in store:
        feats = store[source]
        h, w = Image.open(EXAMPLES / source).size[::-1]
        assert feats.dtype == torch.float16 and feats.shape[0] == 320
        assert min(feats.shape[1:]) == 448
        assert abs(feats.shape[1] / feats.shape[2] - h / w) < 0.01
        assert torch.isfinite(feats.float()).all() and feats.float().std() > 0
        attrs = store.attrs(source)
        assert tuple(attrs["orig_size"]) == (h, w) and attrs["upsampler"] == "bilateral"
    assert len(list((out / "previews").glob("*.png"))) == 2


def test_original_size_keeps_each_images_size_after_exif(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((7, 9, 3), 200, np.uint8)).save(folder / "tiny.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: stored 30x50 shows as 50x30
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(folder / "rot.jpg", exif=exif)
    result = invoke("upsample", folder, "--size", "original", "--out", tmp_path / "out", "--workers", "0")
    assert result.exit_code == 0, result.output
    store = FeatureStore(tmp_path / "out")
    assert tuple(store["tiny.png"].shape) == (320, 7, 9)
    assert tuple(store["rot.jpg"].shape) == (320, 50, 30)


def test_dry_run_writes_nothing(tmp_path):
    result = invoke("upsample", EXAMPLES, "--dry-run", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output and "chelsea.png\t320x448x673" in result.output
    assert not (tmp_path / "out").exists()


def test_bad_inputs_get_one_line_errors(tmp_path):
    imgs = small_images(tmp_path / "imgs", 2)
    cases = [
        (["upsample", imgs, "--out", tmp_path / "o", "--dtype", "float8"], 2, "--dtype must be one of"),
        (["upsample", imgs, "--out", tmp_path / "o", "--size", "0"], 2, "--size must be"),
        (["upsample", imgs, "--out", tmp_path / "o", "--compression", "zip"], 2, "--compression must be"),
        (["upsample", imgs, "--out", tmp_path / "o", "--num-shards", "2", "--shard-index", "2"], 2, "--shard-index must be"),
        (["upsample", imgs, "--out", tmp_path / "o", "--backbone", "nope"], 2, "unknown backbone"),
        (["upsample", tmp_path / "missing", "--out", tmp_path / "o"], 2, "missing"),
        (["upsample", tmp_path / "imgs" / "a", "--out", tmp_path / "o"], 0, None),
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    cases.append((["upsample", tmp_path / "empty", "--out", tmp_path / "o2"], 2, "no images found"))
    bad_ckpt = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer4.2.conv3.weight": torch.zeros(2048, 512, 1, 1)}, bad_ckpt)
    cases.append((["upsample", imgs, "--out", tmp_path / "o3", "--backbone", "dinov2", "--weights", bad_ckpt], 1, "resnet.pth"))
    cases.append((["upsample", imgs, "--out", tmp_path / "o4", "--num-shards", "0"], 2, "--num-shards must be at least 1"))
    cases.append((["upsample", imgs, "--out", tmp_path / "o5", "--sigma-spatial", "2"], 2,
                  "--sigma-spatial and --sigma-color set the bilateral upsampler, not bilinear"))
    cases.append((["upsample", imgs, "--out", tmp_path / "o6", "--upsampler", "implicit-field"], 2,
                  "implicit-field renders one image's saved field"))
    for args, code, message in cases:
        result = invoke(*args, "--workers", "0", "-q")
        assert result.exit_code == code, (args, result.output)
        if message:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and message in lines[0] and lines[0].startswith("upcli upsample: "), (args, result.stderr)


def test_a_bad_option_leaves_nothing_that_blocks_the_corrected_command(tmp_path):
    imgs = small_images(tmp_path / "imgs", 2)
    out = tmp_path / "o"
    result = invoke("upsample", imgs, "--out", out, "--size", "32", "--workers", "-1")
    assert result.exit_code == 2 and "--workers must be 0 or more" in result.stderr and not out.exists()
    assert invoke("upsample", imgs, "--out", out, "--size", "32", "--workers", "0", "-q").exit_code == 0
    other = invoke("upsample", imgs, "--out", out, "--size", "32", "--upsampler", "bilateral", "--sigma-color", "0.2",
                   "--workers", "0", "-q")
    assert other.exit_code == 1 and "upsampler 'bilinear' vs 'bilateral'" in other.stderr, other.stderr
    assert len(other.stderr.strip().splitlines()) == 1 and "size" not in other.stderr.split("(", 1)[1], other.stderr


def test_corrupt_image_is_reported_and_exit_3(cli, tmp_path):
    imgs = small_images(tmp_path / "imgs", 3)
    (imgs / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = cli("upsample", imgs, "--out", tmp_path / "out", "--size", "32", "--workers", "0", "--log-every", "1000")
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("b/broken.jpg") == 1
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [f["source"] for f in failures] == ["b/broken.jpg"]
    assert len(FeatureStore(tmp_path / "out")) == 3


def test_a_file_name_that_is_not_utf8_is_recorded_not_fatal(cli, tmp_path):
    imgs = small_images(tmp_path / "imgs", 2)
    latin1 = Path(os.fsdecode(os.fsencode(imgs / "a") + b"/caf\xe9.png"))
    latin1.write_bytes((imgs / "a" / "im1.png").read_bytes())
    for _ in range(2):  # and a second run resumes instead of failing at the same image
        result = cli("upsample", imgs, "--out", tmp_path / "out", "--size", "32", "--workers", "0")
        assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [f["reason"] for f in failures] == ["the file name is not valid UTF-8; rename the file"]
    assert len(FeatureStore(tmp_path / "out")) == 2


def test_an_out_folder_inside_the_image_folder_is_not_scanned(tmp_path):
    imgs = small_images(tmp_path / "imgs", 2)
    out = imgs / "feats"
    first = invoke("upsample", imgs, "--out", out, "--size", "32", "--preview", "2", "--workers", "0", "-q")
    assert first.exit_code == 0 and len(list((out / "previews").glob("*.png"))) == 2
    again = invoke("upsample", imgs, "--out", out, "--size", "32", "--preview", "2", "--workers", "0")
    assert again.exit_code == 0 and "1 shards already done" in again.stderr, again.stderr
    assert len(FeatureStore(out)) == 2


def test_a_retrained_checkpoint_is_another_job_not_a_resume(tmp_path):
    from upcli.backbones import create_backbone
    from upcli.upsamplers import create_upsampler
    from upcli.upsamplers.checkpoints import save_upsampler

    imgs = small_images(tmp_path / "imgs", 2)
    backbone = create_backbone("efficientnet-lite0")
    ckpt = tmp_path / "rc.safetensors"
    args = ("upsample", imgs, "--out", tmp_path / "o", "--size", "32", "--upsampler", ckpt, "--workers", "0", "-q")
    for seed, code in ((0, 0), (0, 0), (1, 1)):  # the same weights resume; other weights are refused
        torch.manual_seed(0)
        up = create_upsampler("resize-conv", backbone=backbone, pretrained=False)
        with torch.no_grad():
            next(up.parameters()).add_(seed)
        save_upsampler(ckpt, up, backbone)
        result = invoke(*args)
        assert result.exit_code == code, result.stderr
    assert "another job (upsampler_sha256" in result.stderr


def test_an_image_whose_features_would_not_fit_in_memory_is_recorded(tmp_path):
    imgs = small_images(tmp_path / "imgs", 1)
    Image.fromarray(np.zeros((4, 3000, 3), np.uint8)).save(imgs / "strip.png")  # 448 x 336000 at --size 448
    result = invoke("upsample", imgs, "--out", tmp_path / "o", "--workers", "0", "-q")
    assert result.exit_code == 3, result.stderr
    failures = [json.loads(line) for line in (tmp_path / "o" / "failures.jsonl").read_text().splitlines()]
    assert [f["source"] for f in failures] == ["strip.png"] and "GiB; lower --size" in failures[0]["reason"]


def read_store(out: Path) -> dict:
    """source -> (shard, stored bytes: the map, or a compact store's low-res features and image bytes), and the
    compact store's upsampler copies."""
    result = {}
    for shard in sorted(out.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            for key, ds in f["features"].items():
                images = f["images"][key][()].tobytes() if "images" in f else None
                result[ds.attrs["source"]] = (shard.name, ds[()].tobytes(), images)
    result["upsamplers"] = sorted(p.name for p in out.glob("upsamplers/*"))
    return result


@pytest.mark.parametrize("store", [[], ["--store", "compact", "--upsampler", "jbu"]], ids=["full", "compact"])
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(cli, tmp_path, store):
    imgs = small_images(tmp_path / "imgs", 24)
    args = ["upsample", str(imgs), "--size", "64", "--shard-size", "2", "--workers", "1", *store]
    base = [sys.executable, "-m", "upcli", *args]
    reference = cli(*args, "--out", tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr
    out = str(tmp_path / "out")
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen(base + ["--out", out], stderr=subprocess.PIPE, text=True)
        kill_after = rng.randint(0, 2)  # shards this run writes before the kill; 3 runs never finish 12 shards
        seen = 0
        for line in proc.stderr:
            if seen >= kill_after:
                break
            seen += " wrote shard-" in line
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    final = subprocess.run(base + ["--out", out], capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert read_store(Path(out)) == read_store(tmp_path / "ref")
    assert not list(Path(out).glob("*.tmp-*"))
    verify = cli("upsample", "--verify", out)
    assert verify.returncode == 0 and "24 stored, 0 failed, of 24 inputs" in verify.stdout


def test_sigterm_exits_130_and_resumes(tmp_path):
    imgs = small_images(tmp_path / "imgs", 6)
    base = [sys.executable, "-m", "upcli", "upsample", str(imgs), "--size", "64", "--shard-size", "2", "--workers", "0",
            "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(base, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if " wrote shard-" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait() == 130, rest
    assert "interrupted" in rest
    assert not list((tmp_path / "out").glob("*.tmp-*"))
    assert subprocess.run(base, capture_output=True).returncode == 0
    assert len(FeatureStore(tmp_path / "out")) == 6


def test_every_subpackage_is_installed_by_a_plain_pip_install():
    """``pip install .`` (not -e) installs only the packages pyproject lists: each folder with an __init__.py."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(("upcli", *init.parent.relative_to(root / "upcli").parts)) for init in (root / "upcli").rglob("__init__.py")}
    found |= {".".join(("upcli.kernels", *init.parent.relative_to(root / "kernels").parts))
              for init in (root / "kernels").rglob("__init__.py")}
    assert found == listed, (found - listed, listed - found)
    assert config["package-dir"]["upcli.kernels"] == "kernels"


def test_an_option_the_command_would_not_use_is_an_error(tmp_path):
    imgs = small_images(tmp_path / "imgs", 1)
    cases = [
        (["train", imgs, "--out", tmp_path / "t.safetensors", "--upsampler", "pac", "--guidance", "conv", "--steps", "1"],
         "--guidance set the jbu upsampler, not pac"),
        (["sr", imgs, "--out", tmp_path / "s", "--init", tmp_path / "none.safetensors", "--max-iters", "5"],
         "--max-iters, --noise and --seed set ZSSR"),
        (["fit-image", imgs, "--out", tmp_path / "f", "--from-fields", tmp_path, "--steps", "5"],
         "the fit options (--steps, --views, ...) do not apply"),
        (["pretrain", "itpn", imgs, "--out", tmp_path / "i.safetensors", "--teacher-layer", "blocks.4"],
         "--teacher-layer and --teacher-weights set a backbone teacher"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "t.safetensors").exists() and not (tmp_path / "s").exists() and not (tmp_path / "f").exists()


def test_job_commands_share_their_flags_and_help_imports_no_torch():
    import subprocess
    import sys

    from upcli.configs import JobOptions

    for command in ("upsample", "fit-image", "sr"):
        text = " ".join(invoke(command, "--help", env={"COLUMNS": "300"}).output.split())
        for name in JobOptions.__dataclass_fields__:
            assert f"--{name.replace('_', '-')}" in text, (command, name)
    code = "import sys; from upcli.cli import app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_only_the_cli_imports_the_command_modules():
    """The seams run one way: library parts never import a command (upsample, fit-image, sr jobs) or the CLI."""
    import ast

    root = Path(__file__).resolve().parents[1] / "upcli"
    commands = {"upcli.upsample", "upcli.fit_image", "upcli.sr.job", "upcli.cli"}
    offenders = []
    for path in root.rglob("*.py"):
        module = ".".join(("upcli", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                target = ".".join(p for p in (base, node.module) if p) if node.level else node.module
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if commands & set(names) and module not in ("upcli.cli", "upcli.__main__"):
                offenders.append((module, names[0]))
    assert offenders == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_a_fifo_in_the_image_folder_is_skipped_not_waited_on(tmp_path):
    imgs = small_images(tmp_path / "imgs", 2)
    os.mkfifo(imgs / "0-fifo.png")  # sorted first: every image after it would wait too
    run = subprocess.run([sys.executable, "-m", "upcli.cli", "upsample", str(imgs), "--out", str(tmp_path / "o"),
                          "--size", "32", "--workers", "0", "-q"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "skipping" in run.stderr and "0-fifo.png': not a regular file" in run.stderr
    assert len(FeatureStore(tmp_path / "o")) == 2


def test_verify_with_a_disagreeing_job_json_keeps_the_manifest_unless_repair(tmp_path):
    imgs = small_images(tmp_path / "imgs", 2)
    out = tmp_path / "o"
    assert invoke("upsample", imgs, "--out", out, "--size", "32", "--workers", "0", "-q").exit_code == 0
    manifest = (out / "manifest.jsonl").read_text()
    record = json.loads((out / "job.json").read_text())
    (out / "job.json").write_text(json.dumps({**record, "fingerprint": "f" * 64}))
    verify = invoke("upsample", "--verify", out)
    assert verify.exit_code == 1 and "manifest.jsonl left unchanged" in verify.stderr and "--repair" in verify.stderr
    assert (out / "manifest.jsonl").read_text() == manifest
    assert invoke("upsample", "--verify", out, "--repair").exit_code == 1
    assert (out / "manifest.jsonl").read_text() == ""
    misplaced = invoke("upsample", imgs, "--out", tmp_path / "p", "--repair")
    assert misplaced.exit_code == 2 and "--repair goes with --verify DIR" in misplaced.stderr


def test_sigterm_during_start_up_exits_130_with_a_line(monkeypatch, capsys):
    from upcli import cli

    def start_up_gets_sigterm():  # as if the signal came while torch was being imported
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli, "app", start_up_gets_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as info:
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, before)
    assert info.value.code == 130 and capsys.readouterr().err == "upcli: interrupted by SIGTERM\n"


def test_a_newline_in_a_file_name_does_not_split_the_log_line(tmp_path):
    imgs = small_images(tmp_path / "imgs", 1)
    (imgs / "bad\nname.png").write_bytes(b"not a png")
    result = invoke("upsample", imgs, "--out", tmp_path / "o", "--size", "32", "--workers", "0")
    assert result.exit_code == 3, result.stderr
    skipped = [line.split(" ", 2)[2] for line in result.stderr.splitlines() if " skipped " in line]  # after the time
    assert len(skipped) == 1 and skipped[0].startswith("skipped bad\\x0aname.png: "), result.stderr


def test_a_disk_filled_by_another_writer_after_the_free_space_check_is_still_one_line(tmp_path):
    # a real full disk, and a free-space check that sees plenty (as when another process takes the space right
    # after it): the blocks reserved before each image are what keep HDF5 from a failing write (without them, exit
    # 139 here). Needs a small filesystem: a tmpfs, where this process may mount one.
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root, or no mount permission)")
    try:
        imgs = small_images(tmp_path / "imgs", 8)
        script = ("import shutil, sys\n"
                  "real = shutil.disk_usage\n"
                  "shutil.disk_usage = lambda p: real(p)._replace(free=1 << 50)\n"
                  "sys.argv = ['upcli', *sys.argv[1:]]\n"
                  "from upcli.cli import main\n"
                  "main()\n")
        out = small / "st"
        run = subprocess.run([sys.executable, "-c", script, "upsample", str(imgs), "--out", str(out), "--size", "96",
                              "--shard-size", "3", "--workers", "0", "-q"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 1, run.stderr
        assert run.stderr.strip().splitlines() == [line for line in run.stderr.strip().splitlines()
                                                   if "disk full; finished shards are kept" in line], run.stderr
        assert len(FeatureStore(out)) == 3 and not list(out.glob("*.tmp-*"))
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


@pytest.mark.parametrize("reserves", [True, False])
def test_a_full_disk_during_a_shard_is_one_line_and_keeps_finished_shards(tmp_path, reserves):
    # the disk fills after the first shard (simulated: the space reservation fails, or where the filesystem cannot
    # reserve, disk_usage reports what a full disk would); the process must end with one line and exit 1, never
    # reach HDF5 with a failing write (that crashed it: exit 139)
    imgs = small_images(tmp_path / "imgs", 4)
    script = (
        "import errno, shutil, sys\n"
        "import upcli.io.store as store\n"
        "real, calls = shutil.disk_usage, {'n': 0}\n"
        "def full_after_two(*args):\n"
        "    calls['n'] += 1\n"
        f"    if {reserves}:\n"
        "        if calls['n'] > 2: raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "        return True\n"
        "    return False\n"
        "def disk_usage(path):\n"
        "    usage = real(path)\n"
        "    return usage._replace(free=usage.free if calls['n'] <= 2 else 1000)\n"
        "store.reserve_space, shutil.disk_usage = full_after_two, disk_usage\n"
        "sys.argv = ['upcli', *sys.argv[1:]]\n"
        "from upcli.cli import main\n"
        "main()\n")
    out = tmp_path / "o"
    run = subprocess.run([sys.executable, "-c", script, "upsample", str(imgs), "--out", str(out), "--size", "32",
                          "--shard-size", "2", "--workers", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("upcli upsample:")]
    assert len(errors) == 1 and "disk full; finished shards are kept" in errors[0], run.stderr
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr
    assert len(FeatureStore(out)) == 2 and not list(out.glob("*.tmp-*"))
