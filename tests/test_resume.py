"""Exact resume: a run stopped after an epoch, or killed in the middle of one, and resumed from
its checkpoint ends where an uninterrupted run with the same seed ends (same batches, same
averaging epoch, same random draws, same centroids and buffers, same metrics)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from conftest import RandomStream, TwoSplits, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_protos.data import Digits
from lightning_protos.data.base import EpochShuffle, ResumableLoader, TensorBatches, collate_batch
from lightning_protos.errors import ProtosError
from lightning_protos.eval.metrics import clustering_scores
from lightning_protos.methods.aecm import AECM
from lightning_protos.methods.cm import CM
from lightning_protos.methods.dcn import DCN
from lightning_protos.methods.dec import DEC, IDEC
from lightning_protos.methods.dkm import DKM
from lightning_protos.methods.gmvae import GMVAE
from lightning_protos.methods.protovae import InfoVAE, ProtoVAE
from lightning_protos.methods.vade import VaDE
from lightning_protos.methods.vae import VAEKMeans
from lightning_protos.methods.vaesim import VAESim


def _decoded_prototypes(model) -> torch.Tensor:
    """``decode(prototypes())`` in eval mode: the centroids for the CM (whose prototypes are the
    one-hot assignments), the decoded centroids / prototypes for AE-CM and VAESim."""
    model.eval()
    with torch.no_grad():
        protos = model.prototypes()
        return torch.empty(0) if protos is None else model.decode(protos)  # InfoVAE: no prototypes


def _fit(tmp_path, model, epochs: int, ckpt_path=None, seed: int = 0, max_steps: int = -1) -> L.Trainer:
    L.seed_everything(seed)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer = L.Trainer(
        max_epochs=epochs, max_steps=max_steps, enable_progress_bar=False, logger=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[every_epoch], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, Digits(batch_size=64, flatten=True), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(
    ("make", "epochs"),
    [
        (lambda: CM(10, (64,), alpha=20.0, init="kmeans++"), 4),
        (
            lambda: AECM(
                10,
                (64,),
                latent_dim=5,
                hidden=(16,),
                alpha=20.0,
                init="pretrained",
                pretrain_epochs=1,
                cm_epochs=1,
                pretrain_cache=False,
            ),
            5,
        ),
    ],
    ids=["cm", "aecm"],
)
def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, make, epochs):
    L.seed_everything(0)
    straight = make()
    _fit(tmp_path / "a", straight, epochs)
    L.seed_everything(123)  # the resumed process starts from a different global RNG state ...
    resumed = make()
    _fit(tmp_path / "b", resumed, epochs, ckpt_path=tmp_path / "a" / "ckpt" / "epoch=1.ckpt", seed=123)
    x = Digits(flatten=True).features("eval")
    assert torch.allclose(_decoded_prototypes(straight), _decoded_prototypes(resumed), atol=1e-6)
    with torch.no_grad():
        assert torch.equal(straight.predict_clusters(x), resumed.predict_clusters(x))


def test_a_data_module_reused_for_a_new_fit_shuffles_by_that_fit_s_seed(tmp_path):
    """The training order's seed is kept for a resume, not across fits: a second fit of the same
    data module under another seed draws another order, and under the same seed the same one."""
    dm = Digits(batch_size=64, flatten=True)
    firsts = []

    class FirstBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                firsts.append(batch["index"].tolist())

    for seed in (1, 2, 1):
        L.seed_everything(seed, verbose=False)
        model = CM(10, (64,), alpha=20.0, init="kmeans++")
        make_trainer(max_epochs=1, limit_train_batches=1, callbacks=[FirstBatch()]).fit(model, dm)
    assert firsts[0] != firsts[1]
    assert firsts[0] == firsts[2]


# -- mid-epoch: a run killed between two batches --------------------------------------
class Killed(RuntimeError):
    """Stands for the job being killed."""


class KillAt(L.Callback):
    """Raises :class:`Killed` before the batch after ``step`` optimiser steps, i.e. once the
    step's checkpoint is on disk (checkpoint callbacks run last in ``on_train_batch_end``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.global_step == self.step:
            raise Killed(f"killed at step {self.step}, batch {batch_idx} of epoch {trainer.current_epoch}")


