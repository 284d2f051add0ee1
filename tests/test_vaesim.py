"""VAESim, the VAE / VAE+KMeans baseline, the probes and the stratification export: ops against
hand-computed values and independent references, the prototype buffer outside autograd, the
temperature schedule, strict checkpoint restores, the predict CSVs, bad input, a short fit."""

from __future__ import annotations

import csv
import io
import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TwoSplits, check_contract, cli_fit_then_predict, fixed_draw, make_trainer
from scipy.special import softmax
from sklearn.datasets import make_blobs
from sklearn.metrics.pairwise import cosine_similarity
from torch.distributions import Normal, kl_divergence

from lightning_protos.errors import ProtosError
from lightning_protos.eval.callbacks import AssignmentWriter, ClusteringEvaluator
from lightning_protos.eval.images import InspectionImages, similarities
from lightning_protos.eval.probes import (
    ProbeEvaluator,
    holdout_split,
    knn_accuracy,
    linear_probe_accuracy,
    statistical_accuracy,
)
from lightning_protos.methods.vae import VAE, VAEKMeans
from lightning_protos.methods.vaesim import VAESim
from lightning_protos.ops.elbow import elbow_kmeans, kneedle_elbow
from lightning_protos.ops.mixture import gaussian_kl
from lightning_protos.ops.vaesim import (
    draw_assignments,
    ema_prototype_update,
    ortho_loss,
    similarity,
    soft_assign,
    temperature,
)

SMALL = {"n_clusters": 4, "latent_dim": 4, "channels": (4, 8, 8)}  # a tiny network for CPU tests


def tiny_images(size: int = 28, n_train: int = 32, n_test: int = 12, batch_size: int = 16) -> TwoSplits:
    """Random uint8 images 1 x size x size with two labels: 2 batches a training epoch."""
    g = torch.Generator().manual_seed(0)
    train = (torch.randint(0, 256, (n_train, 1, size, size), dtype=torch.uint8, generator=g), torch.arange(n_train) % 2)
    test = (torch.randint(0, 256, (n_test, 1, size, size), dtype=torch.uint8, generator=g), torch.arange(n_test) % 2)
    return TwoSplits(train, test, batch_size=batch_size, eval_batch_size=8, fit_on="train")


def fit(model, dm, epochs: int = 2, seed: int = 0, ckpt_path=None, **kwargs) -> L.Trainer:
    L.seed_everything(seed, verbose=False)
    trainer = make_trainer(max_epochs=epochs, **kwargs)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer


def vaesim(**kwargs) -> VAESim:
    L.seed_everything(0, verbose=False)
    return VAESim(**{**SMALL, **kwargs})


# -- ops ------------------------------------------------------------------------------
@pytest.mark.parametrize("prior_std", [1.0, 0.8])
def test_gaussian_kl_matches_torch_distributions(prior_std):
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    want = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), prior_std))
    torch.testing.assert_close(gaussian_kl(mu, logvar, prior_std), want)


def test_similarity_cosine_and_dot():
    g = torch.Generator().manual_seed(0)
    z, q = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(similarity(z, q, "cos").numpy(), cosine_similarity(z.numpy(), q.numpy()))
    np.testing.assert_allclose(similarity(z, q, "dot").numpy(), z.numpy() @ q.numpy().T)


def test_ema_update_equals_algorithm_2_on_a_hand_made_batch():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    z = torch.tensor([[3.0, 1.0], [1.0, 3.0], [0.0, 0.0], [4.0, -2.0]], dtype=torch.float64)
    assign = torch.tensor([0, 0, 2, 2])  # prototype 1 gets no sample
    # Q_0 = 0.95 * mean((3, 1), (1, 3)) + 0.05 * (1, 0) = 0.95 * (2, 2) + (0.05, 0)
    # Q_2 = 0.95 * mean((0, 0), (4, -2)) + 0.05 * (2, 2) = 0.95 * (2, -1) + (0.1, 0.1)
    want = torch.tensor([[1.95, 1.9], [0.0, 1.0], [2.0, -0.85]], dtype=torch.float64)
    got = ema_prototype_update(q, z, assign, eta=0.95)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[1], q[1])
    torch.testing.assert_close(ema_prototype_update(q, z, assign, eta=0.0), q)


