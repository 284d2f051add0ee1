"""Per-epoch speed of our DEC, IDEC, DCN and DKM against ClustPy's, side by side in one process.

Both sides start every run from the same state: the same 784-500-500-2000-10 autoencoder
weights (random, or pretrained here with ``--init pretrained``) and the same k-means centres
on its codes (scikit-learn, ``--kmeans-n-init`` restarts), and train the clustering phase with
the method's MNIST config (``configs/<method>_mnist[_pretrained].yaml``: batch 256, Adam, its
lr, lambda / gamma / alpha), for ``--epochs`` epochs over the same samples. Sides alternate
(clustpy, protos 32-true, protos bf16-mixed, clustpy, ...) for ``--repeats`` rounds so that
all see the same machine load; the best epoch of all rounds is kept on each side.

* protos: the method's LightningModule (built from the config's ``init_args``) in a
  ``Trainer`` (``ArrayFile`` data, no logger, checkpoint or validation: see overhead.csv for
  those), timed per epoch from ``on_train_epoch_start`` to ``on_train_epoch_end``: the loader,
  every ``training_step`` (DEC / IDEC: the refreshes of the target distribution over all
  samples that fall in the epoch; DCN: the batch centroid updates), the optimizer steps.
* clustpy: ClustPy's own clustering loop (``_DEC_Module.fit``, ``_DCN_Module.fit``,
  ``_DKM_Module.fit``: what ``DEC(...).fit`` runs after its pretraining and k-means) on its own
  ``FeedforwardAutoencoder`` with the same layers and activation and its default data loader,
  timed per pass over the loader. Its loss functions are set to our objectives up to a
  constant factor (IDEC, DCN: reconstruction as the mean over features; DEC: no decoder),
  but its algorithms stay its own: DEC / IDEC compute the target distribution from each
  mini-batch instead of from all samples every ``update_interval`` iterations, and its
  cluster parameters are float64 (the k-means centres as scikit-learn returns them).

``update_interval`` (DEC, IDEC) is scaled with ``--n`` so that an epoch refreshes the target
as often as on the full 70,000 images (140 iterations of 274). DKM's alpha follows our
schedule epoch by epoch on both sides. After every epoch (outside the timed span) both
sides' hard assignments on all samples are scored by ARI; ``to_target_s`` is the training
time until the first epoch whose ARI reaches the AE-CM paper's Table 5 figure for the method
and init (0 when the start already does, empty when not within the epochs).

    OMP_NUM_THREADS=1 PROTOS_DATA_DIR=../shared/data python benchmarks/vs_clustpy.py --n 10000
    python benchmarks/vs_clustpy.py --methods dcn --n 2000 --epochs 1 --out /tmp/vs.csv
    # time to the paper's ARI from the DAE a bench run pretrained (50 epochs, all 70,000 images):
    python benchmarks/vs_clustpy.py --init pretrained --methods dec idec dcn --epochs 10 --repeats 1 \
        --pretrained-ae bench_runs/dec_family_mnist/pretrain_cache/mnist_seed0_ep50_<key>.pt

Needs ClustPy (``pip install -e .[bench]``); the package itself never imports it. Prints a
Markdown table and appends rows (method, init, side, precision, n, epochs, epoch_s, speedup,
ari_start, ari, target_ari, to_target_s, device) to ``benchmarks/results/vs_clustpy.csv``;
``speedup`` is ClustPy's best epoch time over ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from overhead import device_label, print_machine, quiet_setup, sync, write_rows
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from torch import Tensor, nn

from lightning_protos.data import MNIST, ArrayFile
from lightning_protos.data.base import to_float
from lightning_protos.methods.pretrain import AutoencoderMethod, PretrainCache, encode_all
from lightning_protos.ops import annealed_alpha

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dec", "idec", "dcn", "dkm")
MNIST_N = 70000
# AE-CM paper, Table 5, MNIST ARI (x 100 there).
PAPER_ARI = {
    ("dec", "random"): 0.111, ("dec", "pretrained"): 0.738,
    ("idec", "random"): 0.275, ("idec", "pretrained"): 0.749,
    ("dcn", "random"): 0.101, ("dcn", "pretrained"): 0.756,
    ("dkm", "random"): 0.725, ("dkm", "pretrained"): 0.740,
}  # fmt: skip
COLUMNS = [
    "method", "init", "side", "precision", "n", "epochs", "epoch_s", "speedup",
    "ari_start", "ari", "target_ari", "to_target_s", "device",
]  # fmt: skip


def import_clustpy():
    """ClustPy's deep-clustering modules, or a one-line exit naming the extra to install."""
    try:
        from clustpy.deep import _data_utils, dcn, dec, dkm
        from clustpy.deep.neural_networks import FeedforwardAutoencoder
    except ImportError as err:
        raise SystemExit(f"ClustPy is needed for this benchmark: pip install -e '.[bench]' ({err})") from err
    return {"dec": dec, "dcn": dcn, "dkm": dkm, "data": _data_utils, "ae": FeedforwardAutoencoder}


