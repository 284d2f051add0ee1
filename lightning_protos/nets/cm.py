"""The clustering module network (Eq. 6): a softmax encoder and a linear decoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import pinv_encoder


class ClusteringModule(nn.Module):
    """Gamma = softmax(x W_enc + b_enc); x_bar = Gamma W_dec + b_dec (Eq. 6).

    The centroids are the images of the basis vectors, mu_k = W_dec[k] + b_dec.
    Random init is Glorot-uniform weights and zero biases.
    """

    def __init__(self, in_dim: int, n_clusters: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(in_dim, n_clusters)
        self.decoder = nn.Linear(n_clusters, in_dim)
        for layer in (self.encoder, self.decoder):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, d)`` -> ``(B, K)`` responsibilities."""
        return torch.softmax(self.encoder(x), dim=-1)

    def centroids(self) -> Tensor:
        """``(K, d)`` centroids mu_k = W_dec[k, :] + b_dec."""
        return self.decoder.weight.T + self.decoder.bias

    @torch.no_grad()
    def init_from_centres(self, centres: Tensor) -> None:
        """k-means++ init (Sec. 4.1): W_dec rows = centres, W_enc = pinv, zero biases."""
        self.decoder.weight.copy_(centres.T)
        self.encoder.weight.copy_(pinv_encoder(centres).T)
        self.decoder.bias.zero_()
        self.encoder.bias.zero_()