def test_ema_update_over_two_ranks_is_the_update_on_their_joined_batch(two_ranks):
    g = torch.Generator().manual_seed(0)
    q, z = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(9, 2, generator=g, dtype=torch.float64)
    assign = torch.tensor([0, 0, 1, 2, 2, 2, 0, 1, 0])  # rank 0 gets no sample of prototype 1
    want = ema_prototype_update(q, z, assign)  # one process, the whole batch
    got = two_ranks.run(ema_prototype_update, (q, z[:2], assign[:2]), (q, z[2:], assign[2:]))
    for per_rank in got:  # every rank holds the same matrix: that of the union of their batches
        torch.testing.assert_close(per_rank, want)


@pytest.mark.parametrize("kind", ["cos", "dot"])
def test_soft_assign_is_eq_1_against_scipy(kind):
    g = torch.Generator().manual_seed(0)
    z, q = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    s = cosine_similarity(z.numpy(), q.numpy()) if kind == "cos" else z.numpy() @ q.numpy().T
    want = softmax(s / 0.3, axis=1)
    np.testing.assert_allclose(soft_assign(z, q, 0.3, kind).numpy(), want, rtol=1e-12)
    model = vaesim(similarity=kind).double()
    model.Q.copy_(q)
    np.testing.assert_allclose(model.condition(z, 0.3).double().numpy(), want, rtol=1e-5, atol=1e-7)  # in float32


def test_draw_assignments():
    c = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    assert draw_assignments(c, "argmax").tolist() == [1, 2]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([draw_assignments(c, "sample", generator=g) for _ in range(4000)])
    assert (draws[:, 0] == 1).all()
    freq = torch.bincount(draws[:, 1], minlength=3).double() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), atol=0.03, rtol=0)
    # a NaN row (a diverged step, whose finite check a GPU defers) draws, so the check can name the term
    nan = torch.tensor([[float("nan")] * 3, [0.0, 0.0, 1.0]])
    assert draw_assignments(nan, "sample", generator=g)[1] == 2


def test_temperature_schedules():
    steps = range(9)  # 8 training steps, and the end
    paper = [temperature(s, 8, "paper") for s in steps]
    np.testing.assert_allclose(paper, [1.0, 0.7525, 0.505, 0.2575, 0.01, 0.01, 0.01, 0.01, 0.01])
    hot = [temperature(s, 8, "quarter_hot", tau_hot=5.0) for s in steps]
    np.testing.assert_allclose(hot, [5.0, 5.0, 1.0, 0.505, 0.01, 0.01, 0.01, 0.01, 0.01])
    assert [temperature(s, 8, "code") for s in steps] == [1.0] * 9


def test_ortho_loss_by_hand():
    # Q Q^T = [[1, 1], [1, 2]]; minus I: [[0, 1], [1, 1]]; squared entries sum to 3
    assert float(ortho_loss(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))) == pytest.approx(3.0)


def test_kneedle_matches_the_hand_computed_difference_curve():
    # x_n = 0, .2, .4, .6, .8, 1; 1 - y_n = 0, .625, .9375, .958, .979, 1; D = y' - x_n peaks at
    # K=3 (.5375); its threshold .5375 - .2 = .3375 is crossed at K=5 (D = .179): the elbow is K=3
    assert kneedle_elbow([1, 2, 3, 4, 5, 6], [100, 40, 10, 8, 6, 4]) == 2
    with pytest.raises(ValueError, match=">= 3 points"):
        kneedle_elbow([2, 3], [5, 1])


def test_elbow_picks_the_number_of_blobs():
    x, _ = make_blobs(n_samples=400, centers=4, n_features=3, cluster_std=0.5, random_state=0)
    k, centres, inertias = elbow_kmeans(torch.as_tensor(x), list(range(2, 11)), seed=0)
    assert k == 4
    assert centres.shape == (4, 3)
    assert np.all(np.diff(inertias) <= 1e-6 * inertias[0])


