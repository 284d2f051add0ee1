"""methods/cm.py: the contract, a real fit on blobs, the averaging epoch, seeds and checkpoints."""

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_trainer, spy_step
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.metrics import adjusted_rand_score

import lightning_protos.methods.cm as cm_module
from lightning_protos.data import Blobs
from lightning_protos.eval.callbacks import ClusteringEvaluator
from lightning_protos.methods.cm import CM
from lightning_protos.ops import cm_terms


def blobs(**kwargs) -> Blobs:
    """Three well-separated blobs in 2-D (400 points)."""
    return Blobs(**{"n_samples": 400, "centers": 3, "batch_size": 32, "seed": 0, **kwargs})


def fit(model: CM, dm, seed: int = 0, **trainer_kwargs) -> L.Trainer:
    L.seed_everything(seed, verbose=False)
    trainer = make_trainer(**{"max_epochs": 3, **trainer_kwargs})
    trainer.fit(model, dm)
    return trainer


def assignments(model: CM, dm) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model.predict_clusters(dm.features("eval")).numpy()


def test_contract_shapes():
    model = CM(n_clusters=4, input_shape=(1, 2, 3), alpha=2.0)
    x = torch.rand(5, 1, 2, 3)
    probs = model.cluster_probs(x)
    assert probs.shape == (5, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    assert model.predict_clusters(x).shape == (5,)
    assert model.embed(x).shape == (5, 4)
    # the latent is the assignment: the prototypes are its K one-hot vertices, decoded to the centroids
    torch.testing.assert_close(model.prototypes(), torch.eye(4))
    assert model.centroids().shape == (4, 6)
    assert model.decode(model.prototypes()).shape == (4, 1, 2, 3)
    torch.testing.assert_close(model.decode(model.prototypes()).reshape(4, 6), model.centroids())
    torch.testing.assert_close(model.centroids(), model.cm.decoder.weight.T + model.cm.decoder.bias)
    assert set(model.selection_criteria(x)) == {"l_sp"}
    assert model.automatic_optimization is False


@pytest.mark.parametrize(
    ("init", "alpha", "lr", "precision"),
    [("kmeans++", 1.0, 0.01, "32-true"), ("random", 10.0, 0.05, "32-true"), ("random", 10.0, 0.05, "bf16-mixed")],
)
@pytest.mark.parametrize("bias_init", ["zeros", "glorot_normal"])
def test_recovers_well_separated_blobs(init, alpha, lr, precision, bias_init):
    dm = blobs()
    model = CM(n_clusters=3, input_shape=(2,), alpha=alpha, lr=lr, init=init, bias_init=bias_init)
    if init == "random":  # the training recovers them (k-means++ finds such blobs before any step)
        assert adjusted_rand_score(dm.labels().numpy(), assignments(model, dm)) < 0.9
    fit(model, dm, max_epochs=20, precision=precision)
    assert adjusted_rand_score(dm.labels().numpy(), assignments(model, dm)) > 0.95


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fits_on_the_gpu_in_bf16():
    from lightning_protos.hardware import check_cuda_arch

    assert check_cuda_arch(torch.cuda.get_device_capability(), torch.cuda.get_arch_list()) is None
    dm = blobs()
    model = CM(n_clusters=3, input_shape=(2,), alpha=10.0, lr=0.05)
    fit(model, dm, max_epochs=20, accelerator="gpu", precision="bf16-mixed")
    assert model.device.type == "cuda"
    model.cpu()
    assert adjusted_rand_score(dm.labels().numpy(), assignments(model, dm)) > 0.95


def test_one_training_step_moves_the_weights():
    dm = blobs()
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, average_last_epoch=False)
    before = {k: v.clone() for k, v in model.cm.state_dict().items()}
    trainer = fit(model, dm, max_steps=1)
    assert trainer.global_step == 1
    for name, value in model.cm.state_dict().items():
        assert not torch.equal(before[name], value), f"{name} did not move"


