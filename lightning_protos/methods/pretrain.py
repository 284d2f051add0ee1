"""The autoencoder pretraining phase shared by the methods that start from a pretrained DAE
(AE-CM^p here; DEC, IDEC, DCN and DKM reuse it): a reconstruction step and the codes of
the whole training set for the k-means initialisation that follows."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ClusteringMethod


def reconstruction_loss(x: Tensor, x_rec: Tensor) -> Tensor:
    """Per-sample MSE (mean over features) summed over the batch, as in the AE-CM code (RC 4)."""
    return (x - x_rec).pow(2).mean(dim=1).sum()


def pretrain_step(method: ClusteringMethod, autoencoder: nn.Module, x: Tensor, optimizer) -> Tensor:
    """One DAE pretraining update on ``x`` ``(B, d)``; logged as ``pretrain/L_rec``."""
    _, x_rec = autoencoder(x)
    loss = method.check_and_log({"L_rec": reconstruction_loss(x, x_rec)}, prefix="pretrain")
    method.optimize(loss, optimizer)
    return loss


@torch.no_grad()
def encode_all(encoder: nn.Module, x: Tensor, batch_size: int = 4096) -> Tensor:
    """``(N, d)`` -> ``(N, p)`` codes, computed in batches without gradients."""
    return torch.cat([encoder(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
