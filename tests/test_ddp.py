"""Two-process CPU DDP (gloo): every buffer a method updates from a batch holds the same values
on both ranks, and the evaluators score the whole evaluation set, each sample once. Every method
runs under plain DDP (``--trainer.strategy ddp``): those whose steps leave parameters out turn on
DDP's search for them themselves (``ClusteringMethod.ddp_unused_parameters``).

The ranks are started here (``torch.multiprocessing.spawn``) with the environment of an
external launcher, so that one pair of processes runs several fits; each rank saves its
buffers and its evaluator's scores, compared afterwards in the test process."""

from __future__ import annotations

import csv
import importlib
import os
import socket
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import RandomStream, TwoSplits, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from lightning_protos.compile import Compile
from lightning_protos.data import Digits
from lightning_protos.eval.callbacks import AssignmentWriter, ClusteringEvaluator
from lightning_protos.eval.metrics import clustering_scores
from lightning_protos.eval.probes import ProbeEvaluator
from lightning_protos.methods.aecm import AECM
from lightning_protos.methods.cm import CM
from lightning_protos.methods.dcn import DCN
from lightning_protos.methods.dec import DEC, IDEC
from lightning_protos.methods.distributed import on_rank0
from lightning_protos.methods.dkm import DKM
from lightning_protos.methods.gmvae import GMVAE
from lightning_protos.methods.pretrain import PretrainCache
from lightning_protos.methods.protovae import AE as PlainAE
from lightning_protos.methods.protovae import VAEKL, InfoVAE, ProtoVAE
from lightning_protos.methods.vade import VaDE
from lightning_protos.methods.vae import VAEKMeans
from lightning_protos.methods.vaesim import VAESim

WORLD = 2
AE = {"latent_dim": 4, "hidden": (16,), "init": "pretrained", "pretrain_epochs": 1, "pretrain_cache": False}


def digits():
    return Digits(batch_size=128, eval_batch_size=512, flatten=True)  # 1797 samples: 899 + 898 a rank


def tiny_images():
    """50 random 1 x 28 x 28 images (25 a rank, 3 batches), 2 labels; 50 to evaluate (25 + 25)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8, generator=g)
    return TwoSplits((x, torch.arange(50) % 2), batch_size=10, eval_batch_size=16)


class SkewedKMeansDEC(DEC):
    """DEC whose k-means centres differ on each rank, as a multi-threaded fit's may in their last
    bits: rank 0's initialisation must reach every rank (``broadcast_from_rank0``)."""

    def kmeans(self, z: torch.Tensor) -> torch.Tensor:
        return super().kmeans(z) + 1e-3 * (dist.get_rank() if dist.is_initialized() else 0)