def step_terms(x: torch.Tensor, **kwargs) -> tuple[CM, dict[str, float]]:
    """A CM (weights drawn after seeding 0) and the terms its training step sums on ``x``."""
    torch.manual_seed(0)
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, average_last_epoch=False, **kwargs)
    return model, spy_step(model, x)[0]


def test_terms_and_e3_weight_choose_and_scale_what_the_step_sums():
    x = torch.randn(6, 2)
    model, full = step_terms(x)
    with torch.no_grad():
        want = {k: float(v) for k, v in cm_terms(x, model.cm(x), model.cm.centroids(), alpha=2.0).items()}
    assert full == pytest.approx(want, rel=1e-6)
    assert step_terms(x, e3_weight=0.25)[1] == pytest.approx({**want, "E3": 0.25 * want["E3"]}, rel=1e-6)
    assert step_terms(x, terms=("E1", "E2"))[1] == pytest.approx({"E1": want["E1"], "E2": want["E2"]}, rel=1e-6)


def test_l_sp_is_e2_plus_e3_of_eq7_by_hand():
    """The model-selection criterion L_sp = E2 + E3 (Eq. 7 with the centroids' norms and their
    cross products), written out with loops in float64."""
    torch.manual_seed(0)
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0)
    x = torch.randn(7, 2)
    with torch.no_grad():
        got = float(model.selection_criteria(x)["l_sp"])
        g, m = (t.double().numpy() for t in (model.cm(x), model.cm.centroids()))
    e2 = sum(g[i, k] * (1 - g[i, k]) * (m[k] @ m[k]) for i in range(7) for k in range(3))
    e3 = -sum(g[i, k] * g[i, j] * (m[k] @ m[j]) for i in range(7) for k in range(3) for j in range(3) if j != k)
    assert abs(e3) > 0.1 * abs(e2)  # both terms weigh: dropping or negating E3 shows
    assert got == pytest.approx(e2 + e3, rel=1e-5)
    # as the evaluator calls it, with the batch's cluster_probs: the same; under average:
    # centroids those are hard assignments, and L_sp stays the softmax layer's
    for average in ("all", "centroids"):
        model.hparams.average = average
        with torch.no_grad():
            got = float(model.eval().selection_criteria(x, model.cluster_probs(x))["l_sp"])
        assert got == pytest.approx(e2 + e3, rel=1e-5)


def test_sgd_is_plain_sgd_at_the_learning_rate():
    optimizer = CM(n_clusters=3, input_shape=(2,), optimizer="sgd", lr=0.5).configure_optimizers()
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["lr"] == 0.5
    assert optimizer.defaults["momentum"] == 0


class Snapshots(L.Callback):
    """Parameters after every training step of the last epoch (what the average accumulates)."""

    def __init__(self) -> None:
        self.steps: list[list[np.ndarray]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1:
            self.steps.append([p.detach().numpy().copy() for p in pl_module.cm.parameters()])


@pytest.mark.parametrize("average", ["all", "centroids"])
def test_the_averaging_epoch_sets_the_parameters_to_their_mean(average):
    dm = blobs(n_samples=96)  # 3 steps an epoch
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05, average=average)
    snaps = Snapshots()
    fit(model, dm, max_epochs=2, callbacks=[snaps])
    assert len(snaps.steps) == 3
    names = [n for n, _ in model.cm.named_parameters()]
    averaged = {"all": names, "centroids": ["decoder.weight", "decoder.bias"]}[average]
    for i, (name, p) in enumerate(model.cm.named_parameters()):
        mean = np.mean([s[i] for s in snaps.steps], axis=0)
        last = snaps.steps[-1][i]
        if name in averaged:
            np.testing.assert_allclose(p.detach().numpy(), mean, rtol=1e-5, atol=1e-6)
            assert not np.allclose(mean, last)  # the mean really differs from the last step
        else:
            np.testing.assert_array_equal(p.detach().numpy(), last)
    x = dm.features("eval")
    with torch.no_grad():
        gamma = model.cm(x)  # the (partly averaged) encoder's softmax
        nearest = torch.cdist(x, model.centroids()).argmin(1)
        model.eval()
        got = model.cluster_probs(x)
    if average == "centroids":  # the encoder was not averaged: predict by the nearest averaged centroid
        torch.testing.assert_close(got, torch.nn.functional.one_hot(nearest, 3).to(got.dtype))
        assert not torch.equal(gamma.argmax(1), nearest)  # ... which the encoder's argmax would not give
    else:
        torch.testing.assert_close(got, gamma)