# -- the shared start ------------------------------------------------------------------------------


def config(method: str, init: str) -> dict:
    """The method's MNIST config (random or pretrained)."""
    suffix = "_pretrained" if init == "pretrained" else ""
    return yaml.safe_load((ROOT / "configs" / f"{method}_mnist{suffix}.yaml").read_text())


def load_data(kind: str, n: int) -> tuple[Tensor, np.ndarray, str]:
    """``(n, 784)`` uint8 images and ``(n,)`` labels: MNIST (all 70,000, then the first ``n``) or
    random pixels with random labels (a smoke test; its ARI means nothing)."""
    root = os.environ.get("PROTOS_DATA_DIR")
    has_mnist = root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()
    if kind == "mnist" or (kind == "auto" and has_mnist):
        splits = MNIST(fit_on="all", flatten=True, download=False).splits
        x, y = (torch.cat([s[i] for s in splits.values()])[:n] for i in (0, 1))
        return x.contiguous(), y.numpy(), "mnist"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 784), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g).numpy(), "random"


@dataclass
class Start:
    """Where both sides begin the clustering phase."""

    ae_state: dict[str, Tensor]  # MLPAutoencoder weights
    centres: np.ndarray  # (K, p) float64 k-means centres of the codes
    labels: np.ndarray  # (N,) k-means assignments
    ari: float  # ARI of ``labels``


def make_start(
    args: dict, x: Tensor, y: np.ndarray, seed: int, n_init: int, pretrain_epochs: int, folder: Path,
    ae_file: Path | None = None,
) -> Start:  # fmt: skip
    """The method's seeded autoencoder (pretrained ``pretrain_epochs`` on reconstruction by our
    pretraining phase when > 0, cached in ``folder`` for the methods with the same network; or
    the weights of ``ae_file``, an entry of a run's pretraining cache) and k-means on its codes
    of ``x`` ``(N, d)`` uint8 images."""
    L.seed_everything(seed, verbose=False)
    method = build_method(args, init="pretrained" if pretrain_epochs else "random", pretrain_epochs=pretrain_epochs)
    if ae_file is not None:
        entry = PretrainCache.read(ae_file)
        if entry["key"]["data"]["n"] != len(x):
            raise SystemExit(f"{ae_file}: pretrained on {entry['key']['data']['n']} samples, not --n {len(x)}")
        method.ae.load_state_dict(entry["state_dict"])
    elif pretrain_epochs:  # the pretraining phase alone: fit stops at its last epoch
        hp = method.hparams
        path = folder / f"dae_{'-'.join(map(str, hp.hidden))}-{hp.latent_dim}_slope{hp.slope}_seed{seed}.pt"
        if path.exists():
            method.ae.load_state_dict(torch.load(path, weights_only=True))
        else:
            quiet_trainer(pretrain_epochs, "32-true", []).fit(method, datamodule=array_data(x, y, folder))
            torch.save(method.ae.state_dict(), path)
    with torch.no_grad():
        z = encode_all(method.ae.encoder, to_float(x)).double().numpy()
    km = KMeans(args["n_clusters"], n_init=n_init, random_state=seed).fit(z)
    state = {k: v.detach().clone() for k, v in method.ae.state_dict().items()}
    return Start(state, km.cluster_centers_, km.labels_, float(adjusted_rand_score(y, km.labels_)))