# -- probes ---------------------------------------------------------------------------
def test_statistical_accuracy_with_more_clusters_than_classes():
    # 5 clusters, 2 classes. Fit: cluster 0 -> {0, 0, 1} -> 0; 1 -> {1, 1} -> 1; 2 -> {1, 1, 0} -> 1;
    # 3 -> {0} -> 0; cluster 4 is empty on the fitting split -> the overall majority, 1 (5 of 9).
    fit_k = [0, 0, 0, 1, 1, 2, 2, 2, 3]
    fit_y = [0, 0, 1, 1, 1, 1, 1, 0, 0]
    eval_k = [0, 1, 2, 3, 4, 4, 0]
    eval_y = [0, 1, 0, 0, 1, 0, 1]
    # predictions 0, 1, 1, 0, 1, 1, 0: right, right, wrong, right, right, wrong, wrong = 4 / 7
    assert statistical_accuracy(fit_k, fit_y, eval_k, eval_y) == pytest.approx(4 / 7)


def test_knn_and_linear_probes_on_separable_embeddings():
    x, y = make_blobs(n_samples=120, centers=[[-4, 0], [4, 0], [0, 6]], cluster_std=0.5, random_state=0)
    fit_x, fit_y, eval_x, eval_y = x[:80], y[:80], x[80:], y[80:]
    assert knn_accuracy(fit_x, fit_y, eval_x, eval_y, k=5) == 1.0
    t = [
        torch.as_tensor(fit_x).float(),
        torch.as_tensor(fit_y),
        torch.as_tensor(eval_x).float(),
        torch.as_tensor(eval_y),
    ]
    before = torch.random.get_rng_state()
    assert linear_probe_accuracy(*t, lr=1e-2, epochs=100, batch_size=16) == 1.0
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is untouched
    # the same seed gives the same probe; 10 outputs (the authors' code) for 3 classes works too
    assert linear_probe_accuracy(*t, lr=1e-3, epochs=10, n_outputs=10) == linear_probe_accuracy(
        *t, lr=1e-3, epochs=10, n_outputs=10
    )
    # fewer outputs than labels (the code's 10 on a data set of 12 classes): one output a class,
    # so classes 10 and 11 are predicted too (10 outputs would score at most 10 / 12)
    labels = torch.arange(120) % 12
    features = 4 * torch.nn.functional.one_hot(labels, 12).float() + 0.1 * torch.randn(120, 12)
    many = [features[:80], labels[:80], features[80:], labels[80:]]
    assert linear_probe_accuracy(*many, lr=1e-2, epochs=100, batch_size=16, n_outputs=10) == 1.0


