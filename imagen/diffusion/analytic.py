"""Gaussian-mixture data with its exact denoiser: ground truth for the samplers.

For data x0 ~ sum_k w_k N(mu_k, Sigma_k) and x = x0 + sigma eps, the noisy marginal is
sum_k w_k N(mu_k, Sigma_k + sigma^2 I) and the ideal denoiser is known in closed form:

    E[x0 | x] = sum_k r_k(x) (mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)),

with r_k(x) the posterior probability of component k. For a single Gaussian the probability-flow
ODE also has a closed-form solution (:meth:`GaussianMixture.ode_solution`). Tests and the sampler
benchmark drive every sampler with this denoiser; :func:`exact_net` turns it into the network a
preconditioning would need, so the preconditionings themselves are exercised too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from imagen.diffusion.denoiser import DDPMDenoiser, Denoiser, EDMDenoiser, batch_sigma


class GaussianMixture:
    """Weights (K,), means (K, d), covariances (K, d, d) of a d-dimensional Gaussian mixture."""

    def __init__(
        self,
        weights: Sequence[float] | torch.Tensor,
        means: torch.Tensor,
        covs: torch.Tensor,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.weights = torch.as_tensor(weights, dtype=dtype)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=dtype)
        self.covs = torch.as_tensor(covs, dtype=dtype)
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError("weights (K,), means (K, d) and covs (K, d, d) must agree")
        self.evals, self.evecs = torch.linalg.eigh(self.covs)  # Sigma_k = U diag(l) U^T
        if bool((self.evals <= 0).any()):
            raise ValueError("covariances must be positive definite")

    @classmethod
    def gaussian(cls, mean: torch.Tensor, cov: torch.Tensor) -> GaussianMixture:
        return cls([1.0], mean[None], cov[None])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    @property
    def cov(self) -> torch.Tensor:
        """Total covariance: sum_k w_k (Sigma_k + mu_k mu_k^T) - mu mu^T."""
        second = torch.einsum("k,kij->ij", self.weights, self.covs)
        second = second + torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        return second - torch.outer(self.mean, self.mean)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, d) exact samples."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        scale = self.evecs[comp] * self.evals[comp].sqrt()[:, None, :]  # U diag(sqrt l)
        return self.means[comp] + torch.einsum("nij,nj->ni", scale, z)

    def _posterior(self, x: torch.Tensor, sigma: torch.Tensor | float):
        """Per component k: log N(x; mu_k, Sigma_k + sigma^2 I) + log w_k (n, K) and
        E[x0 | x, k] (n, K, d)."""
        s2 = batch_sigma(sigma, x)[:, None] ** 2  # (n, 1)
        log_p, means = [], []
        for k in range(self.means.shape[0]):
            u, lam = self.evecs[k], self.evals[k]
            var = lam[None] + s2  # (n, d): eigenvalues of Sigma_k + sigma^2 I
            y = (x - self.means[k]) @ u  # eigen-coordinates of x - mu_k
            log_p.append(
                -0.5 * ((y**2 / var).sum(1) + var.log().sum(1) + self.dim * math.log(2 * math.pi))
                + self.weights[k].log()
            )
            # mu_k + U diag(l / (l + sigma^2)) U^T (x - mu_k)
            means.append(self.means[k] + (y * lam / var) @ u.T)
        return torch.stack(log_p, 1), torch.stack(means, 1)

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """(n, K) posterior component probabilities of noisy points x at level sigma."""
        log_p, _ = self._posterior(x.to(self.means.dtype), sigma)
        return torch.softmax(log_p, dim=1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """E[x0 | x0 + sigma eps = x] for x of shape (n, d); sigma scalar or (n,)."""
        log_p, means = self._posterior(x.to(self.means.dtype), sigma)
        if means.shape[1] == 1:
            return means[:, 0].to(x.dtype)
        r = torch.softmax(log_p, dim=1)  # (n, K)
        return (r[:, :, None] * means).sum(1).to(x.dtype)

    __call__ = denoise

    def ode_solution(self, x_T: torch.Tensor, sigma_T: float) -> torch.Tensor:
        """Exact probability-flow ODE endpoint at sigma = 0 from x_T at sigma_T (one Gaussian).

        In the eigenbasis of Sigma, dy/dsigma = sigma y / (l + sigma^2), so
        y(0) = y(sigma_T) sqrt(l / (l + sigma_T^2)).
        """
        if self.means.shape[0] != 1:
            raise ValueError("the closed-form ODE solution exists for a single Gaussian only")
        u, lam, mu = self.evecs[0], self.evals[0], self.means[0]
        y = (x_T.to(mu.dtype) - mu) @ u
        return (mu + (y * (lam / (lam + sigma_T**2)).sqrt()) @ u.T).to(x_T.dtype)


class _ExactNet(torch.nn.Module):
    """The network output that makes a preconditioning reproduce ``target`` exactly."""

    def __init__(self, target: GaussianMixture, kind: str, objective: str, sigma_data: float):
        super().__init__()
        self.target, self.kind, self.objective = target, kind, objective
        self.sigma_data = sigma_data
        self.calls = 0

    def forward(self, x_in: torch.Tensor, noise_cond: torch.Tensor, **cond) -> torch.Tensor:
        self.calls += 1
        if self.kind == "edm":
            sigma = torch.exp(4 * noise_cond)[:, None]  # EDM: noise_cond = ln(sigma) / 4
        else:
            sigma = torch.exp(-0.5 * noise_cond)[:, None]  # DDPM: noise_cond = log-SNR
        sd = self.sigma_data
        if self.kind == "edm":
            x = x_in * (sigma**2 + sd**2).sqrt()  # undo c_in
            D = self.target.denoise(x, sigma[:, 0])
            c_skip = sd**2 / (sigma**2 + sd**2)
            c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
            return (D - c_skip * x) / c_out
        alpha = 1 / (1 + sigma**2).sqrt()  # variance preserving: x_vp = alpha x
        s = sigma * alpha
        x = x_in / alpha
        D = self.target.denoise(x, sigma[:, 0])
        eps = (x - D) / sigma
        return {"noise": eps, "x_start": D, "v": alpha * eps - s * D}[self.objective]


def exact_net(target: GaussianMixture, denoiser_cls: type[Denoiser], **kw) -> Denoiser:
    """A ``denoiser_cls`` (EDMDenoiser / DDPMDenoiser) around the network that is exact for
    ``target``: its forward equals ``target.denoise`` up to rounding. ``kw`` go to the denoiser
    (``config=``)."""
    if issubclass(denoiser_cls, EDMDenoiser):
        den = denoiser_cls(torch.nn.Identity(), **kw)
        den.net = _ExactNet(target, "edm", "", den.sigma_data)
    elif issubclass(denoiser_cls, DDPMDenoiser):
        den = denoiser_cls(torch.nn.Identity(), **kw)
        den.net = _ExactNet(target, "ddpm", den.config.pred_objective, 1.0)
    else:
        raise TypeError(f"no exact network for {denoiser_cls.__name__}")
    return den
