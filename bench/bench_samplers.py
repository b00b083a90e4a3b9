"""Quality per network evaluation of every sampler, against an exact Gaussian-mixture target.

The data is a 3-component Gaussian mixture in 4 dimensions (image-like scale, |x| ~ 1) whose
exact denoiser E[x0 | x_sigma] is known (imagen.diffusion.analytic), so the only error left is
the sampler's. For each sampler and budget of network evaluations (NFE) it prints

  W2    2-Wasserstein distance between Gaussian fits of the samples and of the true mixture
        (the finite-sample floor, exact samples of the same size, is printed first);
  ODE   (deterministic samplers) mean distance of each sample from the exact probability-flow
        ODE endpoint of its own x_T (an 800-step Heun solve).

ODE samplers (heun, euler, dpmpp_2m) use EDM's Karras schedule (sigma 0.002..80, rho 7);
ddim and ddpm use the continuous DDPM cosine schedule at uniform t, as a DDPM model would.

    .venv/bin/python bench/bench_samplers.py     # ~1 min on a busy 2-core CPU
"""

from __future__ import annotations

import time

import torch

from imagen.config import DDPMConfig
from imagen.diffusion import SAMPLERS, DDPMDenoiser, karras_sigmas
from imagen.diffusion.analytic import GaussianMixture

NFES = (10, 20, 35, 50, 100, 250)
ORDER = ("heun", "euler", "dpmpp_2m", "ddim", "ddpm")
N_SAMPLES = 8_000
F64 = torch.float64


def mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    means = 0.6 * torch.randn(3, 4, generator=g, dtype=F64)
    a = 0.25 * torch.randn(3, 4, 4, generator=g, dtype=F64)
    covs = a @ a.transpose(1, 2) + 0.01 * torch.eye(4, dtype=F64)
    return GaussianMixture([0.2, 0.3, 0.5], means, covs)


def sqrtm(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


def w2_gaussian(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """W2 between N(mean(x), cov(x)) and N(mean, cov) (Dowson & Landau 1982)."""
    m1, s1 = x.mean(0), torch.cov(x.T)
    r = sqrtm(cov)
    cross = sqrtm(r @ s1 @ r)
    d2 = (m1 - mean).pow(2).sum() + torch.trace(s1 + cov - 2 * cross)
    return float(d2.clamp_min(0).sqrt())


def steps_for(sampler: str, nfe: int) -> int:
    """Steps that fit the budget: Heun spends 2 evaluations a step but the last."""
    return max(1, (nfe + 1) // 2) if sampler == "heun" else nfe


def main() -> None:
    # The tensors are tiny (10k x 4): one thread avoids synchronisation costs on shared cores.
    torch.set_num_threads(1)
    start = time.perf_counter()
    target = mixture()
    ddpm_sigmas = DDPMDenoiser(torch.nn.Identity(), DDPMConfig(noise_schedule="cosine")).sigmas
    z = torch.randn(N_SAMPLES, 4, generator=torch.Generator().manual_seed(1), dtype=F64)

    def schedule(sampler: str, steps: int) -> torch.Tensor:
        if sampler in ("ddim", "ddpm"):
            return ddpm_sigmas(steps, dtype=F64)
        return karras_sigmas(steps, 0.002, 80.0, 7.0, dtype=F64)

    # exact ODE endpoints for each starting noise level (80 for Karras, the DDPM sigma_max)
    reference: dict[float, torch.Tensor] = {}
    for s_max in (80.0, float(ddpm_sigmas(1, dtype=F64)[0])):
        fine = karras_sigmas(800, 1e-4, s_max, 7.0, dtype=F64)
        reference[s_max] = SAMPLERS["heun"](target, z * s_max, fine)

    floor = w2_gaussian(
        target.sample(N_SAMPLES, torch.Generator().manual_seed(2)), target.mean, target.cov
    )
    print(f"Gaussian mixture: 3 components in 4 dims, {N_SAMPLES} samples per cell")
    print(f"W2 floor (exact samples, same n): {floor:.4f}")
    header = " ".join(f"{n:>13}" for n in NFES)
    print(f"{'sampler':<9}{'metric':<5}{header}")
    for sampler in ORDER:
        w2_row, ode_row = [], []
        for nfe in NFES:
            steps = steps_for(sampler, nfe)
            sigmas = schedule(sampler, steps)
            x_T = z * sigmas[0]
            opts = {"generator": torch.Generator().manual_seed(3)}
            out = SAMPLERS[sampler](target, x_T, sigmas, **opts)
            used = 2 * steps - 1 if sampler == "heun" else steps
            tag = f"({used})" if used != nfe else ""
            w2_row.append(f"{w2_gaussian(out, target.mean, target.cov):.4f}{tag}")
            if sampler != "ddpm":
                ref = reference[min(reference, key=lambda s: abs(s - float(sigmas[0])))]
                ode_row.append(f"{float((out - ref).norm(dim=1).mean()):.2e}")
        print(f"{sampler:<9}{'W2':<5}" + " ".join(f"{c:>13}" for c in w2_row))
        if ode_row:
            print(f"{'':<9}{'ODE':<5}" + " ".join(f"{c:>13}" for c in ode_row))
    print("NFE per column; (n) = evaluations actually used when the budget is odd for Heun.")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