class NoisyStub(torch.nn.Module):
    """A stand-in method: a fixed random linear embedding and 6 clusters read off it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 4)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(3))

    @property
    def device(self):
        return torch.device("cpu")

    def embed(self, x):
        return self.proj(x.reshape(len(x), -1))

    def predict_clusters(self, x):
        return (self.embed(x)[:, 0] * 2).floor().clamp(-3, 2).long() + 3


@pytest.mark.parametrize("fit_on", ["train", "all"])
def test_the_probes_fit_on_the_fitting_split_and_score_the_evaluation_split(fit_on):
    """ProbeEvaluator's four accuracies equal the plain probes on the contract's outputs: the
    cluster-to-label map, kNN and both linear probes fitted on the fitting samples and scored on
    the evaluation samples (with one split, the holdout_split of the fitting samples)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (300, 1, 4, 4), dtype=torch.uint8, generator=g)
    y = ((x.float().reshape(300, -1)[:, :3].sum(1) / 128).long() + torch.randint(0, 2, (300,), generator=g)) % 4
    dm = TwoSplits((x[:200], y[:200]), (x[200:], y[200:]), fit_on=fit_on, batch_size=50)
    stub = NoisyStub()
    evaluator = ProbeEvaluator(
        knn_k=3, linear_lr=0.05, linear_epochs=20, linear_batch_size=32, reference_linear=True, seed=4
    )
    with torch.no_grad():
        got = evaluator.scores(stub, dm)
        fit_x, fit_y = dm.features("fit"), dm.labels("fit")
        if fit_on == "train":
            eval_x, eval_y = dm.features("eval"), dm.labels("eval")
        else:
            fit_i, eval_i = holdout_split(fit_y.numpy(), 0.2, 4)
            fit_x, fit_y, eval_x, eval_y = fit_x[fit_i], fit_y[fit_i], fit_x[eval_i], fit_y[eval_i]
        fz, ez = stub.embed(fit_x), stub.embed(eval_x)
        fk, ek = stub.predict_clusters(fit_x), stub.predict_clusters(eval_x)
    want = {
        "stat_acc": statistical_accuracy(fk.numpy(), fit_y.numpy(), ek.numpy(), eval_y.numpy()),
        "knn_acc": knn_accuracy(fz.numpy(), fit_y.numpy(), ez.numpy(), eval_y.numpy(), 3),
        "linear_acc": linear_probe_accuracy(fz, fit_y, ez, eval_y, lr=0.05, epochs=20, batch_size=32, seed=4),
        "linear_acc_reference": linear_probe_accuracy(fz, fit_y, ez, eval_y, 1e-3, 10, 512, 10, seed=4),
    }
    assert got == want
    # the cluster-to-label map and the kNN fitted on the evaluation samples would score otherwise
    assert statistical_accuracy(ek.numpy(), eval_y.numpy(), ek.numpy(), eval_y.numpy()) != want["stat_acc"]
    assert knn_accuracy(ez.numpy(), eval_y.numpy(), ez.numpy(), eval_y.numpy(), 3) != want["knn_acc"]
    on_eval = linear_probe_accuracy(ez, eval_y, ez, eval_y, lr=0.05, epochs=20, batch_size=32, seed=4)
    assert on_eval != want["linear_acc"]


def test_probes_hold_out_a_share_of_data_with_one_split(tmp_path):
    # scored on its own training samples, a 1-NN vote finds each sample itself: accuracy 1 on
    # labels that nothing predicts; held out, it is at chance
    dm = tiny_images(n_train=64, n_test=16)
    splits = dm.splits
    one_split = TwoSplits(splits["train"], splits["test"], batch_size=16, eval_batch_size=80, fit_on="all")
    probes = ProbeEvaluator(knn_k=1, linear_epochs=1, stages=("val",))
    trainer = make_trainer(max_epochs=1, limit_val_batches=1.0, callbacks=[probes], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="fit on a random 80% and score on the other 20%"):
        trainer.fit(vaesim(), one_split)
    assert probes.results["val"]["knn_acc"] < 0.8
    with pytest.raises(ProtosError, match="holdout must be in"):
        ProbeEvaluator(holdout=1.0)


def test_holdout_split_keeps_every_class_where_it_can():
    y = np.array([0] * 16 + [1] * 4)  # a rare class: a random 20% could miss it
    for seed in range(10):
        fit, held = holdout_split(y, 0.2, seed)
        assert sorted([*fit, *held]) == list(range(20))
        assert np.bincount(y[held]).tolist() == [3, 1]
    fit, held = holdout_split(np.array([0] * 9 + [1]), 0.2, 0)  # a class of one: at random
    assert len(held) == 2
    assert len(fit) == 8


def test_probes_of_a_small_one_split_set_ask_no_more_neighbours_than_it_holds():
    dm = tiny_images(n_train=8, n_test=4)
    splits = dm.splits
    one_split = TwoSplits(splits["train"], splits["test"], batch_size=4, fit_on="all")  # 9 samples fit
    one_split.setup("fit")
    scores = ProbeEvaluator(knn_k=10, linear_epochs=1).scores(vaesim(), one_split)
    assert 0 <= scores["knn_acc"] <= 1


def test_too_few_linear_outputs_are_refused_before_training():
    probes = ProbeEvaluator(linear_outputs=1)
    trainer = make_trainer(max_epochs=1, callbacks=[probes])
    with pytest.raises(ProtosError, match="linear_outputs=1 is fewer than the 2 classes"):
        trainer.fit(vaesim(), tiny_images())
    assert trainer.global_step == 0


