"""The clustering module network (Eq. 6): a softmax encoder and a linear decoder."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..ops import pinv_encoder
from .mlp import BiasInit, glorot_init


class ClusteringModule(nn.Module):
    """Gamma = softmax(x W_enc + b_enc); x_bar = Gamma W_dec + b_dec (Eq. 6).

    The centroids are the images of the basis vectors, mu_k = W_dec[k] + b_dec.
    Random init is Glorot-uniform weights and, with ``bias_init``, zero biases (the paper is
    silent; ours) or Glorot-normal ones (``glorot_normal``: the authors' Keras code,
    REFERENCE_CODE 2.1, which gives the encoder logits a bias of std 1/sqrt(K)).
    """

    def __init__(self, in_dim: int, n_clusters: int, bias_init: BiasInit = "zeros") -> None:
        super().__init__()
        self.encoder = nn.Linear(in_dim, n_clusters)
        self.decoder = nn.Linear(n_clusters, in_dim)
        glorot_init(self, bias_init)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, d)`` -> ``(B, K)`` responsibilities."""
        return torch.softmax(self.encoder(x), dim=-1)

    def centroids(self) -> Tensor:
        """``(K, d)`` centroids mu_k = W_dec[k, :] + b_dec."""
        return self.decoder.weight.T + self.decoder.bias

    @torch.no_grad()
    def init_from_centres(self, centres: Tensor, encoder: Literal["pinv", "posterior"] = "pinv") -> None:
        """Centroids mu_k = centres[k] (W_dec rows, zero b_dec) and an encoder that reads them.

        ``pinv`` (Sec. 4.1, the paper and the authors' code): W_enc = pinv(W_dec), zero bias, so
        that mu_k maps to e_k. Between the centres it reads barycentric coordinates, not
        distances: with K = d and ill-conditioned centres its argmax can disagree with the
        k-means partition almost everywhere (AE-CM^p MNIST, BENCHMARKS.md).
        ``posterior`` (ours): Gamma = softmax(x.mu_k - ||mu_k||^2 / 2) = softmax(-||x - mu_k||^2 / 2),
        the responsibilities of an isotropic unit-variance GMM at the centres, whose argmax is
        the nearest centre, i.e. the k-means partition.
        """
        self.decoder.weight.copy_(centres.T)
        self.decoder.bias.zero_()
        if encoder == "pinv":
            self.encoder.weight.copy_(pinv_encoder(centres).T)
            self.encoder.bias.zero_()
        elif encoder == "posterior":
            self.encoder.weight.copy_(centres)
            self.encoder.bias.copy_(-0.5 * centres.pow(2).sum(1))
        else:
            raise ValueError(f"encoder must be 'pinv' or 'posterior', got {encoder!r}")
