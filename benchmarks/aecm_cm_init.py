"""Where AE-CM^p starts its CM-alone phase: the k-means partition of the pretrained codes against
the partition the CM's encoder reads from the same centres, under both ``cm_init`` choices.

For each entry of a pretraining cache (the DAEs that ``protos bench`` pretrained for
configs/bench/table5_mnist.yaml), the script encodes the data, runs the method's own k-means
(``AECM.kmeans``: k-means++, 20 restarts, seeded by the run's seed), initialises a
``ClusteringModule`` from the centres with the paper's pseudo-inverse (``pinv``) and with the
isotropic GMM posterior (``posterior``), and scores the argmax of each against the labels. The
condition number of the ``(K, p)`` centre matrix tells when the pseudo-inverse reads the codes
as barycentric coordinates far from the nearest-centre partition. Codes are computed in float32
(the bench computes them under its precision), so the centres can differ slightly from a run's.

    PROTOS_DATA_DIR=../shared/data python benchmarks/aecm_cm_init.py bench_runs/table5_mnist/pretrain_cache
    PROTOS_DATA_DIR=../shared/data python benchmarks/aecm_cm_init.py --dataset usps \
        bench_runs/table5_usps_pendigits/pretrain_cache

Prints one JSON line per entry (seed, precision, cond, and the ARI x100 of each partition).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_protos.data import get_datamodule
from lightning_protos.data.base import to_float
from lightning_protos.eval.metrics import clustering_scores
from lightning_protos.methods.aecm import AECM
from lightning_protos.methods.pretrain import encode_all
from lightning_protos.nets.cm import ClusteringModule
from lightning_protos.ops import squared_distances


def start_partitions(model: AECM, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor | float]:
    """The three partitions AE-CM^p can start from on ``x``, and the centres' condition number."""
    z = encode_all(model.ae.encoder, x)
    torch.manual_seed(seed)  # AECM.kmeans seeds k-means by the run's seed
    centres = model.kmeans(z)
    parts: dict[str, torch.Tensor | float] = {"kmeans": squared_distances(z, centres).argmin(1)}
    for encoder in ("pinv", "posterior"):
        cm = ClusteringModule(z.shape[1], len(centres))
        cm.init_from_centres(centres, encoder=encoder)
        parts[encoder] = cm(z).argmax(1)
    parts["cond"] = float(torch.linalg.cond(centres.double()))
    return parts


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, help="a pretrain_cache folder of AE-CM^p runs")
    parser.add_argument("--dataset", default="mnist", help="whose entries to read: mnist, usps, pendigits")
    args = parser.parse_args(argv)
    dm = get_datamodule(args.dataset, fit_on="all", flatten=True)
    dm.setup("fit")
    x, y = to_float(dm.features("fit")).flatten(1), dm.labels("fit").numpy()
    rows = []
    for path in sorted(args.cache.glob(f"{args.dataset}_seed*.pt")):
        entry = torch.load(path, map_location="cpu", weights_only=True)
        key = entry["key"]
        arch = key["architecture"]
        model = AECM(10, (arch["d"],), arch["p"], arch["hidden"], slope=arch["slope"], init="pretrained")
        model.ae.load_state_dict(entry["state_dict"])
        with torch.no_grad():
            parts = start_partitions(model, x, key["seed"])
        row = {"seed": key["seed"], "precision": key["precision"], "cond": round(parts.pop("cond"), 1)}
        row |= {f"{name}_ari": round(100 * clustering_scores(y, p.numpy())["ari"], 1) for name, p in parts.items()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