def test_max_steps_inside_the_last_epoch_averages_the_steps_taken():
    dm = blobs(n_samples=96)  # 3 steps an epoch: max_steps 5 stops after 2 of the last epoch's
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05)
    snaps = Snapshots()
    fit(model, dm, max_epochs=2, max_steps=5, callbacks=[snaps])
    assert len(snaps.steps) == 2
    for i, p in enumerate(model.cm.parameters()):
        mean = np.mean([s[i] for s in snaps.steps], axis=0)
        np.testing.assert_allclose(p.detach().numpy(), mean, rtol=1e-5, atol=1e-6)
    assert int(model.average.count) == 0


class StopAfterBatch(L.Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == self.at:
            trainer.should_stop = True  # a stop inside an epoch


def test_a_stop_inside_the_averaging_epoch_averages_the_steps_taken_before_last_ckpt(tmp_path):
    dm = blobs(n_samples=96)  # 3 steps an epoch; stopped after the first 2 of the last
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05)
    snaps = Snapshots()
    last = ModelCheckpoint(dirpath=tmp_path, filename="last", save_on_train_epoch_end=True)
    fit(model, dm, max_epochs=2, callbacks=[snaps, StopAfterBatch(1, 1), last], min_steps=0, enable_checkpointing=True)
    assert len(snaps.steps) == 2
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    for i, (name, p) in enumerate(model.cm.named_parameters()):
        mean = np.mean([s[i] for s in snaps.steps], axis=0)
        np.testing.assert_allclose(p.detach().numpy(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved[f"cm.{name}"], p.detach())  # the checkpoint holds the average
    assert int(saved["average.count"]) == 0


def test_sums_of_an_earlier_epoch_never_enter_the_average(tmp_path):
    """A checkpoint taken inside the averaging epoch of a 2-epoch fit, resumed with 3 epochs:
    epoch 1 is no longer the last, and the average is that of epoch 2's 3 steps alone."""
    dm = blobs(n_samples=96)  # 3 steps an epoch
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05)
    mid = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}")
    fit(model, dm, max_epochs=2, callbacks=[mid], enable_checkpointing=True)
    assert int(torch.load(tmp_path / "step=5.ckpt", weights_only=True)["state_dict"]["average.count"]) == 2
    resumed, snaps = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05), Snapshots()
    L.seed_everything(0, verbose=False)
    make_trainer(max_epochs=3, callbacks=[snaps]).fit(resumed, dm, ckpt_path=tmp_path / "step=5.ckpt")
    assert len(snaps.steps) == 3
    for i, p in enumerate(resumed.cm.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), np.mean([s[i] for s in snaps.steps], axis=0), atol=1e-6)


class StopAtValidation(L.Callback):
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            trainer.should_stop = True  # as EarlyStopping at a validation inside the epoch


def test_a_stop_asked_by_a_validation_inside_the_averaging_epoch_averages_before_last_ckpt(tmp_path):
    dm = blobs(n_samples=96)  # 3 steps an epoch, a validation after every 2
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05)
    snaps = Snapshots()
    last = ModelCheckpoint(dirpath=tmp_path, filename="last", save_on_train_epoch_end=True)
    fit(model, dm, max_epochs=2, callbacks=[snaps, StopAtValidation(), last], enable_checkpointing=True,
        limit_val_batches=1.0, val_check_interval=2, min_steps=0)  # fmt: skip
    assert len(snaps.steps) == 2
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    for i, (name, p) in enumerate(model.cm.named_parameters()):
        np.testing.assert_allclose(p.detach().numpy(), np.mean([s[i] for s in snaps.steps], axis=0), atol=1e-6)
        torch.testing.assert_close(saved[f"cm.{name}"], p.detach())