def dkm_alphas(args: dict, epochs: int) -> list[float]:
    """DKM's alpha for each clustering epoch: constant, or our annealing schedule."""
    if args.get("alpha", 1000.0) is not None:
        return [float(args.get("alpha", 1000.0))] * epochs
    return [annealed_alpha(e // args.get("anneal_every", 5)) for e in range(epochs)]


# -- the protos side -------------------------------------------------------------------------------


def build_method(args: dict, **overrides) -> AutoencoderMethod:
    """The config's method class with its ``init_args`` (and ``overrides``)."""
    module, name = args["class_path"].rsplit(".", 1)
    kwargs = {k: v for k, v in args.items() if k != "class_path"}
    kwargs.update(input_shape=(784,), pretrain_cache=False, **overrides)
    return getattr(importlib.import_module(module), name)(**kwargs)


def array_data(x: Tensor, y: np.ndarray, folder: Path) -> ArrayFile:
    """``x`` uint8 (served as [0, 1] floats) and ``y`` through an .npz file, batches of 256."""
    path = folder / "data.npz"
    if not path.exists():
        np.savez(path, X=x.numpy(), y=y)
    return ArrayFile(path=str(path), batch_size=256, fit_on="all", flatten=True)


def quiet_trainer(epochs: int, precision: str, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, precision=precision, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
    )  # fmt: skip


class EpochClock(L.Callback):
    """Times each training epoch, then (outside the timed span) calls ``after_epoch(seconds)``."""

    def __init__(self, after_epoch: Callable[[float], None]) -> None:
        self.after_epoch = after_epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sync()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        sync()
        self.after_epoch(time.perf_counter() - self.start)


def protos_run(
    args: dict, start: Start, x: Tensor, y: np.ndarray, folder: Path, precision: str, epochs: int,
    after_epoch: Callable[[float, np.ndarray], None],
) -> None:  # fmt: skip
    """``epochs`` clustering epochs of our method from ``start``; ``after_epoch(seconds, labels)``."""
    method = build_method(args, init="random")  # no pretraining phase: ``start`` holds the weights
    method.ae.load_state_dict(start.ae_state)
    method.kmeans = lambda z: torch.as_tensor(start.centres, dtype=z.dtype)  # the shared centres
    features = to_float(x)
    method.init_from_codes(encode_all(method.ae.encoder, features))  # as at the first clustering epoch
    method.initialised.fill_(True)

    def predict(seconds: float) -> None:
        with torch.no_grad():
            labels = torch.cat([method.predict_clusters(c) for c in features.split(4096)])
        after_epoch(seconds, labels.numpy())

    quiet_trainer(epochs, precision, [EpochClock(predict)]).fit(method, datamodule=array_data(x, y, folder))


# -- the ClustPy side ------------------------------------------------------------------------------


class TimedLoader:
    """Wraps a DataLoader: each full pass is timed, then ``after_epoch(seconds)`` runs."""

    def __init__(self, loader, after_epoch: Callable[[float], None]) -> None:
        self.loader, self.after_epoch = loader, after_epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        sync()
        start = time.perf_counter()
        yield from self.loader
        sync()
        self.after_epoch(time.perf_counter() - start)


def clustpy_network(cp, method: AutoencoderMethod, start: Start) -> nn.Module:
    """ClustPy's FeedforwardAutoencoder with our method's layers and activation and the start's weights."""
    hp = method.hparams
    act = functools.partial(nn.LeakyReLU, hp.slope) if hp.slope > 0 else nn.ReLU
    net = cp["ae"](layers=[method.input_dim, *hp.hidden, hp.latent_dim], activation_fn=act)
    net.load_state_dict({k.replace("coder.", "coder.block.", 1): v for k, v in start.ae_state.items()})
    return net


def mean_mse(a: Tensor, b: Tensor) -> Tensor:
    """Reconstruction as the mean over samples and features (our per-sample mean, up to B)."""
    return nn.functional.mse_loss(a, b)


def clustpy_run(
    cp, method: str, args: dict, start: Start, x: Tensor, epochs: int,
    after_epoch: Callable[[float, np.ndarray], None], fused_adam: bool = False,
) -> None:  # fmt: skip
    """``epochs`` epochs of ClustPy's clustering loop from ``start``; ``after_epoch(seconds, labels)``.
    Its Adam is torch's default (multi-tensor) step, as ClustPy creates it, unless ``fused_adam``."""
    device = torch.device("cpu")
    net = clustpy_network(cp, build_method(args), start)
    features = to_float(x)
    adam = {"lr": args.get("lr", 1e-3), "eps": args.get("adam_eps", 1e-8), "fused": fused_adam}
    if method in ("dec", "idec"):
        module = cp["dec"]._DEC_Module(start.centres, args.get("dof", 1.0))
        opt = torch.optim.Adam([*net.parameters(), *module.parameters()], **adam)
        if method == "dec":  # DEC: L_c alone, no decoder
            fit = functools.partial(module.fit, ssl_loss_fn=mean_mse, clustering_loss_weight=1.0, ssl_loss_weight=0)
        else:  # IDEC: L_r + gamma L_c
            gamma = args.get("gamma", 0.1)
            fit = functools.partial(module.fit, ssl_loss_fn=mean_mse, clustering_loss_weight=gamma, ssl_loss_weight=1)
        run = functools.partial(fit, n_epochs=epochs, optimizer=opt)
    elif method == "dcn":  # L_rec + (lambda / 2) ||z - M s||^2, ClustPy's 0.5 included
        module = cp["dcn"]._DCN_Module(start.labels, start.centres).to_device(device)
        opt = torch.optim.Adam(net.parameters(), **adam)
        fit = functools.partial(module.fit, testloader=None, ssl_loss_fn=mean_mse)
        run = functools.partial(fit, n_epochs=epochs, optimizer=opt, clustering_loss_weight=args.get("lam", 0.1))
        run = functools.partial(run, ssl_loss_weight=1.0)
    else:  # DKM: sum of squares + lambda sum_k d2 G_k, both per sample (ClustPy's defaults)
        module = cp["dkm"]._DKM_Module(start.centres, dkm_alphas(args, epochs))
        opt = torch.optim.Adam([*net.parameters(), *module.parameters()], **adam)
        fit = functools.partial(module.fit, ssl_loss_fn=cp["dkm"].mean_squared_error, ssl_loss_weight=1.0)
        run = functools.partial(fit, n_epochs=1, optimizer=opt, clustering_loss_weight=args.get("lam", 1.0))

    def predict(seconds: float) -> None:
        with torch.no_grad():
            labels = torch.cat([module.predict_hard(net.encode(c)) for c in features.split(4096)])
        after_epoch(seconds, labels.numpy())

    loader = cp["data"].get_dataloader(features, 256, shuffle=True)
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars (one update an epoch)
        run(neural_network=net, trainloader=TimedLoader(loader, predict), device=device)


# -- running -------------------------------------------------------------------------------------


@dataclass
class Side:
    """One side's rounds: epoch times and ARI after each epoch, per round."""

    name: str
    precision: str
    seconds: list[list[float]]
    aris: list[list[float]]

    def record(self, y: np.ndarray) -> Callable[[float, np.ndarray], None]:
        """A new round; returns the callback that records its epochs."""
        self.seconds.append([])
        self.aris.append([])

        def after_epoch(seconds: float, labels: np.ndarray) -> None:
            self.seconds[-1].append(seconds)
            self.aris[-1].append(float(adjusted_rand_score(y, labels)))

        return after_epoch

    def to_target(self, start_ari: float, target: float) -> float | None:
        """Training seconds until the first epoch with ARI >= ``target`` (best round)."""
        if start_ari >= target:
            return 0.0
        times = []
        for seconds, aris in zip(self.seconds, self.aris, strict=True):
            hit = next((i for i, a in enumerate(aris) if a >= target), None)
            if hit is not None:
                times.append(sum(seconds[: hit + 1]))
        return min(times) if times else None


def run_method(
    cp, method: str, init: str, x: Tensor, y: np.ndarray, *, epochs: int, repeats: int, precisions: list[str],
    seed: int, kmeans_n_init: int, pretrain_epochs: int, folder: Path, ae_file: Path | None = None,
    clustpy_fused_adam: bool = False, dec_target: str = "dataset",
) -> list[dict]:  # fmt: skip
    """Rows (one per side and precision) for one method; ClustPy's side is ``clustpy-fused`` with
    ``clustpy_fused_adam``, ours ``protos-batch-target`` where DEC / IDEC run ``target: batch``."""
    model = config(method, init)["model"]
    args = {**model["init_args"], "class_path": model["class_path"]}
    ours = "protos"
    if method in ("dec", "idec") and dec_target == "batch":  # ClustPy's algorithm on our side too
        args.update(target="batch", tol=None)
        ours = "protos-batch-target"
    if "update_interval" in args:  # as many target refreshes per epoch as on the whole of MNIST
        args["update_interval"] = max(1, round(args["update_interval"] * len(x) / MNIST_N))
    epochs_p = pretrain_epochs if init == "pretrained" else 0
    start = make_start(args, x, y, seed, kmeans_n_init, epochs_p, folder, ae_file)
    clustpy = "clustpy-fused" if clustpy_fused_adam else "clustpy"
    sides = [Side(clustpy, "32-true", [], [])] + [Side(ours, p, [], []) for p in precisions]
    for r in range(repeats):
        for side in sides:  # alternating, each round from the same start
            L.seed_everything(seed + r, verbose=False)
            record = side.record(y)
            if side.name == clustpy:
                clustpy_run(cp, method, args, start, x, epochs, record, clustpy_fused_adam)
            else:
                protos_run(args, start, x, y, folder, side.precision, epochs, record)
            print(
                f"  {method} {side.name} {side.precision} round {r}: epochs "
                f"{[round(t, 3) for t in side.seconds[-1]]} s, ARI {[round(a, 4) for a in side.aris[-1]]}",
                flush=True,
            )
    target = PAPER_ARI[method, init]
    clustpy_best = min(min(s) for s in sides[0].seconds)
    rows = []
    for side in sides:
        best = min(min(s) for s in side.seconds)
        to_target = side.to_target(start.ari, target)
        rows.append(
            {
                "method": method, "init": init, "side": side.name, "precision": side.precision,
                "n": len(x), "epochs": epochs, "epoch_s": round(best, 3),
                "speedup": round(clustpy_best / best, 3),
                "ari_start": round(start.ari, 4), "ari": round(float(np.mean([a[-1] for a in side.aris])), 4),
                "target_ari": target, "to_target_s": "" if to_target is None else round(to_target, 3),
                "device": device_label(torch.device("cpu")),
            }
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--init", choices=["random", "pretrained"], default="random")
    parser.add_argument("--pretrain-epochs", type=int, default=10, help="DAE epochs for --init pretrained")
    parser.add_argument(
        "--pretrained-ae",
        type=Path,
        help="for --init pretrained: the DAE of a pretraining cache entry (e.g. bench_runs/dec_family_mnist/"
        "pretrain_cache/mnist_seed0_ep50_*.pt) instead of pretraining one here",
    )
    parser.add_argument("--n", type=int, default=MNIST_N, help="samples (MNIST has 70,000)")
    parser.add_argument("--epochs", type=int, default=2, help="clustering epochs per run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of alternating runs (best epoch kept)")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--kmeans-n-init", type=int, default=10, help="k-means restarts of the shared start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--data", choices=["auto", "mnist", "random"], default="auto")
    parser.add_argument(
        "--clustpy-fused-adam", action="store_true", help="give ClustPy's loop torch's fused Adam, as ours has"
    )
    parser.add_argument(
        "--dec-target",
        choices=["dataset", "batch"],
        default="dataset",
        help="DEC / IDEC on our side: the papers' target over all samples, or ClustPy's per-batch one",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vs_clustpy.csv")
    args = parser.parse_args(argv)
    if args.n < 256 or args.epochs < 1 or args.repeats < 1:
        parser.error("--n must be >= 256, --epochs and --repeats >= 1")
    if args.pretrained_ae and args.init != "pretrained":
        parser.error("--pretrained-ae needs --init pretrained")

    cp = import_clustpy()
    quiet_setup(args.threads)
    x, y, source = load_data(args.data, args.n)
    print_machine(len(x), source, torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            rows += run_method(
                cp, method, args.init, x, y, epochs=args.epochs, repeats=args.repeats, precisions=args.precisions,
                seed=args.seed, kmeans_n_init=args.kmeans_n_init, pretrain_epochs=args.pretrain_epochs,
                folder=Path(tmp), ae_file=args.pretrained_ae, clustpy_fused_adam=args.clustpy_fused_adam,
                dec_target=args.dec_target,
            )  # fmt: skip

    write_rows(rows, COLUMNS, args.out)
    return rows


if __name__ == "__main__":
    main()
