"""The natural expansion score eta = g^T (F + lambda I)^-1 g, computed exactly (SENN eq. for eta, SECNN sec. 3).

``g`` is the mean of the per-sample loss gradients over a batch of N samples and ``F`` the
empirical Fisher over the same samples, ``F = (1/N) sum_i g_i g_i^T = G^T G / N`` (G: the N x P
matrix of per-sample gradients). With the Woodbury identity and ``K = G G^T`` (N x N):

    eta = g^T (G^T G / N + lambda I)^-1 g = (1/N) 1^T K (K + N lambda I)^-1 1

so the cost is O(N P) for the gradients and O(N^3) for the solve; no P x P matrix is formed.

Relation to the papers: SENN (arXiv 2307.04526) defines eta = g^T F^-1 g with a Kronecker-factored
Fisher; SECNN (Appolinary, Deaconu, Yang, Li, arXiv 2401.05686, sec. 3) uses the empirical Fisher
and, to make it tractable, keeps only its diagonal: that score is :class:`DiagonalFisher`
(``eta = sum_j g_j^2 / (F_jj + lambda)``). :class:`FisherGram` keeps the whole empirical Fisher
(exact, through the N x N Gram matrix); neither carries an extra constant factor. The damping matters (see PAPERS.md, "a pitfall"): with N < P, eta -> 1 for
every model as lambda -> 0. K has at most N non-zero eigenvalues mu_i and
eta = (1/N) sum_i (1^T u_i)^2 mu_i / (mu_i + N lambda): only gradient directions whose
eigenvalue exceeds N lambda count. We therefore set lambda relative to the mean non-zero
eigenvalue of the Fisher, ``lambda = damping * trace(F) / N`` (``damping_mode="relative"``,
default): ``damping=0.1`` counts the directions carrying more than a tenth of the average
gradient energy, whatever the model size (a scale of trace(F)/P, the mean over all P
eigenvalues, would be ~P/N times too small for CNNs and give eta ~ 1 always). ``"absolute"``
uses ``damping`` as lambda. To compare a model with an expanded one, score both with the same
absolute lambda (:class:`FisherGram` does): adding parameters only adds to K, and
K -> K (K + c I)^-1 is operator-monotone, so the expanded score is never lower; growth
expands when the absolute increase (minus a size penalty) passes a threshold, not a ratio
(:mod:`nni_elastic.strategies.expansion_growth` says why).

Example:
    >>> eta = natural_expansion_score(model, x, y, damping=0.1)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

__all__ = ["natural_expansion_score", "per_sample_gradients", "FisherGram", "DiagonalFisher", "DAMPING_MODES"]

DAMPING_MODES = ("relative", "absolute")


def _check_inputs(inputs: torch.Tensor, targets: torch.Tensor, damping: float, damping_mode: str) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.shape[0] == 0:
        raise ValueError("inputs is an empty batch; the expansion score needs at least one sample (better: 32 or more)")
    if targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"inputs has {inputs.shape[0]} samples but targets has {targets.shape[0]}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
        raise ValueError(f"damping={damping!r} must be > 0 (the Fisher is singular when N < P)")
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"damping_mode={damping_mode!r} is not supported; use one of {DAMPING_MODES}")


@torch.no_grad()
def _check_labels(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Class labels the model's output cannot index fail inside vmap with a traceback: name them here."""
    classes = model(inputs[:1]).shape[-1]
    bad = targets[(targets < 0) | (targets >= classes)]
    if bad.numel():
        raise ValueError(f"targets holds label {int(bad[0])}, but the model has {classes} classes (labels 0..{classes - 1}); "
                         f"pass targets in that range or a model built with num_classes > {int(targets.max())}")


def per_sample_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    params: Optional[Sequence[str]] = None,
    chunk_size: Optional[int] = 32,
) -> torch.Tensor:
    """The N x P matrix of per-sample loss gradients (torch.func vmap over grad; BatchNorm in eval mode).

    Args:
        params: names of the parameters to differentiate (default: those requiring grad).
        chunk_size: samples per vmap chunk (bounds memory).
    """
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"params {unknown} are not parameters of the model")
    if not names:
        raise ValueError("no parameters to score: none requires grad and params= is empty")
    wrt = {n: named[n].detach() for n in names}
    const = {n: p.detach() for n, p in named.items() if n not in wrt}
    const.update(dict(model.named_buffers()))

    def loss_one(p: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**const, **p},), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    was_training = model.training
    model.eval()  # per-sample gradients need per-sample forwards: BatchNorm uses running statistics
    try:
        if loss_fn is F.cross_entropy and not targets.is_floating_point():
            _check_labels(model, inputs, targets)
        with torch.enable_grad():
            grads = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(wrt, inputs, targets)
    finally:
        model.train(was_training)
    n = inputs.shape[0]
    return torch.cat([grads[name].reshape(n, -1) for name in names], dim=1)


