"""`imagen evaluate`: real torchmetrics FID / CLIPScore on tiny local models, reports, MLflow."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import make_tiny_cascade
from torch import nn

from imagen.config import ConfigError, resolve_params
from imagen.evaluate import (
    AGREEMENT,
    FD_EMBEDDED,
    Alignment,
    Fidelity,
    best_tradeoff,
    evaluate,
    load_holdout,
)


# --------------------------------------------------------------------------- tiny models
def write_tiny_clip(folder: Path) -> Path:
    """A randomly initialised CLIP saved like a downloaded one: model, BPE tokenizer, processor.

    The tokenizer's vocabulary is the 256 byte symbols (with and without the end-of-word mark)
    and no merges, so it tokenises any text without downloaded files.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.clip import CLIPImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    symbols = sorted(set(bytes_to_unicode().values()))
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=128,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


class TinyFeatures(nn.Module):
    """A fixed random conv feature extractor for uint8 images (the FID ``feature`` module)."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 127.5 - 1).flatten(1)


def _images(seed: int, n: int = 32, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


# --------------------------------------------------------------------------- metrics
def test_frechet_distance_through_torchmetrics_with_a_feature_net() -> None:
    fid = Fidelity(feature=TinyFeatures())
    real = _images(0)
    fid.set_real(real)
    same = fid.compute(real)
    shifted = fid.compute((real.float() * 0.3).to(torch.uint8))  # darker images
    assert abs(same) < 1e-3
    assert shifted > 0.1
    assert fid.compute(real) == pytest.approx(same, abs=1e-6)  # real stats kept across scales


def test_fd_embedded_is_named_as_not_fid() -> None:
    fd = Fidelity()  # the embedded evaluator's features
    assert fd.name == FD_EMBEDDED and "not FID" in fd.label
    from imagen.data.holdout import pil_to_uint8 as _pil_to_uint8
    from imagen.embedded.dataset import EmbeddedDataset

    data = EmbeddedDataset(24, size=32, split="holdout")
    real = torch.stack([_pil_to_uint8(x["image"], 32) for x in data])
    fd.set_real(real)
    assert fd.compute(real) < 1e-3
    assert fd.compute(torch.full_like(real, 128)) > 1.0  # flat grey is far from the scenes


def test_inception_path_without_torch_fidelity_says_how_to_install(tmp_path: Path) -> None:
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if _TORCH_FIDELITY_AVAILABLE:
        pytest.skip("torch-fidelity is installed here")
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"pip install 'imagen-cascade\[inception\]'"):
        Fidelity(str(weights))
    with pytest.raises(ConfigError, match="does not exist"):
        Fidelity(str(tmp_path / "missing.pth"))


def test_clip_score_through_torchmetrics_with_a_local_tiny_clip(tmp_path: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    folder = write_tiny_clip(tmp_path / "clip")
    align = Alignment(str(folder))
    assert align.name == "clip_score"
    images = _images(2, n=4, size=40)
    captions = ["a red circle", "a blue square on the left", "green", "a small yellow diamond"]
    attrs = [{"color": "red", "shape": "circle"}, {}, {"color": "green"}, {"size": "small"}]
    got = align.compute(images, captions, attrs)
    # the same numbers computed by hand with the same model
    model, proc = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pix = proc(images=list(images), return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pix).pooler_output
        tok = proc(text=captions, return_tensors="pt", padding=True)
        txt = model.get_text_features(**tok).pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt)
    assert got["clip_score"] == pytest.approx(float((100 * cos).clamp_min(0).mean()), abs=1e-3)
    assert AGREEMENT in got and "agreement_color" in got  # embedded agreement reported too
    with pytest.raises(ConfigError, match="clip_path"):
        Alignment(str(tmp_path / "nothing-here"))


def test_best_tradeoff_keeps_fidelity_near_the_best() -> None:
    """The demo's old rule picked w=6 at 1.7x the lowest distance; the pick now stays within
    the tolerance of the lowest distance and takes the best alignment there."""
    rows = [
        {"guidance_scale": 1.0, "fd": 5.0, "agree": 0.50},
        {"guidance_scale": 3.0, "fd": 6.0, "agree": 0.78},
        {"guidance_scale": 5.0, "fd": 9.0, "agree": 0.80},
        {"guidance_scale": 7.0, "fd": 12.0, "agree": 0.79},
    ]
    best = best_tradeoff(rows, "fd", "agree", 0.25)  # fd <= 6.25: w=1, 3 -> best agreement w=3
    assert best["guidance_scale"] == 3.0 and best["eligible_scales"] == [1.0, 3.0]
    assert "6.25" in best["rule"]
    assert best_tradeoff(rows, "fd", "agree", 0.0)["guidance_scale"] == 1.0  # lowest distance
    assert best_tradeoff(rows, "fd", "agree", 10.0)["guidance_scale"] == 5.0  # best alignment


# --------------------------------------------------------------------------- held-out data
def test_holdout_from_ingest_shards(tmp_path: Path) -> None:
    import webdataset as wds

    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "holdout-000000.tar")) as sink:
        for i, (color, caption) in enumerate([("red", "a small red square"), ("blue", "x")]):
            buf = io.BytesIO()
            Image.new("RGB", (48, 48), color).save(buf, format="PNG")
            meta = {"attributes": {"color": color}} if i == 0 else {}
            sink.write({"__key__": f"h{i}", "png": buf.getvalue(), "txt": caption, "json": meta})
    params = resolve_params({"stages": {"base64": {}}, "data": {"shards_dir": str(shards)}})
    with pytest.warns(UserWarning, match="only 2 held-out samples"):
        held = load_holdout(params, 5, 16)
    assert held.captions == ["a small red square", "x"]
    assert held.attributes[0] == {"color": "red"}  # from the shard's json
    assert held.images.shape == (2, 3, 16, 16) and held.images.dtype == torch.uint8
    assert held.images[1, 2].float().mean() > 200  # blue
    assert "holdout shard" in held.source


# --------------------------------------------------------------------------- the stage
@pytest.mark.slow
def test_evaluate_writes_reports_logs_to_mlflow_and_registers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("IMAGEN_PROGRESS_SECONDS", "0.001")  # a line each batch (not a terminal)

    evaluate_cfg = {
        "guidance_scales": [1, 4],
        "num_images": 8,
        "batch_size": 8,
        "steps": 2,
        "grid_images": 4,
        "cascade_prompts": 2,
        "cascade_steps": 1,
        "sr_pairs": 2,
        "sr_tiles": 0,
        # autoguidance beside CFG, the guide being the base model itself: every scale then
        # gives the base model's own samples, i.e. CFG's w = 1 row exactly
        "guide": str(tmp_path / "models" / "base64" / "model.pt"),
        "guide_scales": [1, 3],
    }
    params = make_tiny_cascade(tmp_path, overrides={"evaluate": evaluate_cfg})
    metrics = evaluate(params, log=None)
    # 2 scales + the untrained reference + 2 autoguidance scales, 8 images each, batches of 8
    lines = re.findall(
        r"imagen evaluate: (\d+)/40 image, [\d.]+ image/s, \dm\d\ds left", capsys.readouterr().err
    )
    assert lines == ["8", "16", "24", "32", "40"]
    reports = Path(params.evaluate.reports_dir)
    saved = json.loads((reports / "metrics.json").read_text())
    assert saved["fidelity_metric"] == FD_EMBEDDED and saved["alignment_metric"] == AGREEMENT
    assert [r["guidance_scale"] for r in saved["scales"]] == [1.0, 4.0]
    auto = saved["autoguidance"]["scales"]
    assert [r["guidance_scale"] for r in auto] == [1.0, 3.0]
    for r in auto:  # the same images (FD's matrix square root of 8 samples is not bitwise)
        assert r["sharpness"] == saved["scales"][0]["sharpness"]
        assert r[AGREEMENT] == saved["scales"][0][AGREEMENT]
        assert r[FD_EMBEDDED] == pytest.approx(saved["scales"][0][FD_EMBEDDED], rel=0.01)
    # residual sampling noise shows as sharpness well above the real images' (1.0)
    assert all(r["sharpness"] > 0 for r in saved["scales"])
    assert saved["best"]["guidance_scale"] in (1.0, 4.0) and "rule" in saved["best"]
    assert saved["registered"]["imagen-cascade"] == "1"
    assert metrics["cascade"]["stages"] == ["base64", "sr256", "sr1024"]
    # the untrained reference: the same metrics for a freshly initialised base UNet
    assert set(saved["untrained"]) >= {FD_EMBEDDED, AGREEMENT}
    # each SR stage against bicubic upsampling of the same real low-res inputs, with a picture
    for name in ("sr256", "sr1024"):
        sr, stage = saved[name], params.stages[name]
        assert (sr["input_resolution"], sr["resolution"]) == (stage.lowres, stage.resolution)
        assert sr["pairs"] == 2
        for kind in ("sr", "bicubic"):
            assert set(sr[kind]) == {"psnr", FD_EMBEDDED, "sharpness"}
            assert sr[kind]["psnr"] > 0 and sr[kind]["sharpness"] > 0
        assert set(sr["sr_beats_bicubic"]) == {"psnr", FD_EMBEDDED}
        # the fidelity features see native-resolution tiles (the toy stages are under 64 px)
        assert sr["fidelity_tiles"] == f"2 tiles of {stage.resolution} px"
        # 4 views and 3 zoomed crops, 256 px high each
        assert Image.open(reports / f"sr_{name}.png").size[0] > 7 * 256
    assert saved["untrained"][FD_EMBEDDED] > 0
    rows = list(csv.reader((reports / "fid_clip.csv").open()))
    assert rows[0] == ["guidance_scale", "fidelity", "alignment", FD_EMBEDDED, AGREEMENT]
    assert len(rows) == 3
    assert "FID" not in rows[0]
    grids = ("grids/scale_1.png", "grids/scale_4.png", "grids/auto_3.png")
    for name in ("fid_clip.png", "cascade.png", *grids):
        assert Image.open(reports / name).size[0] > 100
    client = MlflowClient(params.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("test")
    (run,) = client.search_runs([exp.experiment_id], "tags.`imagen.stage` = 'evaluate'")
    assert run.info.status == "FINISHED"
    assert "best_fd_embedded" in run.data.metrics
    assert f"untrained_{FD_EMBEDDED}" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, FD_EMBEDDED)
    assert len(history) == 2
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert "reports/metrics.json" in arts and "reports/fid_clip.png" in arts
    mv = client.get_model_version_by_alias("imagen-base64", "champion")
    assert mv.run_id == run.info.run_id


def test_sr_tiles_and_detail_window() -> None:
    from imagen.evaluate.sr import detail_window, pairs_for, tiles

    # enough pairs for 256 tiles of 64 px: 16 pictures at 256 px, the minimum at 1024 px
    assert (pairs_for(256, 4, 256), pairs_for(1024, 4, 256), pairs_for(32, 2, 0)) == (16, 4, 2)
    images = torch.arange(2 * 3 * 128 * 128, dtype=torch.float32).reshape(2, 3, 128, 128)
    t = tiles(images, 64)
    assert t.shape == (8, 3, 64, 64)
    assert torch.equal(t[1], images[0, :, :64, 64:]) and torch.equal(t[6], images[1, :, 64:, :64])
    with pytest.raises(ValueError, match="do not split"):
        tiles(images[..., :100], 64)
    real, baseline = torch.zeros(3, 128, 128), torch.zeros(3, 128, 128)
    real[:, 70:90, 90:110] = 1.0  # the only place the baseline misses: a square
    _, rows, cols = detail_window(real, baseline, 32)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (64, 96, 80, 112)


def test_best_tradeoff_margin_prefers_fidelity_among_equal_alignments() -> None:
    """The demo's sweep: w=5 led agreement by .013 (noise on 32 captions) at 10% more FD than
    w=3. With a margin of .04 the agreements count as equal and the lower FD wins."""
    rows = [
        {"guidance_scale": 1.0, "fd": 650.0, "agree": 0.450},
        {"guidance_scale": 2.0, "fd": 575.0, "agree": 0.487},
        {"guidance_scale": 3.0, "fd": 556.0, "agree": 0.481},
        {"guidance_scale": 4.0, "fd": 563.0, "agree": 0.469},
        {"guidance_scale": 5.0, "fd": 614.0, "agree": 0.494},
    ]
    assert best_tradeoff(rows, "fd", "agree", 0.25)["guidance_scale"] == 5.0
    best = best_tradeoff(rows, "fd", "agree", 0.25, margin=0.04)
    assert best["guidance_scale"] == 3.0
    assert "within 0.04" in best["rule"]
    # a margin never admits a scale beyond the distance tolerance (w=1 is out at 0.1)
    assert best_tradeoff(rows, "fd", "agree", 0.1, margin=0.1)["guidance_scale"] == 3.0