def _run(root, make, dm, epochs: int, kill_at: int | None = None, ckpt_path=None, seed: int = 0):
    """A fit that saves a checkpoint every ``kill_at`` steps (and dies at ``kill_at``)."""
    L.seed_everything(seed, verbose=False)
    model = make()
    callbacks = [] if kill_at is None else [KillAt(kill_at)]
    if kill_at is not None:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=kill_at, save_top_k=-1, filename="{step}"))
    trainer = make_trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=kill_at is not None)
    if kill_at is not None:
        with pytest.raises(Killed):
            trainer.fit(model, dm(), ckpt_path=ckpt_path)
        return model, trainer
    trainer.fit(model, dm(), ckpt_path=ckpt_path)
    return model, trainer


def _scores(model, dm) -> dict[str, float]:
    data = dm()
    x, y = data.features("eval"), data.labels("eval")
    model.eval()
    with torch.no_grad():
        return clustering_scores(y.numpy(), model.predict_clusters(x).numpy())


def _assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")


def digits64():
    return Digits(batch_size=64, flatten=True)  # 1797 samples: 29 batches an epoch


def tiny_images():
    """48 random 1 x 28 x 28 images, 3 batches an epoch (VAESim's smallest input)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8, generator=g)
    return TwoSplits((x, torch.arange(48) % 2), batch_size=16, eval_batch_size=48)


PRETRAINED = {"init": "pretrained", "cm_epochs": 1, "pretrain_cache": False}
SMALL_AE = {"latent_dim": 5, "hidden": (16,), "pretrain_epochs": 1, "pretrain_cache": False}
CONV = {"latent_dim": 4, "channels": (4, 8, 8)}
MID_EPOCH = {
    # (model, data, epochs, killed after this many steps: mid-epoch, in the averaging epoch)
    "cm": (lambda: CM(10, (64,), alpha=20.0, init="kmeans++"), digits64, 3, 2 * 29 + 11),
    "aecm": (
        lambda: AECM(10, (64,), latent_dim=5, hidden=(16,), alpha=20.0, pretrain_epochs=1, **PRETRAINED),
        digits64,
        4,
        3 * 29 + 7,
    ),
    # clipping every step: the epoch's clipped-step count and largest norm carry across the kill
    "dcn": (
        lambda: DCN(10, (64,), latent_dim=5, hidden=(16,), pretrain_epochs=1, pretrain_cache=False, max_grad_norm=1e-3),
        digits64,
        3,
        2 * 29 + 11,
    ),
    # VAESim draws its assignments and the reparameterisation noise from the global generator:
    # the resumed run must restore it, and the temperature position, mid-epoch
    "vaesim": (
        lambda: VAESim(n_clusters=4, latent_dim=4, channels=(4, 8, 8), assign="sample", lr=1e-3),
        tiny_images,
        3,
        4,
    ),
    # the target P of the last refresh and the refresh position (every 7 iterations: the kill
    # falls between two refreshes)
    "dec": (lambda: DEC(10, (64,), update_interval=7, tol=None, **SMALL_AE), digits64, 3, 2 * 29 + 11),
    "idec": (
        lambda: IDEC(n_clusters=10, input_shape=(64,), update_interval=7, tol=None, **SMALL_AE),
        digits64,
        3,
        2 * 29 + 11,
    ),
    "dkm": (lambda: DKM(10, (64,), **SMALL_AE), digits64, 4, 3 * 29 + 7),  # the annealed alpha
    "vade": (lambda: VaDE(2, (1, 28, 28), pretrain_epochs=1, **CONV), tiny_images, 3, 7),  # after the GMM
    "gmvae": (lambda: GMVAE(2, (1, 28, 28), w_dim=2, prior_hidden=8, **CONV), tiny_images, 3, 4),
    "vaekmeans": (lambda: VAEKMeans(2, (1, 28, 28), k_min=None, **CONV), tiny_images, 3, 4),
    # three updates a batch after a one-epoch warm-up (3 steps): killed after a batch of epoch 1
    "protovae": (
        lambda: ProtoVAE(3, (1, 28, 28), latent_dim=8, channels=(4, 8), bottleneck_dim=16, warmup_epochs=1),
        tiny_images,
        3,
        6,
    ),
    "infovae": (  # the MMD's prior samples
        lambda: InfoVAE(input_shape=(1, 28, 28), latent_dim=8, channels=(4, 8), bottleneck_dim=16),
        tiny_images,
        3,
        4,
    ),
}


@pytest.mark.parametrize("name", list(MID_EPOCH))
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, name):
    make, dm, epochs, kill_at = MID_EPOCH[name]
    straight, straight_trainer = _run(None, make, dm, epochs)
    _, killed = _run(tmp_path, make, dm, epochs, kill_at=kill_at)
    assert 0 < killed.fit_loop.epoch_loop.batch_progress.current.completed < killed.num_training_batches
    ckpt = tmp_path / f"step={kill_at}.ckpt"
    # a fresh process: another seed, fresh weights; everything comes from the checkpoint
    resumed, trainer = _run(None, make, dm, epochs, ckpt_path=ckpt, seed=123)
    assert trainer.global_step == straight_trainer.global_step > 0
    torch.testing.assert_close(_decoded_prototypes(resumed), _decoded_prototypes(straight), rtol=1e-5, atol=1e-6)
    _assert_same_state(resumed, straight)
    assert _scores(resumed, dm) == pytest.approx(_scores(straight, dm), abs=1e-9)
    # the last epoch's logged loss means (and clipping statistics) count the steps before the kill
    logged = {k: float(v) for k, v in straight_trainer.callback_metrics.items() if k.startswith("train/")}
    assert logged
    assert {k: float(trainer.callback_metrics[k]) for k in logged} == pytest.approx(logged, rel=1e-5)
    if name == "dcn":
        assert logged["train/clipped_steps"] == trainer.num_training_batches


def test_the_loader_skips_the_batches_served_before_a_mid_epoch_checkpoint():
    dataset = TensorBatches(torch.arange(10).reshape(10, 1), None, with_labels=False)

    def loader():
        return ResumableLoader(dataset, batch_size=3, sampler=EpochShuffle(dataset, seed=5), collate_fn=collate_batch)

    first = loader()
    first.sampler.set_epoch(2)
    full = [b["index"].tolist() for b in first]
    it = iter(first)
    seen = [next(it)["index"].tolist(), next(it)["index"].tolist()]
    assert seen == full[:2]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 2, "seed": 5}
    again = loader()
    again.sampler.seed = 99  # a resumed job started with another seed shuffles as the checkpointed one
    again.load_state_dict(state)
    again.sampler.set_epoch(2)
    assert [b["index"].tolist() for b in again] == full[2:]
    assert again.state_dict() == {"epoch": 2, "batches": len(full), "seed": 5}  # counts the skipped batches too
    # a checkpoint at an epoch's end resumes at the next epoch's first batch
    later = loader()
    later.load_state_dict({"epoch": 2, "batches": len(full)})
    later.sampler.set_epoch(3)
    assert len([b for b in later]) == len(full)


def test_each_epoch_is_its_own_seeded_permutation():
    """EpochShuffle: epoch e is randperm(N) from seed + e, so epochs differ and a resumed run
    redraws the same order for the same epoch."""
    dataset = TensorBatches(torch.arange(10).reshape(10, 1), None, with_labels=False)
    sampler = EpochShuffle(dataset, seed=5)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert orders[-1] == torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
    assert orders[0] != orders[1] != orders[2]


# -- a non-finite loss: the run stops, the last good checkpoint stays --------------------
class PoisonAt(L.Callback):
    """Puts a NaN into the batch of step ``step`` (bad data, or an overflow, in a long run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.global_step == self.step:
            batch["x"][0, 0] = float("nan")


# every step (a CPU's default), every 7 steps (read mid-epoch, after the NaN's step) and every
# 1000 (an accelerator's deferred read: only the epoch's end catches it, before its checkpoint)
@pytest.mark.parametrize("check_every", [None, 7, 1000])
def test_a_nan_stops_the_run_naming_term_and_step_and_keeps_the_last_good_checkpoint(tmp_path, check_every):
    L.seed_everything(0, verbose=False)
    # as the CLI's last_checkpoint: a rolling last.ckpt written at every epoch's end
    last = ModelCheckpoint(
        dirpath=tmp_path, filename="last", save_top_k=1, enable_version_counter=False, save_on_train_epoch_end=True
    )
    trainer = make_trainer(max_epochs=5, callbacks=[last, PoisonAt(2 * 29 + 5)], enable_checkpointing=True)
    model = CM(10, (64,), alpha=20.0, init="kmeans++")
    model.finite_check_every = check_every
    with pytest.raises(FloatingPointError, match=r"^non-finite loss term E1, E2, E3, E4 at epoch 2, step 63: "):
        trainer.fit(model, digits64())
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)  # loads: written whole, before the NaN
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 2 * 29)  # the end of the last complete epoch
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    resumed = CM.load_from_checkpoint(tmp_path / "last.ckpt")
    assert torch.isfinite(resumed.centroids()).all()