def test_a_checkpoint_of_the_averaging_epochs_last_step_resumes_to_the_average(tmp_path):
    """Taken by a step-interval checkpoint at the last step, before the module's hook applies
    the mean: the resumed fit has no step left, and applies it at its end."""
    dm = blobs(n_samples=96)  # 3 steps an epoch: step 6 is the last
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05)
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    fit(model, dm, max_epochs=2, callbacks=[every], enable_checkpointing=True)
    assert int(torch.load(tmp_path / "step=6.ckpt", weights_only=True)["state_dict"]["average.count"]) == 3
    resumed = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05)
    with pytest.warns(UserWarning, match="mean is applied at the end of training"):
        make_trainer(max_epochs=2).fit(resumed, dm, ckpt_path=tmp_path / "step=6.ckpt")
    for a, b in zip(model.cm.parameters(), resumed.cm.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_the_sums_of_a_last_step_checkpoint_of_a_shorter_fit_are_not_averaged_in(tmp_path):
    dm = blobs(n_samples=96)  # a 1-epoch fit, its checkpoint at step 3 holding that epoch's sums
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05)
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    fit(model, dm, max_epochs=1, callbacks=[every], enable_checkpointing=True)
    resumed, snaps = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05), Snapshots()
    make_trainer(max_epochs=2, callbacks=[snaps]).fit(resumed, dm, ckpt_path=tmp_path / "step=3.ckpt")
    assert len(snaps.steps) == 3  # epoch 1's, and only they are averaged
    for i, p in enumerate(resumed.cm.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), np.mean([s[i] for s in snaps.steps], axis=0), atol=1e-6)


def test_a_checkpoint_from_before_the_sums_were_tagged_loads(tmp_path):
    dm = blobs(n_samples=96)
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05)
    mid = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}")
    fit(model, dm, max_epochs=2, callbacks=[mid], enable_checkpointing=True)
    old = torch.load(tmp_path / "step=5.ckpt", weights_only=False)
    del old["state_dict"]["average.epoch"]
    torch.save(old, tmp_path / "old.ckpt")
    loaded = CM.load_from_checkpoint(tmp_path / "old.ckpt", strict=True)
    assert loaded.average.holds(1)  # its 2 steps are the averaging epoch's (epoch 1)
    assert int(loaded.average.count) == 2


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True  # as EarlyStopping does


@pytest.mark.parametrize("stop", ["max_steps", "early_stop"])
def test_a_fit_that_ends_before_the_averaging_epoch_warns_and_keeps_the_last_step(stop):
    dm = blobs(n_samples=96)
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05)
    last = []
    grab = L.pytorch.callbacks.LambdaCallback(
        on_train_batch_end=lambda *a: last.__setitem__(slice(None), [p.detach().clone() for p in model.cm.parameters()])
    )
    how = {"max_steps": {"max_steps": 2}, "early_stop": {"callbacks": [StopAfterFirstEpoch()]}}[stop]
    how["callbacks"] = [*how.get("callbacks", []), grab]
    ended = r"CM: the fit ended at epoch \d, step \d, before its averaging epoch \(the last of max_epochs=3\)"
    with pytest.warns(UserWarning, match=ended):
        fit(model, dm, max_epochs=3, **how)
    for want, p in zip(last, model.cm.parameters(), strict=True):
        assert torch.equal(want, p)


def test_the_last_validation_scores_the_averaged_model(tmp_path):
    dm = blobs(n_samples=96)
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05)
    evaluator = ClusteringEvaluator()
    trainer = fit(model, dm, max_epochs=2, callbacks=[evaluator], limit_val_batches=1.0, default_root_dir=tmp_path)
    val = dict(evaluator.results["val"])
    trainer.test(model, dm, verbose=False)  # the same samples, after the fit
    assert evaluator.results["test"]["l_sp"] == pytest.approx(val["l_sp"], rel=1e-6)