# -- VAESim -----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [28, 32])
def test_contract_shapes_and_a_deterministic_embedding(size):
    model = vaesim(input_shape=(1, size, size))
    check_contract(model, torch.rand(5, 1, size, size), latent_dim=4, out_shape=(1, size, size))


@pytest.mark.parametrize("network", ["mlp", "conv"])
def test_short_fit_with_the_bernoulli_likelihood_on_either_network(network):
    # VAESim and the VAE on VaDE's fully connected network or on the conv one, with BCE. The
    # pixels are uniform in [0, 1]: any prediction's BCE is >= their mean entropy, 1/2 nat
    # (the MSE of the same fit would be < 1/3)
    dm = tiny_images()
    extra = {"network": network, "hidden": (16, 8), "reconstruction": "bce"}
    model = vaesim(**extra)
    if network == "mlp":
        assert model.decoder.net[0].in_features == 4 + 4  # z and the condition c (K = 4)
    fit(model, dm, epochs=2)
    assert bool(model.initialised)
    assert 0.45 < float(model.trainer.callback_metrics["train/L_recon"]) < 1.0
    check_contract(model, dm.features("eval"), latent_dim=4, out_shape=(1, 28, 28))
    L.seed_everything(0, verbose=False)
    vae = VAE(n_clusters=3, latent_dim=4, channels=(4, 8, 8), **extra)
    fit(vae, dm, epochs=2)
    assert 0.45 < float(vae.trainer.callback_metrics["train/L_recon"]) < 1.0
    check_contract(vae, dm.features("eval"), latent_dim=4, out_shape=(1, 28, 28))