def _first_draws(model, ckpt=None) -> str:
    """torch's generator after the first batch of a fresh 1-epoch fit (seed 5) of ``model``,
    after a validation that reads ``ckpt``."""
    if ckpt is not None:
        make_trainer(limit_val_batches=1.0).validate(model, tiny_images(), ckpt_path=ckpt, verbose=False)
    L.seed_everything(5, verbose=False)
    stream = RandomStream()
    make_trainer(max_epochs=1, callbacks=[stream]).fit(model, tiny_images())
    return stream.digests[1]


def test_a_checkpoint_read_for_evaluation_leaves_a_later_fit_alone_and_old_checkpoints_resume(tmp_path):
    """Only a fit resumed from a checkpoint takes its generators: a ``validate(ckpt_path=...)``
    before a fresh ``fit`` does not hand them to that fit. A checkpoint written before the
    per-rank generators and the run's seed were stored still resumes, exactly."""
    make, dm, epochs, kill_at = MID_EPOCH["vaesim"]
    _run(tmp_path, make, dm, epochs, kill_at=kill_at)
    ckpt = tmp_path / f"step={kill_at}.ckpt"
    weights = torch.load(ckpt, weights_only=False)["state_dict"]
    plain = make()
    plain.load_state_dict(weights)
    assert _first_draws(make(), ckpt) == _first_draws(plain)

    old = torch.load(ckpt, weights_only=False)
    resume = old["protos_resume"]  # as written then: rank 0's generators, no run seed
    resume["rng"] = resume.pop("rng_ranks")[0]
    del resume["run_seed"]
    torch.save(old, tmp_path / "old.ckpt")
    straight, _ = _run(None, make, dm, epochs)
    resumed, _ = _run(None, make, dm, epochs, ckpt_path=tmp_path / "old.ckpt")  # the same seed: run_seed unknown
    _assert_same_state(resumed, straight)


