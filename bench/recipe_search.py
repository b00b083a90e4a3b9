"""Recipe search for the small base stage: which knobs make it follow captions fastest on a CPU.

Trains the project's own UNet (imagen.nn) with EDM (imagen.diffusion) on the embedded dataset
(rendered in memory at the search resolution, captions encoded once by a frozen random T5 from
imagen.text / imagen.text.vocab) in a plain PyTorch loop, for a wall-clock budget of training
time, and scores the EMA weights every ``--eval-every`` minutes on held-out captions with the
analytic evaluator (imagen.embedded.evaluator): per-attribute correctness, agreement and a Frechet
distance of evaluator features to real held-out images. Evaluation time is not counted as
training time. Results go to ``bench/results/recipe_<config>.json``.

    python bench/recipe_search.py --config word --minutes 6
    python bench/recipe_search.py --report   # docs/recipe.png + the markdown table
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from imagen.config import ConditioningConfig, ModelConfig, SamplingConfig
from imagen.diffusion import build_denoiser, drop_mask, sample
from imagen.embedded.dataset import ATTRIBUTES, EmbeddedDataset, attributes
from imagen.embedded.evaluator import EmbeddedEvaluator
from imagen.nn import build_unet, count_parameters
from imagen.text import build_default_encoder, load_text_encoder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@dataclass
class Recipe:
    """Everything a probe varies; the defaults are the feasibility run's setting."""

    resolution: int = 32
    embed_dim: int = 24  # UNet width (~2.4M parameters at 32 px)
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    num_res_blocks: int = 1
    attention_type: str = "fused"
    attention_resolutions: list[int] = field(default_factory=lambda: [8, 16])
    num_attn_heads: int = 2
    per_head_channels: int = 32
    cond_dim: int = 128
    tokenizer: str = "byt5"  # byt5 | word
    token_length: int = 64
    text_dim: int = 128
    text_layers: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "constant"  # constant | cosine (over the time budget, to 10%)
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    drop_rate: float = 0.1
    p_mean: float = -1.2
    p_std: float = 1.2
    guidance: float = 3.0
    num_train: int = 4096
    # departures from NeMo's computation (README "Differences from NeMo"); NeMo's by default
    noise_cond_scale: float = 1.0
    masked_pooling: bool = False
    context_norm: str = "group"


# Probe configurations: overrides of Recipe.
CONFIGS: dict[str, dict] = {
    "baseline": {},
    "bytes128": {"token_length": 128},
    "word": {"tokenizer": "word", "token_length": 24},
    "word_ema": {"tokenizer": "word", "token_length": 24, "ema_decay": 0.995, "lr": 2e-3},
    "word_attn": {
        "tokenizer": "word",
        "token_length": 24,
        "ema_decay": 0.995,
        "lr": 2e-3,
        "attention_resolutions": [4, 8, 16],
        "cond_dim": 256,
    },
    "word_best": {
        "tokenizer": "word",
        "token_length": 24,
        "ema_decay": 0.995,
        "lr": 2e-3,
        "attention_resolutions": [4, 8, 16],
    },
    "word_cross": {
        "tokenizer": "word",
        "token_length": 24,
        "ema_decay": 0.995,
        "lr": 2e-3,
        "attention_type": "cross",
        "attention_resolutions": [4, 8, 16],
    },
    "word_wide": {
        "tokenizer": "word",
        "token_length": 24,
        "ema_decay": 0.995,
        "lr": 2e-3,
        "embed_dim": 32,
    },
    "word_narrow": {
        "tokenizer": "word",
        "token_length": 24,
        "ema_decay": 0.995,
        "lr": 2e-3,
        "embed_dim": 16,
        "batch_size": 64,
    },
    "word_1layer": {
        "tokenizer": "word",
        "token_length": 24,
        "ema_decay": 0.995,
        "lr": 2e-3,
        "text_layers": 1,
    },
    "word_64": {
        "tokenizer": "word",
        "token_length": 24,
        "ema_decay": 0.995,
        "lr": 2e-3,
        "resolution": 64,
        "attention_resolutions": [8, 16],
    },
    "word_cosine": {
        "tokenizer": "word",
        "token_length": 24,
        "ema_decay": 0.995,
        "lr": 3e-3,
        "schedule": "cosine",
    },
}


def recipe_for(name: str, overrides: dict | None = None) -> Recipe:
    """The Recipe of configuration ``name`` (plus extra overrides)."""
    if name not in CONFIGS:
        raise SystemExit(f"--config: unknown {name!r}; allowed: {sorted(CONFIGS)}")
    return dataclasses.replace(Recipe(), **(CONFIGS[name] | (overrides or {})))