@dataclass
class FisherGram:
    """The Gram matrix K = G G^T of per-sample gradients and what the score needs from it."""

    gram: torch.Tensor  # N x N, float64
    num_params: int

    @classmethod
    def of(cls, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
           loss_fn: Callable = F.cross_entropy, params: Optional[Sequence[str]] = None) -> "FisherGram":
        return cls.from_gradients(per_sample_gradients(model, inputs, targets, loss_fn, params))

    @classmethod
    def from_gradients(cls, g: torch.Tensor) -> "FisherGram":
        """From the N x P per-sample gradients (float32 products, float64 accumulation over column blocks)."""
        gram = torch.zeros(g.shape[0], g.shape[0], dtype=torch.float64, device=g.device)
        for block in torch.split(g, 65536, dim=1):  # float32 GEMMs are ~2x faster; blocks bound the rounding
            gram += (block @ block.T).double() if block.dtype != torch.float64 else block @ block.T
        return cls(gram, g.shape[1])

    def extended(self, g_new: torch.Tensor) -> "FisherGram":
        """The Fisher of the model with more parameters whose per-sample gradients are ``g_new`` (N x P_new).

        Valid when the old parameters' gradients are unchanged (function-preserving expansions):
        K_c = K + G_new G_new^T.
        """
        g_new = g_new.double()
        return FisherGram(self.gram + g_new @ g_new.T, self.num_params + int(g_new.shape[1]))

    @property
    def n(self) -> int:
        return self.gram.shape[0]

    def fisher_trace(self) -> float:
        """trace(F) = trace(K) / N."""
        return float(torch.trace(self.gram)) / self.n

    def damping(self, damping: float, mode: str = "relative") -> float:
        """The absolute lambda for a relative (times trace(F)/N) or absolute damping."""
        return damping * self.fisher_trace() / self.n if mode == "relative" else float(damping)

    def score(self, lam: float) -> float:
        """eta = (1/N) 1^T K (K + N lambda I)^-1 1 for an absolute lambda > 0."""
        n = self.n
        ones = torch.ones(n, 1, dtype=self.gram.dtype, device=self.gram.device)
        system = self.gram + n * lam * torch.eye(n, dtype=self.gram.dtype, device=self.gram.device)
        solved = torch.linalg.solve(system, ones)
        return float((ones.T @ self.gram @ solved).item()) / n


@dataclass
class DiagonalFisher:
    """The diagonal of the empirical Fisher and the mean gradient: SECNN's score (sec. 3).

    ``eta = sum_j g_j^2 / (F_jj + lambda)`` with ``g`` the mean of the per-sample gradients and
    ``F_jj = (1/N) sum_i g_ij^2``. Each term is at most ``g_j^2 / F_jj <= 1`` (Jensen), so eta grows
    with the number of parameters: a size regularisation (SECNN's ``exp(-lambda_n dp^2)``) or the
    threshold must pay for it. Cost O(N P); no N x N or P x P matrix.
    """

    mean: torch.Tensor  # P, float64
    second: torch.Tensor  # P, float64: F_jj

    @classmethod
    def of(cls, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
           loss_fn: Callable = F.cross_entropy, params: Optional[Sequence[str]] = None) -> "DiagonalFisher":
        return cls.from_gradients(per_sample_gradients(model, inputs, targets, loss_fn, params))

    @classmethod
    def from_gradients(cls, g: torch.Tensor, dtype: torch.dtype = torch.float64) -> "DiagonalFisher":
        """From the N x P per-sample gradients (``dtype``: of the result; float32 for a cheap proxy)."""
        g = g.to(dtype)
        return cls(g.mean(0), (g * g).mean(0))

    @property
    def num_params(self) -> int:
        return int(self.mean.numel())

    def fisher_trace(self) -> float:
        return float(self.second.sum())

    def damping(self, damping: float, mode: str = "relative") -> float:
        """The absolute lambda: ``damping`` times the mean diagonal entry trace(F)/P, or ``damping`` itself."""
        return damping * self.fisher_trace() / max(1, self.num_params) if mode == "relative" else float(damping)

    def terms(self, lam: float) -> torch.Tensor:
        """The per-parameter terms g_j^2 / (F_jj + lambda) (their sum is eta)."""
        return self.mean ** 2 / (self.second + lam)

    def score(self, lam: float) -> float:
        return float(self.terms(lam).sum())

    def extended(self, g_new: torch.Tensor) -> "DiagonalFisher":
        """With new parameters whose per-sample gradients are ``g_new``: their diagonal entries appended."""
        g_new = g_new.double()
        return DiagonalFisher(torch.cat([self.mean, g_new.mean(0)]), torch.cat([self.second, (g_new * g_new).mean(0)]))


def natural_expansion_score(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    damping: float = 0.1,
    params: Optional[Sequence[str]] = None,
    damping_mode: str = "relative",
) -> float:
    """Natural expansion score eta = g^T (F + lambda I)^-1 g of ``model`` on one batch.

    Args:
        model: the network (BatchNorm is evaluated in eval mode).
        inputs, targets: the batch (N samples).
        loss_fn: per-batch loss (mean reduction), cross-entropy by default.
        damping: lambda, relative to trace(F)/N by default (see ``damping_mode``).
        params: parameter names to include (default: all that require grad).
        damping_mode: ``"relative"`` (lambda = damping * trace(F) / N) or ``"absolute"``.

    Returns:
        eta as a float in [0, 1] (it tends to 1 as lambda -> 0 when N < P).
    """
    _check_inputs(inputs, targets, damping, damping_mode)
    gram = FisherGram.of(model, inputs, targets, loss_fn, params)
    return gram.score(gram.damping(damping, damping_mode))