def test_a_checkpoint_of_another_method_or_other_data_is_refused_in_one_line(tmp_path):
    def dec(cls):
        return cls(
            n_clusters=10,
            input_shape=(64,),
            latent_dim=5,
            hidden=(16,),
            init="pretrained",
            pretrain_epochs=1,
            pretrain_cache=False,
        )

    _fit(tmp_path, dec(DEC), 2)
    ckpt = tmp_path / "ckpt" / "epoch=1.ckpt"
    with pytest.raises(ProtosError, match="the checkpoint holds a DEC, not a IDEC"):
        _fit(tmp_path / "idec", dec(IDEC), 3, ckpt_path=ckpt)  # the same weights' names
    fewer = TwoSplits((torch.rand(50, 64), None), batch_size=64)
    trainer = make_trainer(max_epochs=3)
    with pytest.raises(ProtosError, match=r"buffers \(.*target_p.*\) hold 1797 training samples, the data 50"):
        trainer.fit(dec(DEC), fewer, ckpt_path=ckpt)


def test_a_checkpoint_of_the_pretraining_epochs_resumes(tmp_path):
    # its per-sample buffers hold no row yet: they are sized at the first clustering epoch
    def dec():
        return DEC(n_clusters=10, input_shape=(64,), latent_dim=5, hidden=(16,), init="pretrained", pretrain_epochs=2)

    _fit(tmp_path, dec(), 1)
    trainer = _fit(tmp_path / "more", dec(), 3, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert trainer.current_epoch == 3
    assert bool(trainer.lightning_module.initialised)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DEC(10, (1, 28, 28), latent_dim=5, hidden=(16,), init="pretrained", pretrain_epochs=3),
        lambda: AECM(10, (1, 28, 28), latent_dim=5, hidden=(16,), init="pretrained", pretrain_epochs=1, cm_epochs=2),
        lambda: VaDE(4, (1, 28, 28), latent_dim=4, channels=(4, 8, 8), pretrain_epochs=3),
        lambda: ProtoVAE(4, (1, 28, 28), latent_dim=4, channels=(4, 8), bottleneck_dim=8, warmup_epochs=3),
    ],
    ids=["dec", "aecm", "vade", "protovae"],
)
def test_a_fit_that_ends_before_clustering_says_so_before_training(make, tmp_path):
    # a warning, not an error: a run may be trained in parts, each resumed from the last
    trainer = make_trainer(max_epochs=3, limit_train_batches=1, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"max_epochs \(3\) ends within the 3 epochs of pretraining / warm-up"):
        trainer.fit(make(), tiny_images())


