"""VAESim's operations (Ferrante et al., J §3, Alg. 1-2): the tempered soft assignment to
prototypes, the EMA prototype update, the temperature schedule and L_ortho."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .kmeans import cluster_sums

Similarity = Literal["cos", "dot"]
Schedule = Literal["paper", "quarter_hot", "code"]


def similarity(z: Tensor, prototypes: Tensor, kind: Similarity = "cos") -> Tensor:
    """``(B, K)`` similarity s(z_i, Q_k) of codes ``z`` ``(B, q)`` to prototypes ``(K, q)``: the
    cosine (J §3, text) or the dot product Qz (Eq. 1 as printed; the authors' code). A zero
    prototype has cosine 0 with everything."""
    if kind == "cos":
        return F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).T
    if kind == "dot":
        return z @ prototypes.T
    raise ValueError(f"similarity must be 'cos' or 'dot', got {kind!r}")


def soft_assign(z: Tensor, prototypes: Tensor, tau: float | Tensor, kind: Similarity = "cos") -> Tensor:
    """Eq. 1: c = softmax(s(z, Q) / tau), ``(B, K)``, rows sum to 1."""
    return torch.softmax(similarity(z, prototypes, kind) / tau, dim=-1)


def draw_assignments(c: Tensor, mode: Literal["sample", "argmax"] = "sample", generator=None) -> Tensor:
    """``(B,)`` cluster labels for the prototype update: k_i ~ Categorical(c_i) (Alg. 2) or the
    argmax of c_i (J §3.2, "sampled or argmaxed")."""
    if mode == "argmax":
        return c.argmax(dim=-1)
    if mode == "sample":  # a non-finite row (a diverged step, whose check a GPU defers) draws uniformly
        weights = c.float().nan_to_num(1.0, 1.0, 1.0)  # and the loss check then names the term
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)
    raise ValueError(f"assign must be 'sample' or 'argmax', got {mode!r}")


def ema_prototype_update(prototypes: Tensor, z: Tensor, assign: Tensor, eta: float = 0.95) -> Tensor:
    """Alg. 2: Q_j <- eta * mean{z_i : k_i = j} + (1 - eta) * Q_j for every prototype j with an
    assigned sample; the other rows are returned unchanged.

    ``eta`` weighs the *new* batch mean (Alg. 2: eta = 0.95). Under ``torch.distributed`` the
    per-cluster sums and counts are all-reduced first, so every rank computes the same rows
    from the union of the ranks' batches.

    Args:
        prototypes: ``(K, q)`` Q.
        z: ``(B, q)`` codes of the batch (detached).
        assign: ``(B,)`` cluster labels k_i (:func:`draw_assignments`).
        eta: weight of the batch mean, in [0, 1).

    Returns:
        ``(K, q)`` the updated Q.
    """
    sums, counts = cluster_sums(z.to(prototypes.dtype), assign, len(prototypes), over_ranks=True)
    mean = sums / counts.clamp_min(1).to(sums.dtype).unsqueeze(1)
    moved = eta * mean + (1.0 - eta) * prototypes
    return torch.where((counts > 0).unsqueeze(1), moved, prototypes)


def temperature(
    step: int,
    total_steps: int,
    schedule: Schedule = "paper",
    tau_start: float = 1.0,
    tau_end: float = 0.01,
    tau_hot: float = 5.0,
) -> float:
    """The softmax temperature at training step ``step`` of ``total_steps``.

    - ``paper`` (Alg. 1): tau_start -> tau_end linearly over the first half of the steps, then
      tau_end.
    - ``quarter_hot`` (§3.2, "> 1 for the first quarter of training steps, then decreasing"):
      tau_hot for the first quarter, then tau_start -> tau_end linearly until half, then tau_end
      (tau_hot = 5 is the authors' code's starting value; the ramp is ours).
    - ``code``: tau_start throughout. The authors' code computes a schedule but never divides by
      it, so its runs used tau = 1 (REFERENCE_CODE 1.1).

    >>> [temperature(s, 8) for s in (0, 2, 4, 8)]
    [1.0, 0.505, 0.01, 0.01]
    """
    if schedule == "code":
        return tau_start
    progress = step / max(total_steps, 1)
    if schedule == "paper":
        ramp = min(progress / 0.5, 1.0)
    elif schedule == "quarter_hot":
        if progress < 0.25:
            return tau_hot
        ramp = min((progress - 0.25) / 0.25, 1.0)
    else:
        raise ValueError(f"tau_schedule must be 'paper', 'quarter_hot' or 'code', got {schedule!r}")
    return (1.0 - ramp) * tau_start + ramp * tau_end


def ortho_loss(prototypes: Tensor) -> Tensor:
    """Eq. 3: L_ortho = ||Q Q^T - I_K||_F^2 for Q ``(K, q)`` (a scalar).

    >>> float(ortho_loss(torch.eye(3)))
    0.0
    """
    gram = prototypes @ prototypes.T
    return (gram - torch.eye(len(prototypes), dtype=gram.dtype, device=gram.device)).pow(2).sum()
