"""benchmarks/aecm_cm_init.py (where AE-CM^p starts its CM-alone phase): the posterior init reads
the k-means partition back exactly; the pseudo-inverse reads the same centres otherwise."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from lightning_protos.methods.aecm import AECM

sys.path.insert(0, str(ROOT / "benchmarks"))
import aecm_cm_init


def test_posterior_start_is_the_kmeans_partition():
    torch.manual_seed(0)
    model = AECM(4, (6,), latent_dim=4, hidden=(16,), init="pretrained", kmeans_n_init=3)
    x = torch.randn(300, 6)
    kmeans, seen = model.kmeans, {}
    model.kmeans = lambda z: seen.setdefault("centres", kmeans(z))
    with torch.no_grad():
        parts = aecm_cm_init.start_partitions(model, x, seed=0)
    singular = np.linalg.svd(seen["centres"].double().numpy(), compute_uv=False)
    assert parts["cond"] == pytest.approx(singular[0] / singular[-1], rel=1e-9)
    assert torch.equal(parts["posterior"], parts["kmeans"])
    assert parts["pinv"].shape == parts["kmeans"].shape
    assert not torch.equal(parts["pinv"], parts["kmeans"])  # K = p: barycentric, not nearest-centre