@pytest.mark.parametrize("rank", [0, 1])
def test_a_resume_onto_another_gpu_count_reseeds_cuda_on_ranks_above_zero(monkeypatch, rank):
    """No GPU here: torch.cuda is faked as one visible device, the checkpoint holds two. The
    CUDA states cannot be restored; a rank > 0 then seeds its CUDA stream from (run seed, rank,
    step), so that it does not draw rank 0's; rank 0 keeps the stream it has."""
    from types import SimpleNamespace

    from lightning_protos.methods.distributed import rank_seed, rng_state, set_rng_state

    state = {**rng_state(), "cuda": [torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)]}
    restored, seeded = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    assert set_rng_state(state) is False  # two GPUs' states on one
    assert restored == []
    assert set_rng_state({**state, "cuda": state["cuda"][:1]}) is True
    assert len(restored) == 1

    model = CM(n_clusters=3, input_shape=(2,))
    model._trainer = SimpleNamespace(global_rank=rank, global_step=5, current_epoch=1)
    model._run_seed, model._own_stream = 7, False
    model._resumed = {"rng_ranks": [state, state], "epoch": 0}
    model.on_train_batch_start({"x": torch.zeros(1, 2)}, 0)
    assert seeded == ([rank_seed(7, 1, 5)] if rank else [])


@pytest.mark.parametrize(
    "make",
    [lambda: CM(10, (64,), alpha=20.0), lambda: VAESim(4, (64,), network="mlp", hidden=(16,), latent_dim=4)],
    ids=["cm", "vaesim"],
)
def test_a_fit_continued_with_another_length_warns_where_the_method_spans_the_fit(tmp_path, make):
    """The averaging epoch is the fit's last, VAESim's temperature anneals over the fit's steps:
    continuing a 1-epoch fit to 2 epochs does not end as a 2-epoch fit, and says so; the same
    length (a killed run resumed) does not warn, nor does a method with nothing of the kind."""
    _fit(tmp_path / "a", make(), 1)
    with pytest.warns(UserWarning, match=r"continues one of max_epochs 1 with max_epochs 2: .* follows the new length"):
        _fit(tmp_path / "b", make(), 2, ckpt_path=tmp_path / "a" / "ckpt" / "epoch=0.ckpt")
    _fit(tmp_path / "c", make(), 3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*continues one of max_epochs")
        _fit(tmp_path / "d", make(), 3, ckpt_path=tmp_path / "c" / "ckpt" / "epoch=0.ckpt")
        dec = lambda: DEC(10, (64,), latent_dim=4, hidden=(16,), init="random")  # noqa: E731
        _fit(tmp_path / "e", dec(), 1)
        _fit(tmp_path / "f", dec(), 2, ckpt_path=tmp_path / "e" / "ckpt" / "epoch=0.ckpt")
        if isinstance(make(), CM):  # the averaging epoch is the last of max_epochs, whatever max_steps
            _fit(tmp_path / "g", make(), 3, ckpt_path=tmp_path / "c" / "ckpt" / "epoch=0.ckpt", max_steps=100)
    if isinstance(make(), VAESim):  # its temperature anneals over the fit's steps, which max_steps caps
        with pytest.warns(UserWarning, match=r"continues one of max_steps -1 with max_steps 40: "):
            _fit(tmp_path / "h", make(), 3, ckpt_path=tmp_path / "c" / "ckpt" / "epoch=0.ckpt", max_steps=40)
