"""scikit-learn references on the raw flattened features, run as one bench cell each.

    python -m lightning_protos.bench.reference kmeans --dataset digits --seed 0 --run-dir DIR

``kmeans``: ``KMeans(n_init=1, init=random|k-means++)``; ``gmm``: ``GaussianMixture`` with full
covariances (``init`` is its ``init_params``). K is the data set's number of classes. The
scores go to ``DIR/metrics.json`` under ``"test"``, as a ``protos fit`` run writes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..data import get_datamodule
from ..eval.metrics import clustering_scores


def fit_predict(
    name: str, x: np.ndarray, n_clusters: int, seed: int, init: str | None = None
) -> tuple[np.ndarray, int]:
    """Clusters ``x`` ``(N, D)``; returns the ``(N,)`` labels and the iterations run."""
    if name == "kmeans":
        from sklearn.cluster import KMeans

        model = KMeans(n_clusters, init=init or "k-means++", n_init=1, random_state=seed)
    elif name == "gmm":
        from sklearn.mixture import GaussianMixture

        model = GaussianMixture(n_clusters, covariance_type="full", init_params=init or "kmeans", random_state=seed)
    else:
        raise ValueError(f"unknown reference {name!r}")
    labels = model.fit_predict(x)
    return labels, int(model.n_iter_)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_protos.bench.reference")
    parser.add_argument("name", choices=["kmeans", "gmm"])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--init")
    args = parser.parse_args(argv)
    data = get_datamodule(args.dataset)
    x = data.features("fit").reshape(data.n_of("fit"), -1).double().numpy()
    y = data.labels("fit").numpy()
    pred, n_iter = fit_predict(args.name, x, data.n_classes, args.seed, args.init)
    scores = {
        **clustering_scores(y, pred),
        "n_clusters_used": len(np.unique(pred)),
        "iterations": n_iter,
    }
    args.run_dir.mkdir(parents=True, exist_ok=True)
    (args.run_dir / "metrics.json").write_text(json.dumps({"test": scores}, indent=2))
    print("final evaluation: " + ", ".join(f"{k}={v:.4g}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