# name: (method, data, epochs); each holds state updated from the batches of every rank
CASES = {
    "cm": (lambda: CM(10, (64,), alpha=20.0, init="kmeans++"), digits, 1),  # the averaged weights
    "aecm": (lambda: AECM(10, (64,), alpha=20.0, cm_epochs=1, **AE), digits, 3),  # the averaged weights
    "dec": (lambda: DEC(10, (64,), update_interval=3, **AE), digits, 2),  # target P, assignments
    "dec_skewed_kmeans": (lambda: SkewedKMeansDEC(10, (64,), update_interval=3, **AE), digits, 2),
    "idec": (lambda: IDEC(n_clusters=10, input_shape=(64,), update_interval=3, **AE), digits, 2),
    "dcn": (lambda: DCN(10, (64,), **AE), digits, 2),  # centroids, counts, assignments
    "vaesim": (lambda: VAESim(4, (1, 28, 28), latent_dim=4, channels=(4, 8, 8), lr=1e-3), tiny_images, 2),
    "protovae": (
        lambda: ProtoVAE(3, (1, 28, 28), latent_dim=8, channels=(4, 8), bottleneck_dim=16, warmup_epochs=0),
        tiny_images,
        2,
    ),
    # the k-means of the elbow and the GMM: rank 0's fit on both ranks
    "vaekmeans_elbow": (lambda: VAEKMeans(4, (1, 28, 28), k_min=2, **CONV), tiny_images, 1),
    "vade": (lambda: VaDE(2, (1, 28, 28), pretrain_epochs=1, **CONV), tiny_images, 3),
}
# the scikit-learn fits of the initialisations, by module: under DDP rank 0 alone runs them
# (``on_rank0``), and every rank takes its result
FITTERS = {
    "lightning_protos.methods.pretrain": ("kmeans_centres",),
    "lightning_protos.methods.cm": ("kmeans_pp_centres",),
    "lightning_protos.methods.vae": ("kmeans_centres", "elbow_kmeans"),
    "lightning_protos.methods.vade": ("diagonal_gmm",),
}
FITTED = {"cm", "aecm", "dec", "dec_skewed_kmeans", "idec", "dcn", "vaekmeans_elbow", "vade"}
# the same fit with the conv nets compiled (``--compile.enabled``): DDP's hooks on the compiled
# modules' parameters keep both ranks in step
COMPILED = {"vaesim_compiled": CASES["vaesim"]}
CONV = {"latent_dim": 4, "channels": (4, 8, 8)}
RECONSTRUCTION = {"input_shape": (1, 28, 28), "latent_dim": 8, "channels": (4, 8), "bottleneck_dim": 16}
# The other methods, run on one rank: DDP's reducer refuses a parameter left out of a step
# whatever the number of ranks (DKM and VaDE leave theirs out while they pretrain).
OTHERS = {
    "dkm": (lambda: DKM(10, (64,), **AE), digits, 2),
    "gmvae": (lambda: GMVAE(2, (1, 28, 28), w_dim=2, prior_hidden=8, **CONV), tiny_images, 2),
    "vaekmeans": (lambda: VAEKMeans(2, (1, 28, 28), k_min=None, **CONV), tiny_images, 2),
    "ae": (lambda: PlainAE(**RECONSTRUCTION), tiny_images, 2),
    "vaekl": (lambda: VAEKL(**RECONSTRUCTION), tiny_images, 2),
    "infovae": (lambda: InfoVAE(**RECONSTRUCTION), tiny_images, 2),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_launched(rank: int, port: int, world: int) -> None:
    """The environment an external launcher gives rank ``rank``, and one thread."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
        LOCAL_RANK=str(rank), RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)


def _spawn(fn, *args) -> None:
    """``fn(rank, *args)`` in one process per rank; each leaves its process group before exiting
    (a gloo group left to the interpreter's exit can abort the process: "terminate called
    without an active exception", seen once on a loaded machine)."""
    mp.spawn(_in_group, args=(fn, *args), nprocs=args[-1], join=True)


def _in_group(rank: int, fn, *args) -> None:
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _rank(rank: int, port: int, out: str, names: list[str], world: int) -> None:
    _as_launched(rank, port, world)
    fits = []
    for module_name, fitters in FITTERS.items():
        module = importlib.import_module(module_name)
        for fitter in fitters:
            fn = getattr(module, fitter)
            setattr(module, fitter, lambda *a, fn=fn, f=fitter, **k: fits.append(f) or fn(*a, **k))
    for name in names:
        fits.clear()
        make, data, epochs = {**CASES, **OTHERS, **COMPILED}[name]
        L.seed_everything(0, verbose=False)
        model, evaluator = make(), ClusteringEvaluator()
        trainer = L.Trainer(  # "ddp" as typed on the command line; on CPUs it talks over gloo
            accelerator="cpu", devices=world, strategy="ddp",
            max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[
                evaluator,
                Compile(enabled=name in COMPILED),
                AssignmentWriter(f"{name}_predictions.csv", f"{name}_neighbours.csv"),
            ],
            default_root_dir=out,
        )  # fmt: skip
        trainer.fit(model, data())
        # taken before validate (were DDP to broadcast rank zero's buffers, as by default, the
        # comparison below would only cover each run's last step: ClusteringMethod.setup turns
        # that off, so it covers the whole run)
        state = {
            "buffers": {k: v.detach().cpu().clone() for k, v in model.named_buffers()},
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "steps": trainer.global_step,
            "broadcast_buffers": trainer.strategy._ddp_kwargs.get("broadcast_buffers"),
            "fits": list(fits),
            "compiled": any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()),
        }
        trainer.validate(model, data(), verbose=False)  # the trained model, scored under DDP
        state["val"] = evaluator.results.get("val")
        trainer.predict(model, data(), return_predictions=False)  # each rank its shard; rank zero writes
        torch.save(state, os.path.join(out, f"{name}.rank{rank}.pt"))


def run_ddp(tmp_path, names: list[str], world: int = WORLD) -> dict[str, list[dict]]:
    _spawn(_rank, _free_port(), str(tmp_path), names, world)
    return {n: [torch.load(tmp_path / f"{n}.rank{r}.pt", weights_only=False) for r in range(world)] for n in names}


def check(name: str, ranks: list[dict], out: Path) -> None:
    zero, one = ranks
    assert zero["steps"] > 0
    assert zero["broadcast_buffers"] is False
    assert not one["fits"], f"{name}: rank 1 fitted {one['fits']}"  # it takes rank 0's
    assert bool(zero["fits"]) == (name in FITTED), f"{name}: rank 0 fitted {zero['fits']}"
    assert zero["buffers"] or name == "protovae", f"{name} has no buffers to compare"  # ProtoVAE: V is a parameter
    for key, value in zero["state_dict"].items():  # the buffers, and the parameters DDP keeps in step
        torch.testing.assert_close(
            one["state_dict"][key], value, rtol=0, atol=0, equal_nan=True, msg=lambda m, k=key: f"{name} {k}: {m}"
        )
    # the scores of the DDP evaluation are those of the whole set in one process, each sample once
    make, data, _ = {**CASES, **COMPILED}[name]
    model, dm = make(), data()
    dm.setup("validate")
    model.load_state_dict(zero["state_dict"])
    model.eval()
    x, y = dm.features("eval"), dm.labels("eval")
    with torch.no_grad():
        clusters = model.predict_clusters(x)
        want = clustering_scores(y.numpy(), clusters.numpy())
        criteria = {k: float(v) for k, v in model.selection_criteria(x).items()}
    got = zero["val"]
    assert got is not None  # rank zero reports (the others record nothing, or the same)
    assert one["val"] in (None, got)
    for key, value in {**want, **criteria}.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # predict under DDP: one row per sample, in index order, with the whole set's clusters
    with open(out / f"{name}_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(len(x)))
    assert [int(r["cluster"]) for r in rows] == clusters.tolist()


def test_cm_under_two_process_ddp(tmp_path):
    """The fast one, in the default suite so that CI runs two real processes: the CM's averaged
    weights agree on both ranks, and its ACC / NMI / ARI and L_sp under DDP are those of the
    whole digits set (1797 samples: one rank has one more). About 15 s idle, 27 s on the shared
    2 cores, mostly starting the two processes."""
    check("cm", run_ddp(tmp_path, ["cm"])["cm"], tmp_path)


@pytest.mark.slow
def test_every_method_with_batch_updated_state_agrees_across_ranks(tmp_path):
    names = [n for n in CASES if n != "cm"]
    results = run_ddp(tmp_path, names)
    for name in names:
        check(name, results[name], tmp_path)


@pytest.mark.slow
def test_the_other_methods_fit_and_evaluate_under_plain_ddp(tmp_path):
    results = run_ddp(tmp_path, list(OTHERS), world=1)
    for name, (rank,) in results.items():
        assert rank["steps"] > 0, name
        assert rank["val"], name  # the scores of the evaluation under DDP


@pytest.mark.slow  # ~1 minute: each rank compiles
def test_compiled_conv_nets_agree_across_ranks(tmp_path):
    ranks = run_ddp(tmp_path, ["vaesim_compiled"])["vaesim_compiled"]
    assert all(rank["compiled"] for rank in ranks)
    check("vaesim_compiled", ranks, tmp_path)


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def _resume_rank(rank: int, port: int, out: str, world: int) -> None:
    """VAESim (reparameterisation noise, multinomial draws) fitted for 2 epochs without a stop,
    then stopped after its first epoch and resumed from that epoch's checkpoint."""
    _as_launched(rank, port, world)
    make, data, _ = CASES["vaesim"]
    runs = {}
    for run, ckpt_path in (("whole", None), ("stopped", None), ("resumed", f"{out}/stopped/epoch=0.ckpt")):
        L.seed_everything(0, verbose=False)
        model, stream = make(), RandomStream()
        every_epoch = ModelCheckpoint(dirpath=f"{out}/{run}", save_top_k=-1, filename="{epoch}")
        trainer = make_trainer(
            devices=world, strategy="ddp", max_epochs=2, enable_checkpointing=True,
            callbacks=[stream, every_epoch, *([StopAfterFirstEpoch()] if run == "stopped" else [])],
        )  # fmt: skip
        trainer.fit(model, data(), ckpt_path=ckpt_path)
        runs[run] = {"digests": stream.digests, "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    torch.save(runs, os.path.join(out, f"resume.rank{rank}.pt"))


@pytest.mark.slow
def test_each_rank_draws_its_own_stream_and_resumes_it(tmp_path):
    """The ranks draw different noise (seed_everything seeds them alike; rank > 0 takes a
    stream of its own), and a resumed DDP run continues every rank's stream where the
    checkpoint left it: the resumed epoch's draws and the final weights are the whole run's."""
    _spawn(_resume_rank, _free_port(), str(tmp_path), WORLD)
    zero, one = (torch.load(tmp_path / f"resume.rank{r}.pt", weights_only=False) for r in range(WORLD))
    steps = sorted(zero["whole"]["digests"])
    assert steps == sorted(one["whole"]["digests"])
    assert len(steps) == 6
    assert all(zero["whole"]["digests"][s] != one["whole"]["digests"][s] for s in steps)
    for rank in (zero, one):
        resumed = rank["resumed"]["digests"]
        assert sorted(resumed) == steps[3:]  # the second epoch's steps
        assert resumed == {s: rank["whole"]["digests"][s] for s in steps[3:]}
        for key, value in rank["whole"]["state_dict"].items():
            torch.testing.assert_close(rank["resumed"]["state_dict"][key], value, rtol=0, atol=0, msg=key)


def _cache_rank(rank: int, port: int, out: str, world: int) -> None:
    """DEC fitted twice with one pretraining cache; in the second fit rank 1 cannot read it (as
    on a node without the file)."""
    _as_launched(rank, port, world)
    runs = {}
    for run in ("fill", "hit"):
        if run == "hit" and rank == 1:
            PretrainCache.load = lambda *args, **kwargs: None  # a miss, were it asked
        L.seed_everything(0, verbose=False)
        model = DEC(10, (64,), update_interval=3, **{**AE, "pretrain_cache": f"{out}/cache"})
        # a rank left waiting in a collective fails in a minute, not never
        trainer = make_trainer(devices=world, strategy=DDPStrategy(timeout=timedelta(seconds=60)), max_epochs=2)
        trainer.fit(model, digits())
        runs[run] = {"hit": model.pretrain_cache_hit is not None, "state_dict": model.state_dict()}
    torch.save(runs, os.path.join(out, f"cache.rank{rank}.pt"))


@pytest.mark.slow
def test_rank_zero_decides_a_pretraining_cache_hit_for_every_rank(tmp_path):
    """Rank 0 looks the cache up and sends the pretrained weights: a rank that would miss (no
    file on its node) skips the pretraining with the others instead of training alone."""
    _spawn(_cache_rank, _free_port(), str(tmp_path), WORLD)
    zero, one = (torch.load(tmp_path / f"cache.rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert (zero["fill"]["hit"], one["fill"]["hit"]) == (False, False)
    assert (zero["hit"]["hit"], one["hit"]["hit"]) == (True, True)
    for key, value in zero["hit"]["state_dict"].items():
        torch.testing.assert_close(one["hit"]["state_dict"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def _failing_fit_rank(rank: int, port: int, out: str, world: int) -> None:
    _as_launched(rank, port, world)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))

    def fit() -> None:  # run by rank 0 alone
        raise ValueError("n_samples=3 should be >= n_clusters=10")

    try:
        on_rank0(fit)
    except Exception as error:
        (Path(out) / f"raised.rank{rank}").write_text(f"{type(error).__name__}: {error}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_fit_that_fails_on_rank_zero_stops_every_rank(tmp_path):
    """An initialisation's fit that raises on rank 0 raises on the other ranks too, naming it,
    instead of leaving them waiting for its result."""
    _spawn(_failing_fit_rank, _free_port(), str(tmp_path), WORLD)
    assert (tmp_path / "raised.rank0").read_text() == "ValueError: n_samples=3 should be >= n_clusters=10"
    assert (tmp_path / "raised.rank1").read_text() == (
        "RuntimeError: rank 0 failed in _failing_fit_rank.<locals>.fit: "
        "ValueError: n_samples=3 should be >= n_clusters=10"
    )


def _probe_rank(rank: int, port: int, out: str, world: int) -> None:
    """CM fitted with the probes and a best checkpoint chosen by the kNN probe's accuracy."""
    _as_launched(rank, port, world)
    make, data, _ = CASES["cm"]
    L.seed_everything(0, verbose=False)
    best = ModelCheckpoint(dirpath=f"{out}/ckpt", monitor="val/knn_acc", mode="max", filename="best")
    trainer = make_trainer(
        devices=world, strategy=DDPStrategy(timeout=timedelta(seconds=60)), max_epochs=2, enable_checkpointing=True,
        default_root_dir=out,
        check_val_every_n_epoch=1, limit_val_batches=1.0,
        callbacks=[ProbeEvaluator(linear_epochs=2, stages=("val",)), best],
    )  # fmt: skip
    trainer.fit(make(), data())
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    torch.save({"logged": logged, "best": best.best_model_path}, os.path.join(out, f"probe.rank{rank}.pt"))


@pytest.mark.slow
def test_a_checkpoint_can_monitor_a_probe_score_under_ddp(tmp_path):
    """The probes are fitted by rank 0 alone, but every rank logs their scores: a checkpoint
    monitoring one looks for it on each rank (rank 1 failed without it, and rank 0 with it)."""
    _spawn(_probe_rank, _free_port(), str(tmp_path), WORLD)
    zero, one = (torch.load(tmp_path / f"probe.rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert {"val/knn_acc", "val/stat_acc", "val/linear_acc"} <= set(zero["logged"])
    assert one["logged"] == zero["logged"]
    assert Path(zero["best"]).name == "best.ckpt"
    assert Path(zero["best"]).is_file()