def model_config(r: Recipe) -> ModelConfig:
    """The stage's ModelConfig (the same keys params.yaml sets)."""
    return ModelConfig.model_validate(
        {
            "unet_type": "base",
            "unet": dict(
                embed_dim=r.embed_dim,
                image_size=r.resolution,
                channel_mult=r.channel_mult,
                num_res_blocks=r.num_res_blocks,
                num_attn_heads=r.num_attn_heads,
                per_head_channels=r.per_head_channels,
                cond_dim=r.cond_dim,
                attention_type=r.attention_type,
                attention_resolutions=r.attention_resolutions,
                noise_cond_scale=r.noise_cond_scale,
                masked_pooling=r.masked_pooling,
                context_norm=r.context_norm,
            ),
            "conditioning": conditioning(r, "unused"),
            "preconditioning_type": "EDM",
            "preconditioning": dict(p_mean=r.p_mean, p_std=r.p_std),
        }
    )


def conditioning(r: Recipe, path: str) -> ConditioningConfig:
    return ConditioningConfig(
        embed_dim=r.text_dim,
        token_length=r.token_length,
        drop_rate=r.drop_rate,
        encoder_path=path,
        encoder=dict(
            d_model=r.text_dim,
            num_layers=r.text_layers,
            num_heads=4,
            d_ff=512,
            tokenizer=r.tokenizer,
        ),
    )