def test_prototypes_are_untouched_by_the_optimizer_and_move_by_the_ema():
    dm = tiny_images()
    model = vaesim(assign="argmax")
    assert "Q" in dict(model.named_buffers())
    assert all(p is not model.Q for p in model.parameters())
    seen = {"before_step": [], "update": []}
    update = model.update_prototypes

    def spy(z, c):
        seen["update"].append((model.Q.clone(), z.clone(), c.clone()))
        update(z, c)

    model.update_prototypes = spy
    model.reparameterise = fixed_draw
    seen["encoder"] = []
    model.encoder.register_forward_hook(lambda m, args, out: seen["encoder"].append(tuple(t.detach() for t in out)))

    class BeforeStep(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            assert all(p is not pl_module.Q for group in optimizer.param_groups for p in group["params"])
            seen["before_step"].append(pl_module.Q.clone())

    fit(model, dm, epochs=1, callbacks=[BeforeStep()])
    assert len(seen["update"]) == len(seen["before_step"]) == 2
    for q_before, (q_after_step, _, _) in zip(seen["before_step"], seen["update"], strict=True):
        assert torch.equal(q_before, q_after_step)  # the optimizer step did not move Q
    q, z, c = seen["update"][-1]  # the last update is Alg. 2 on that batch
    torch.testing.assert_close(model.Q, ema_prototype_update(q, z, c.argmax(1), 0.95))
    assert not torch.equal(model.Q, q)
    # ... with the batch's drawn codes (fixed here at mu + 0.5 sigma) and their Eq. 1 assignment
    mu, logvar = seen["encoder"][-1]
    want_z = fixed_draw(mu, logvar)
    torch.testing.assert_close(z, want_z)
    want_c = softmax(cosine_similarity(want_z.numpy(), q.numpy()) / float(model.tau), axis=1)
    np.testing.assert_allclose(c.numpy(), want_c, rtol=1e-4, atol=1e-6)


def test_first_batch_initialisation_copies_codes_of_the_batch():
    dm = tiny_images()
    model = vaesim()
    rows = {}
    init = model.init_prototypes

    def spy(z):
        init(z)
        rows["z"], rows["Q"] = z.clone(), model.Q.clone()

    model.init_prototypes = spy
    fit(model, dm, epochs=1)
    dists = torch.cdist(rows["Q"], rows["z"])
    assert (dists.min(dim=1).values == 0).all()  # every prototype is one of the batch's codes
    assert len(set(dists.argmin(dim=1).tolist())) == 4  # distinct ones
    assert bool(model.initialised)


@pytest.mark.parametrize(
    ("schedule", "want"),
    [("paper", [1.0, 0.505, 0.01, 0.01]), ("quarter_hot", [5.0, 1.0, 0.01, 0.01]), ("code", [1.0] * 4)],
)
def test_the_temperature_follows_its_schedule(schedule, want):
    dm = tiny_images()
    model = vaesim(tau_schedule=schedule)
    taus = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            taus.append(float(pl_module.tau))

    trainer = fit(model, dm, epochs=2, callbacks=[Record()])  # 2 x 2 steps
    np.testing.assert_allclose(taus, want, rtol=1e-6)
    assert int(model.tau_step) == 4
    assert float(trainer.callback_metrics["train/tau"]) == pytest.approx(want[-1])
    assert math.isfinite(float(trainer.callback_metrics["train/L_ortho"]))
    assert model.final_tau == pytest.approx({"code": 1.0}.get(schedule, 0.01))


def test_checkpoint_restores_prototypes_flag_and_schedule_position(tmp_path):
    dm = tiny_images()
    model = vaesim()
    trainer = fit(model, dm, epochs=1)
    path = tmp_path / "vaesim.ckpt"
    trainer.save_checkpoint(path)
    restored = VAESim.load_from_checkpoint(path, strict=True)
    for name in ("Q", "initialised", "tau_step", "tau"):
        assert torch.equal(getattr(restored, name), getattr(model, name)), name
    assert bool(restored.initialised)
    assert int(restored.tau_step) == 2
    x = dm.features("eval")
    with torch.no_grad():
        torch.testing.assert_close(restored.eval().cluster_probs(x), model.eval().cluster_probs(x))
    # resuming continues the schedule and keeps the prototypes' initialisation
    resumed = vaesim()
    resumed.init_prototypes = lambda z: pytest.fail("the prototypes were initialised again")
    taus = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            taus.append(float(pl_module.tau))

    fit(resumed, dm, epochs=2, ckpt_path=path, callbacks=[Record()])
    np.testing.assert_allclose(taus, [0.01, 0.01])  # steps 2 and 3 of 4
    assert int(resumed.tau_step) == 4


def test_predict_writes_one_row_per_image_with_the_similarities(tmp_path):
    dm = tiny_images()
    model = vaesim()
    fit(model, dm, epochs=1)
    trainer = make_trainer(default_root_dir=tmp_path, callbacks=[AssignmentWriter(n_nearest=3)])
    trainer.predict(model, dm)
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.reader(f))
    k = 4
    assert rows[0] == ["index", "label", "cluster", *(f"p_{j}" for j in range(k)), *(f"sim_{j}" for j in range(k))]
    body = np.array(rows[1:], dtype=float)
    assert len(body) == 12  # one row per evaluation image
    assert sorted(body[:, 0].astype(int)) == list(range(12))
    x, labels = dm.features("eval"), dm.labels("eval")
    order = body[:, 0].astype(int)
    np.testing.assert_array_equal(body[:, 1].astype(int), labels.numpy()[order])
    with torch.no_grad():
        z = model.eval().embed(x).numpy()
    want_sims = cosine_similarity(z, model.Q.numpy())[order]
    # the nearest picture ranks by the same similarities, in batches
    by_picture = similarities(model, x, batch_size=5).numpy()
    np.testing.assert_allclose(by_picture, cosine_similarity(z, model.Q.numpy()), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(body[:, 3 + k :], want_sims, rtol=1e-4, atol=1e-5)
    tau = float(model.tau)
    assert tau != 1.0  # Eq. 1's c = softmax(s / tau), at the current temperature
    np.testing.assert_allclose(body[:, 3 : 3 + k], softmax(want_sims / tau, axis=1), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # and the contract's cluster_probs, which the evaluators read
        np.testing.assert_allclose(model.cluster_probs(x).numpy()[order], body[:, 3 : 3 + k], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(body[:, 2].astype(int), want_sims.argmax(1))
    with open(tmp_path / "prototype_neighbours.csv") as f:
        near = list(csv.DictReader(f))
    assert len(near) == k * 3
    for j in range(k):
        got = [int(r["index"]) for r in near if int(r["prototype"]) == j]
        sims = cosine_similarity(z, model.Q.numpy())[:, j]
        assert got == list(np.argsort(-sims, kind="stable")[:3])
    # data that name their classes and samples (an image folder): label_name and file, last
    dm.class_names = [f"class {k}" for k in range(int(labels.max()) + 1)]
    dm.sample_names = lambda stage="eval": [f"patient {i}, view.png" for i in range(12)]
    trainer.predict(model, dm)
    with open(tmp_path / "predictions.csv") as f:
        named = list(csv.DictReader(f))
    assert list(named[0])[-2:] == ["label_name", "file"]
    assert [r["label_name"] for r in named] == [f"class {int(r['label'])}" for r in named]
    assert [r["file"] for r in named] == [f"patient {int(r['index'])}, view.png" for r in named]
    with open(tmp_path / "prototype_neighbours.csv", newline="") as f:
        text = f.read()
    assert "\r" not in text  # LF line ends, as predictions.csv
    near = list(csv.DictReader(io.StringIO(text)))
    assert all(r["file"] == f"patient {r['index']}, view.png" for r in near)
    assert all(r["label_name"] == f"class {r['label']}" for r in near)


def test_bad_input_gives_one_line_errors_before_training():
    cases = [
        ({"n_clusters": 1}, "n_clusters"),
        ({"tau_start": 0.0}, "tau_start must be > 0"),
        ({"tau_end": -0.01}, "tau_end must be > 0"),
        ({"eta": 1.0}, r"eta .* must be in \[0, 1\), got 1.0"),
        ({"eta": -0.1}, r"must be in \[0, 1\)"),
        ({"input_shape": (1, 27, 27)}, r"takes images \(C, 28, 28\) or \(C, 32, 32\)"),
        ({"input_shape": (784,)}, "flatten false"),
        ({"similarity": "euclid"}, "similarity must be one of cos, dot"),
        ({"input_shape": (16,), "network": "mlp", "augment": True}, r"augment moves images .* \(16,\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ProtosError, match=message) as err:
            VAESim(**{**SMALL, **kwargs})
        assert "\n" not in str(err.value)
    model = vaesim(n_clusters=8)
    trainer = make_trainer(max_epochs=1)
    with pytest.raises(ProtosError, match="first batch of 4") as err:
        trainer.fit(model, tiny_images(batch_size=4))
    assert "\n" not in str(err.value)
    assert trainer.global_step == 0
    with pytest.raises(ProtosError, match=r"input shape \(1, 32, 32\)"):  # data and network disagree
        make_trainer(max_epochs=1).fit(vaesim(), tiny_images(size=32))


def test_short_fit_end_to_end_with_augmentation_probes_and_gallery(tmp_path):
    dm = tiny_images()
    model = vaesim(augment=True, tau_schedule="quarter_hot", init="noise_images")
    augment, moved = model.augment, []

    def recorded(x):
        out = augment(x)
        moved.append(not torch.equal(out, x))
        return out

    model.augment = recorded
    callbacks = [ClusteringEvaluator(), ProbeEvaluator(knn_k=3, linear_epochs=5, reference_linear=True)]
    trainer = fit(model, dm, epochs=2, limit_val_batches=1.0, default_root_dir=tmp_path, callbacks=callbacks)
    assert len(moved) == trainer.global_step > 0  # every training batch, and only those, augmented
    assert all(moved)
    trainer.test(model, dm, verbose=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for stage in ("val", "test"):
        assert {"acc", "nmi", "stat_acc", "knn_acc", "linear_acc", "linear_acc_reference"} <= set(metrics[stage])
        assert all(0 <= metrics[stage][k] <= 1 for k in ("stat_acc", "knn_acc", "linear_acc"))
    assert "test/knn_acc" in trainer.callback_metrics
    grid = InspectionImages(latent_map="pca").pictures(model, dm).grids["prototypes"]
    assert grid.ndim == 3  # the 4 decoded 28x28 prototypes in one RGB grid
    assert grid.shape[0] == 3


# -- VAE and VAE+KMeans ------------------------------------------------------------------
def test_vae_kmeans_pictures_during_fit_cluster_the_current_latents_first(tmp_path):
    # InspectionImages draws at an epoch's end, before the VAE's own end-of-training k-means
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_protos.eval.images import InspectionImages

    model = VAEKMeans(n_clusters=4, k_min=2, latent_dim=4, channels=(4, 8, 8))
    pictures = InspectionImages(every_n_epochs=1, n_points=12, latent_map="pca", projector_points=0)
    fits, stale_at_draw = [], []
    fit_clusters, draw = model.fit_clusters, pictures.pictures
    model.fit_clusters = lambda: fits.append(model.global_step) or fit_clusters()
    pictures.pictures = lambda module, dm: stale_at_draw.append(module._clusters_stale()) or draw(module, dm)
    trainer = fit(model, tiny_images(), epochs=2, callbacks=[pictures], logger=TensorBoardLogger(tmp_path))
    steps_per_epoch = trainer.num_training_batches
    assert stale_at_draw == [False, False]  # each epoch's pictures show that epoch's clusters
    assert fits == [steps_per_epoch, 2 * steps_per_epoch]  # once an epoch: the end of training reuses the last


def test_vae_kmeans_clusters_after_training_and_restores_them(tmp_path):
    dm = tiny_images()
    L.seed_everything(0, verbose=False)
    model = VAEKMeans(n_clusters=6, k_min=2, latent_dim=4, channels=(4, 8, 8))
    with pytest.raises(ProtosError, match="k-means has not run"):
        model.cluster_probs(torch.rand(2, 1, 28, 28))
    trainer = fit(model, dm, epochs=2)
    k = int(model.k)
    assert 2 <= k <= 6
    assert model.prototypes().shape == (k, 4)
    assert (model.inertias[1:] > 0).all()  # K = 2..6 tried
    x = dm.features("eval")
    with torch.no_grad():
        probs = model.eval().cluster_probs(x)
    assert probs.shape == (12, 6)
    assert int(probs.argmax(1).max()) < k
    path = tmp_path / "vae.ckpt"
    trainer.save_checkpoint(path)
    restored = VAEKMeans.load_from_checkpoint(path, strict=True)
    with torch.no_grad():
        assert torch.equal(restored.eval().cluster_probs(x), probs)
    assert restored.decode(torch.randn(2, 4)).shape == (2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(restored.embed(x), restored.embed(x))  # z_mu: deterministic


def test_vae_kmeans_elbow_finds_the_blobs_of_its_codes():
    model = VAEKMeans(n_clusters=10, k_min=2, latent_dim=3, channels=(4, 8, 8))
    codes, _ = make_blobs(n_samples=300, centers=4, n_features=3, cluster_std=0.4, random_state=1)
    model.embed_all = lambda x: torch.as_tensor(codes, dtype=torch.float32)
    model.fit_features = lambda: None
    model.fit_clusters()
    assert int(model.k) == 4
    plain = VAE(n_clusters=3, latent_dim=3, channels=(4, 8, 8))
    plain.embed_all, plain.fit_features = model.embed_all, model.fit_features
    plain.fit_clusters()
    assert int(plain.k) == 3  # no elbow search: K = n_clusters


def test_cli_fit_then_predict_writes_the_stratification_csvs(tmp_path, capsys):
    g = np.random.default_rng(0)
    data = tmp_path / "xray.npz"
    np.savez(data, X=g.integers(0, 256, (24, 28, 28), dtype=np.uint8), y=np.arange(24) % 2)
    model = ["--model.n_clusters", "4", "--model.latent_dim", "4", "--model.channels", "[4, 8, 8]"]
    predicted, rows = cli_fit_then_predict(
        tmp_path, capsys, "vaesim_pneumonia.yaml", data, *model, "--trainer.max_epochs", "1"
    )
    assert len(rows) == 24
    assert {"sim_0", "sim_3", "p_3", "label", "cluster"} <= set(rows[0])
    with open(predicted / "prototype_neighbours.csv") as f:
        assert len(list(csv.DictReader(f))) == 4 * 5
