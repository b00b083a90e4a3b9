"""`imagen finetune`: LoRA adapters teach a trained stage a few captioned pictures.

One real `imagen finetune` run (a subprocess, on the toy cascade of tests/tiny.py, with prior
preservation and MLflow registration) serves every test but the bad-folder ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from tiny import CORES, imagen, make_tiny_cascade, shrink, write_params

from imagen.cli import main as cli_main

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 60)}


def star_folder(dest: Path, n: int = 4, size: int = 32) -> Path:
    """``n`` five-pointed stars on white with a captions.csv (a shape the toy data never draws)."""
    import math

    dest.mkdir(parents=True)
    rows = ["file,caption"]
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        img = Image.new("RGB", (size, size), (245, 245, 240))
        c, r = size / 2, size * (0.3 + 0.05 * i)
        points = [
            (
                c + (r if k % 2 == 0 else r / 2.5) * math.sin(k * math.pi / 5),
                c - (r if k % 2 == 0 else r / 2.5) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
        ImageDraw.Draw(img).polygon(points, fill=COLOURS[colour])
        img.save(dest / f"star{i}.png")
        rows.append(f"star{i}.png,a {colour} star in the center on a light background")
    (dest / "captions.csv").write_text("\n".join(rows) + "\n")
    return dest


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    stages = ("base64", "sr256")
    params = make_tiny_cascade(root, stages)
    write_params(shrink(root, stages=stages), root / "params.yaml")
    base_file = Path(params.models_dir) / "base64" / "model.pt"
    before = sha(base_file)
    out = root / "lora"
    res = imagen(
        root,
        "finetune",
        "--images",
        str(star_folder(root / "stars")),
        "--out",
        str(out),
        "--steps",
        "40",
        "--lr",
        "5e-3",
        "--prior",
        "2",
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:]
    return {
        "root": root,
        "params": params,
        "out": out,
        "base": base_file,
        "sha": before,
        "log": res.stdout,
    }


def test_the_adapted_model_fits_the_pictures_better(tuned) -> None:
    metrics = json.loads((tuned["out"] / "metrics.json").read_text())
    assert metrics["images"] == 4 and metrics["prior"] == 2
    assert metrics["loss_after"] < metrics["loss_before"], metrics
    assert (tuned["out"] / "compare.png").is_file()
    assert "loss on the pictures" in tuned["log"]


def test_only_the_adapters_changed(tuned) -> None:
    """The source file is untouched; the saved model is exactly the base weights plus the
    saved adapters merged, and every layer without an adapter is bit-for-bit the base one."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from imagen.checkpoint import read_stage
    from imagen.lora.adapters import lora_targets
    from imagen.nn import build_unet

    assert sha(tuned["base"]) == tuned["sha"]
    stage, base, _ = read_stage(tuned["base"])
    _, merged, _ = read_stage(tuned["out"] / "base64" / "model.pt")
    adapters = load_file(tuned["out"] / "adapter" / "adapter_model.safetensors")
    assert adapters and all("lora_" in k for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)
    net = build_unet(stage.model)
    net.load_state_dict(base)
    targets = lora_targets(net)
    again = PeftModel.from_pretrained(net, tuned["out"] / "adapter").merge_and_unload()
    for k, v in again.state_dict().items():
        torch.testing.assert_close(merged[k], v)
    adapted = {f"{t}.weight" for t in targets}
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and changed <= adapted, changed - adapted


def test_sample_loads_the_result_and_draws_other_images(tuned, one_thread) -> None:
    from imagen.mlops.client import tracking_uri
    from imagen.mlops.registry import load_cascade

    prompt = ["a red star in the center on a light background"]
    base = load_cascade(tuned["params"].models_dir, depth="base64").generate(prompt, seed=3)
    folder = load_cascade(tuned["out"], depth="sr256").generate(prompt, seed=3)  # sr256 copied
    assert not torch.allclose(base["base64"], folder["base64"], atol=1e-3)
    uri = tracking_uri(tuned["params"])
    registered = load_cascade("models:/imagen-base64@lora", depth="base64", tracking_uri=uri)
    again = registered.generate(prompt, seed=3)
    torch.testing.assert_close(again["base64"], folder["base64"])


def _run(root: Path, images: Path, capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setenv("IMAGEN_THREADS", str(CORES))
    monkeypatch.chdir(root)
    rc = cli_main(["finetune", "--images", str(images), "--no-register"])
    return rc, capsys.readouterr().err


def test_a_bad_images_folder_is_a_clear_error(tmp_path, capsys, monkeypatch) -> None:
    stages = ("base64",)
    make_tiny_cascade(tmp_path, stages)
    write_params(shrink(tmp_path, stages=stages), tmp_path / "params.yaml")
    rc, err = _run(tmp_path, tmp_path / "nowhere", capsys, monkeypatch)
    assert rc == 2 and "--images" in err and "nowhere" in err and "not a folder" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = _run(tmp_path, empty, capsys, monkeypatch)
    assert rc == 2 and "empty" in err and "no image" in err
    pics = star_folder(tmp_path / "pics")
    Image.new("RGB", (32, 32)).save(pics / "uncaptioned.png")
    rc, err = _run(tmp_path, pics, capsys, monkeypatch)
    assert rc == 2 and "uncaptioned.png" in err and "no caption" in err
    assert not (tmp_path / "models" / "lora-pics").exists()  # nothing written