def encode_captions(r: Recipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (embeds (N, L, D), mask (N, L)) with a freshly built frozen encoder."""
    digest = hashlib.sha1("\n".join(captions).encode()).hexdigest()[:12]
    key = f"txt-{r.tokenizer}-{r.text_dim}-{r.text_layers}-{r.token_length}-{digest}"
    return cached(key, lambda: _encode(r, captions))


def _encode(r: Recipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    folder = Path(tempfile.mkdtemp(prefix="recipe-enc-")) / "encoder"
    cond = conditioning(r, str(folder))
    try:
        build_default_encoder(cond, folder)  # ByT5 or word tokenizer, per cond.encoder
        enc = load_text_encoder(cond)
        parts = [enc.encode(captions[i : i + 256]) for i in range(0, len(captions), 256)]
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


CACHE = Path(tempfile.gettempdir()) / "imagen-recipe-cache"


def cached(key: str, build):
    """``build()``, memoised on disk under the system temp folder (probes share it)."""
    path = CACHE / f"{key}.pt"
    if path.exists():
        return torch.load(path)
    value = build()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)
    return value


def render(data: EmbeddedDataset) -> torch.Tensor:
    """All images of ``data`` as (N, 3, H, W) float32 in [-1, 1] (cached)."""
    key = f"img-{data.split}-{data.seed}-{data.num}-{data.size}"
    return cached(key, lambda: _render(data))


def _render(data: EmbeddedDataset) -> torch.Tensor:
    arr = np.stack([np.asarray(data[i]["image"], dtype=np.float32) for i in range(len(data))])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017)."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a64.mean(0), b64.mean(0)
    s1, s2 = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    # FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


class Scorer:
    """Held-out captions, their encodings, the real-image features, and the evaluator."""

    def __init__(self, r: Recipe, num: int, steps: int) -> None:
        data = EmbeddedDataset(num, seed=0, size=r.resolution, split="holdout")
        self.captions = [data.caption(i) for i in range(num)]
        self.attrs = [attributes(data.scene(i)) for i in range(num)]
        self.embeds, self.mask = encode_captions(r, self.captions)
        self.evaluator = EmbeddedEvaluator()
        self.real = self.evaluator.features(render(data))
        self.steps, self.r = steps, r

    @torch.no_grad()
    def __call__(self, denoiser: torch.nn.Module, guidance: float) -> dict[str, float]:
        t0 = time.perf_counter()
        sampling = SamplingConfig(sampler="heun", steps=self.steps, guidance_scale=guidance)
        images = []
        for i in range(0, len(self.captions), 64):
            cond = {"text_embed": self.embeds[i : i + 64], "text_mask": self.mask[i : i + 64]}
            shape = (cond["text_embed"].shape[0], 3, self.r.resolution, self.r.resolution)
            images.append(sample(denoiser, shape, cond, sampling, seed=1234 + i))
        x = torch.cat(images).clamp(-1, 1)
        scores = self.evaluator.score(x, self.attrs)
        out = {k: float(v.nanmean()) for k, v in scores.items()}
        out["fd"] = frechet(self.evaluator.features(x), self.real)
        out["eval_s"] = time.perf_counter() - t0
        return out


def lr_factor(r: Recipe, step: int, frac: float) -> float:
    """Linear warm-up, then constant or a cosine over the time budget down to 10%."""
    warm = min(1.0, (step + 1) / max(1, r.warmup_steps))
    if r.schedule == "cosine":
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
    return warm


def run(name: str, r: Recipe, minutes: float, eval_every: float, args) -> dict:
    torch.manual_seed(0)
    t_setup = time.perf_counter()
    train = EmbeddedDataset(r.num_train, seed=0, size=r.resolution, split="train")
    images = render(train)
    embeds, mask = encode_captions(r, [train.caption(i) for i in range(len(train))])
    scorer = Scorer(r, args.num_eval, args.steps)
    mc = model_config(r)
    net = build_unet(mc)
    denoiser = build_denoiser(mc, net)
    # One EMA copy per decay: the recipe's, plus --ema-sweep ones scored at the end.
    decays = [r.ema_decay] + [d for d in args.ema_sweep if d != r.ema_decay]
    ema_nets = []
    for _ in decays:
        copy = build_unet(mc).requires_grad_(False)
        copy.load_state_dict(net.state_dict())
        ema_nets.append(copy)
    ema = build_denoiser(mc, ema_nets[0]).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    print(
        f"[{name}] {count_parameters(net) / 1e6:.2f}M params, setup "
        f"{time.perf_counter() - t_setup:.0f}s, recipe {dataclasses.asdict(r)}",
        flush=True,
    )
    log = {
        "config": name,
        "recipe": dataclasses.asdict(r),
        "params": count_parameters(net),
        "threads": torch.get_num_threads(),
        "checkpoints": [],
    }
    if args.eval_untrained:
        log["untrained"] = scorer(ema, r.guidance)
        print(f"[{name}] untrained {log['untrained']}", flush=True)
    gen = torch.Generator().manual_seed(0)
    budget, train_s, step, next_eval = minutes * 60, 0.0, 0, eval_every * 60
    losses: list[float] = []
    params = list(net.parameters())
    while train_s < budget:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(images), (r.batch_size,), generator=gen)
        drop = drop_mask(r.batch_size, r.drop_rate, gen)
        cond = {"text_embed": embeds[idx], "text_mask": mask[idx], "drop_text": drop}
        for g in opt.param_groups:
            g["lr"] = r.lr * lr_factor(r, step, train_s / budget)
        loss = denoiser.loss(images[idx], cond, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # EMA: w_ema <- d w_ema + (1 - d) w, with the usual warm-up min(d, (1+n)/(10+n))
        with torch.no_grad():
            for decay, copy in zip(decays, ema_nets, strict=True):
                d = min(decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(list(copy.parameters()), params, 1 - d)
        step += 1
        train_s += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if train_s >= next_eval or train_s >= budget:
            next_eval += eval_every * 60
            point = {
                "minutes": train_s / 60,
                "steps": step,
                "images": step * r.batch_size,
                "img_per_s": step * r.batch_size / train_s,
                "loss": float(np.mean(losses[-200:])),
            }
            point |= scorer(ema, r.guidance)
            log["checkpoints"].append(point)
            print(f"[{name}] " + " ".join(f"{k}={v:.3g}" for k, v in point.items()), flush=True)
            write(name, log, args)
    if len(decays) > 1 or args.raw:
        sweep = {
            str(d): scorer(build_denoiser(mc, c).eval(), r.guidance)
            for d, c in zip(decays[1:], ema_nets[1:], strict=True)
        }
        if args.raw:
            sweep["raw"] = scorer(denoiser.eval(), r.guidance)
        log["ema_sweep"] = sweep
        print(f"[{name}] ema {sweep}", flush=True)
    if args.guidances:
        log["guidance_sweep"] = {str(g): scorer(ema, g) for g in args.guidances}
        print(f"[{name}] guidance {log['guidance_sweep']}", flush=True)
    write(name, log, args)
    return log


def write(name: str, log: dict, args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"recipe_{name}{args.tag}.json"
    path.write_text(json.dumps(log, indent=1) + "\n")


def report(out_png: Path) -> str:
    """Plot agreement vs training minutes for every result file; return a markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("recipe_*.json"))]
    fig, ax = plt.subplots(figsize=(8, 5))
    header = (
        "| run | params | img/s | min | steps | " + " | ".join(ATTRIBUTES) + " | agreement | FD |"
    )
    rows = [header, "|" + "---|" * (7 + len(ATTRIBUTES))]
    for p, log in zip(sorted(RESULTS.glob("recipe_*.json")), logs, strict=True):
        pts = log["checkpoints"]
        if not pts:
            continue
        label = p.stem.removeprefix("recipe_")
        ax.plot([c["minutes"] for c in pts], [c["agreement"] for c in pts], "o-", label=label)
        for c in pts:
            rows.append(
                f"| {label} | {log['params'] / 1e6:.2f}M | {c['img_per_s']:.0f} | "
                f"{c['minutes']:.1f} | {c['steps']} | "
                + " | ".join(f"{c[a]:.2f}" for a in ATTRIBUTES)
                + f" | **{c['agreement']:.3f}** | {c['fd']:.1f} |"
            )
    chance = float(np.mean([1 / len(v) for v in ATTRIBUTES.values()]))
    ax.axhline(chance, color="grey", ls=":", label="chance")
    ax.set_ylim(0.25, max(0.6, ax.get_ylim()[1]))
    ax.set_xlabel("training minutes (2 shared CPU cores, 1 thread per run)")
    ax.set_ylabel("caption agreement (held-out captions)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return "\n".join(rows)


def text_probe(num_train: int = 4096, num_test: int = 512) -> dict[str, dict[str, float]]:
    """How readable each attribute is from a frozen encoder's masked-mean-pooled caption
    features: held-out accuracy of a ridge-regression one-vs-rest read-out (no UNet)."""
    train = EmbeddedDataset(num_train, seed=0, split="train")
    test = EmbeddedDataset(num_test, seed=0, split="holdout")
    sets = [(d, [d.caption(i) for i in range(len(d))]) for d in (train, test)]
    out: dict[str, dict[str, float]] = {}
    variants = {
        "byt5, 64 tokens": {"token_length": 64},
        "byt5, 128 tokens": {"token_length": 128},
        "word, 24 tokens": {"tokenizer": "word", "token_length": 24},
    }
    for label, over in variants.items():
        r = dataclasses.replace(Recipe(), **over)
        feats = []
        for _, caps in sets:
            e, m = encode_captions(r, caps)
            feats.append(e.sum(1) / m.sum(1, keepdim=True))  # (N, D) masked mean
        x_tr, x_te = (torch.cat([f, torch.ones(len(f), 1)], 1).double() for f in feats)
        row: dict[str, float] = {}
        for name, values in ATTRIBUTES.items():
            labels = [
                torch.tensor([values.index(attributes(d.scene(i))[name]) for i in range(len(d))])
                for d, _ in sets
            ]
            y = torch.nn.functional.one_hot(labels[0], len(values)).double()
            eye = torch.eye(x_tr.shape[1], dtype=torch.float64)
            w = torch.linalg.solve(x_tr.T @ x_tr + 1e-2 * eye, x_tr.T @ y)
            row[name] = float(((x_te @ w).argmax(1) == labels[1]).double().mean())
        row["truncated"] = float(
            np.mean([len(c.encode()) + 1 > r.token_length for c in sets[1][1]])
            if r.tokenizer == "byt5"
            else 0.0
        )
        out[label] = row
        print(label, {k: round(v, 3) for k, v in row.items()}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="baseline", help=f"one of {sorted(CONFIGS)}")
    ap.add_argument("--minutes", type=float, default=6.0, help="training time budget")
    ap.add_argument("--eval-every", type=float, default=2.0, help="minutes between evaluations")
    ap.add_argument("--num-eval", type=int, default=48, help="held-out captions scored")
    ap.add_argument("--steps", type=int, default=8, help="Heun steps when scoring")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-untrained", action="store_true", help="score step 0 too")
    ap.add_argument("--guidances", type=float, nargs="*", default=[], help="final sweep")
    ap.add_argument("--ema-sweep", type=float, nargs="*", default=[], help="extra EMA decays")
    ap.add_argument("--raw", action="store_true", help="score the raw weights at the end")
    ap.add_argument("--tag", default="", help="suffix of the result file")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="recipe overrides")
    ap.add_argument("--text-probe", action="store_true", help="attribute read-out per tokenizer")
    ap.add_argument("--report", action="store_true", help="plot + table from bench/results")
    args = ap.parse_args()
    if args.text_probe:
        torch.set_num_threads(args.threads)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "text_probe.json").write_text(json.dumps(text_probe(), indent=1) + "\n")
        return
    if args.report:
        print(report(ROOT / "docs" / "recipe.png"))
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    run(args.config, recipe_for(args.config, overrides), args.minutes, args.eval_every, args)


if __name__ == "__main__":
    main()