def test_the_evaluator_counts_the_clusters_the_predictions_use(tmp_path):
    """``n_clusters_used``: the distinct predicted clusters (the headline on unlabelled data), not K."""
    dm = blobs(n_samples=96)
    model, evaluator = CM(n_clusters=5, input_shape=(2,), average_last_epoch=False), ClusteringEvaluator()
    with torch.no_grad():  # gamma's logits favour clusters 1 and 3 only, by the sign of x_0
        model.cm.encoder.weight.zero_()
        model.cm.encoder.weight[1, 0], model.cm.encoder.weight[3, 0] = 100.0, -100.0
        model.cm.encoder.bias.fill_(-10.0)
    trainer = make_trainer(default_root_dir=tmp_path, callbacks=[evaluator], limit_val_batches=1.0)
    trainer.validate(model, dm, verbose=False)
    used = model.predict_clusters(dm.features("eval")).unique().tolist()
    assert used == [1, 3]
    assert evaluator.results["val"]["n_clusters_used"] == 2


def test_no_averaging_keeps_the_last_step():
    dm = blobs(n_samples=96)
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, lr=0.05, average_last_epoch=False)
    snaps = Snapshots()
    fit(model, dm, max_epochs=1, callbacks=[snaps])
    for i, p in enumerate(model.cm.parameters()):
        np.testing.assert_array_equal(p.detach().numpy(), snaps.steps[-1][i])


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_same_seed_gives_identical_assignments(init, deterministic):
    runs = []
    for _ in range(2):
        dm = blobs(n_samples=200, cluster_std=2.0)
        L.seed_everything(5, verbose=False)
        model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, init=init)
        fit(model, dm, seed=5, max_epochs=2)
        runs.append((assignments(model, dm), [p.detach().clone() for p in model.parameters()]))
    assert np.array_equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)


def test_step_batch_takes_the_same_steps_as_loading_that_batch_size():
    runs = []
    for batch_size, step_batch in ((32, None), (96, 32)):
        L.seed_everything(3, verbose=False)
        model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, step_batch=step_batch)
        trainer = fit(model, blobs(n_samples=400, batch_size=batch_size), seed=3, max_epochs=2)
        runs.append(([p.detach().clone() for p in model.parameters()], trainer.global_step))
    assert runs[0][1] == runs[1][1] == 2 * 13  # 12 steps of 32 and one of 16, per epoch
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        torch.testing.assert_close(a, b)


def test_checkpoint_restores_probs_and_the_init_flag(tmp_path):
    dm = blobs(n_samples=200)
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, init="kmeans++")
    assert not bool(model.initialised)
    trainer = fit(model, dm, max_epochs=2)
    assert bool(model.initialised)
    path = tmp_path / "cm.ckpt"
    trainer.save_checkpoint(path)
    restored = CM.load_from_checkpoint(path, strict=True)
    assert bool(restored.initialised)
    assert restored.hparams.init == "kmeans++"
    assert restored.n_clusters == 3
    model.eval()
    restored.eval()
    x = dm.features("eval")
    with torch.no_grad():
        assert torch.equal(model.cluster_probs(x), restored.cluster_probs(x))
    # (the averaging sums, emptied once applied, are restored mid-epoch: tests/test_resume.py)


def test_kmeans_init_runs_once_and_not_on_resume(tmp_path, monkeypatch):
    dm = blobs(n_samples=200)
    calls = []
    real = cm_module.kmeans_pp_centres

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cm_module, "kmeans_pp_centres", counting)
    model = CM(n_clusters=3, input_shape=(2,), alpha=2.0, init="kmeans++")
    trainer = fit(model, dm, max_epochs=1)
    assert len(calls) == 1
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = CM(n_clusters=3, input_shape=(2,), alpha=2.0, init="kmeans++")
    resumed = make_trainer(max_epochs=2, limit_train_batches=0)  # restore only, no new steps
    resumed.fit(fresh, dm, ckpt_path=path)
    assert len(calls) == 1, "k-means++ ran again on resume"
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, before[name]), name
