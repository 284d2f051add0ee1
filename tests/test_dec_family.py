"""DEC, IDEC, DCN and DKM: their ops against hand-computed values, recovery of blobs, exact
checkpoint restore, the shared pretraining cache and DEC's tolerance stop."""

from __future__ import annotations

import itertools
import math

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_trainer, spy_step
from reference import kmeans_loss
from torch.optim.optimizer import register_optimizer_step_pre_hook

import lightning_protos.methods.pretrain as pretrain_module
from lightning_protos.data import Blobs
from lightning_protos.errors import ProtosError
from lightning_protos.eval.callbacks import ClusteringEvaluator
from lightning_protos.eval.metrics import clustering_scores
from lightning_protos.methods.dcn import DCN
from lightning_protos.methods.dec import DEC, IDEC
from lightning_protos.methods.dkm import DKM
from lightning_protos.ops import (
    annealed_alpha,
    cluster_sums,
    dkm_clustering_loss,
    kl_clustering_loss,
    running_mean_update,
    student_t_assign,
    target_distribution,
)

METHODS = {"dec": DEC, "idec": IDEC, "dcn": DCN, "dkm": DKM}
EXTRA = {"dec": {"update_interval": 12}, "idec": {"update_interval": 12}, "dcn": {}, "dkm": {}}


# -- ops ------------------------------------------------------------------------------
@pytest.mark.parametrize("dof", [1.0, 2.5])
def test_student_t_assign_matches_hand_computed(dof):
    z = np.array([[0.0, 0.0], [1.0, 2.0], [-3.0, 0.5]])
    mu = np.array([[0.0, 1.0], [2.0, 2.0]])
    want = np.zeros((3, 2))
    for i in range(3):
        for j in range(2):
            want[i, j] = (1 + ((z[i] - mu[j]) ** 2).sum() / dof) ** (-(dof + 1) / 2)
        want[i] /= want[i].sum()
    got = student_t_assign(torch.tensor(z), torch.tensor(mu), dof).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # z_0 is at distance 1 and sqrt(8) from the centroids: q = (1/2, 1/9) normalised (a = 1)
    if dof == 1.0:
        np.testing.assert_allclose(got[0], [9 / 11, 2 / 11], rtol=1e-12)


def test_target_distribution_matches_hand_computed():
    q = np.array([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]])
    f = q.sum(axis=0)  # soft cluster frequencies over all samples
    want = np.array([[q[i, j] ** 2 / f[j] for j in range(3)] for i in range(4)])
    want /= want.sum(axis=1, keepdims=True)
    got = target_distribution(torch.tensor(q)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0)
    assert got[0, 0] > q[0, 0]  # confident assignments are sharpened


def test_kl_clustering_loss_matches_hand_computed():
    p = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]])  # a zero target contributes nothing
    q = np.array([[0.6, 0.3, 0.1], [0.25, 0.25, 0.5]])
    want = sum(p[i, j] * math.log(p[i, j] / q[i, j]) for i in range(2) for j in range(3) if p[i, j] > 0)
    got = kl_clustering_loss(torch.tensor(p), torch.tensor(q).log())
    assert float(got) == pytest.approx(want, rel=1e-12)


def test_dcn_batched_centroid_update_equals_the_sequential_one():
    g = torch.Generator().manual_seed(0)
    k, p = 4, 3
    centroids = torch.randn(k, p, generator=g, dtype=torch.float64)
    counts = torch.tensor([100, 1, 0, 7])  # cluster 3 gets no sample of the batch
    z = torch.randn(25, p, generator=g, dtype=torch.float64)
    assign = torch.randint(0, 3, (25,), generator=g)
    m, c = centroids.clone(), counts.clone()
    for i in range(len(z)):  # DCN Eq. 12, one sample at a time
        s = int(assign[i])
        c[s] += 1
        m[s] = m[s] - (m[s] - z[i]) / c[s]
    got_m, got_c = running_mean_update(centroids, counts, *cluster_sums(z, assign, k))
    torch.testing.assert_close(got_m, m, rtol=1e-12, atol=1e-12)
    assert torch.equal(got_c, c)
    assert torch.equal(got_m[3], centroids[3])  # untouched cluster
    assert torch.allclose(got_m[2], z[assign == 2].mean(0))  # from a zero count: the batch mean


def test_dkm_loss_tends_to_the_kmeans_loss():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 3, generator=g, dtype=torch.float64)
    r = torch.randn(4, 3, generator=g, dtype=torch.float64)
    km = kmeans_loss(z.numpy(), r.numpy())
    gaps = [float(dkm_clustering_loss(z, r, alpha)) - km for alpha in (0.1, 1.0, 10.0, 100.0, 1e3, 1e5)]
    tiny = 1e-12 * km  # rounding
    assert all(gap >= -tiny for gap in gaps)  # a convex combination of distances >= their minimum
    assert all(a >= b - tiny for a, b in itertools.pairwise(gaps))  # d/d alpha = -Var_G(d)
    assert gaps[-1] < 1e-9 * km
    # at a finite alpha: sum_i sum_k d_ik exp(-alpha d_ik) / sum_l exp(-alpha d_il), with d the squared distances
    d2 = ((z.numpy()[:, None] - r.numpy()[None]) ** 2).sum(-1)
    weights = np.exp(-0.7 * d2) / np.exp(-0.7 * d2).sum(1, keepdims=True)
    assert float(dkm_clustering_loss(z, r, 0.7)) == pytest.approx((d2 * weights).sum(), rel=1e-12)


def test_annealed_alpha_schedule():
    assert annealed_alpha(0) == pytest.approx(0.1)
    assert annealed_alpha(1) == pytest.approx(0.1 * 2 ** (1 / math.log(2) ** 2))
    assert annealed_alpha(5) == pytest.approx(annealed_alpha(4) * 2 ** (1 / math.log(6) ** 2))
    assert annealed_alpha(199) > 1e3  # the DKM code's 200 steps end far beyond the constant 1000


# -- methods on blobs -----------------------------------------------------------------
BLOBS = {"n_samples": 600, "n_features": 10, "centers": 4, "cluster_std": 1.0, "batch_size": 50}


def blobs() -> Blobs:
    """Four well-separated standardised blobs in 10-D, 600 points, batches of 50."""
    return Blobs(**BLOBS)


def small(name: str, tmp_path, init: str = "pretrained", seed: int = 0, **kwargs):
    """A small network (10-32-32-4) on the blobs, its weights drawn after seeding with ``seed``."""
    L.seed_everything(seed, verbose=False)
    args = dict(latent_dim=4, hidden=(32, 32), init=init, pretrain_epochs=5, pretrain_cache=str(tmp_path / "cache"))
    return METHODS[name](n_clusters=4, input_shape=(10,), **{**args, **EXTRA[name], **kwargs})


def fit(model, dm, epochs: int, seed: int = 0, ckpt_path=None, **kwargs) -> L.Trainer:
    L.seed_everything(seed, verbose=False)
    trainer = make_trainer(max_epochs=epochs, **kwargs)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer


def ari(model, dm) -> float:
    with torch.no_grad():
        return clustering_scores(dm.labels(), model.predict_clusters(dm.features("eval")))["ari"]


@pytest.mark.parametrize(
    ("name", "init", "kwargs"),
    [
        ("dec", "pretrained", {}),
        ("dec", "pretrained", {"target": "batch", "tol": None}),
        ("idec", "pretrained", {}),
        ("dcn", "pretrained", {}),
        ("dkm", "pretrained", {"lam": 1.0, "alpha": 1000.0}),
        ("dcn", "random", {}),  # DEC^r and IDEC^r may merge blobs, as in the AE-CM paper's Table 5
        ("dkm", "random", {"lam": 1.0, "alpha": None, "anneal_every": 1}),
    ],
)
def test_recovers_well_separated_blobs(name, init, kwargs, tmp_path):
    dm = blobs()
    model = small(name, tmp_path, init, **kwargs)
    fit(model, dm, epochs=20)
    assert ari(model, dm) > 0.9
    x = dm.features("eval")
    probs = model.cluster_probs(x[:7])
    assert probs.shape == (7, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(7))
    # the prototypes are the centroids the assignment reads: each sample goes to its nearest one
    with torch.no_grad():
        nearest = torch.cdist(model.embed(x), model.prototypes()).argmin(1)
    assert torch.equal(model.predict_clusters(x), nearest)
    assert model.decode(model.prototypes()).shape == (4, 10)


@pytest.mark.parametrize("name", ["dec", "idec"])
def test_dec_trains_without_its_decoder_and_idec_with_it(name, tmp_path):
    dm = blobs()
    model = small(name, tmp_path, tol=None)
    snaps = {}

    class AtClusterStart(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == pl_module.pretrain_end:
                snaps["decoder"] = [p.detach().clone() for p in pl_module.ae.decoder.parameters()]

    fit(model, dm, epochs=8, callbacks=[AtClusterStart()])
    same = [torch.equal(a, b) for a, b in zip(snaps["decoder"], model.ae.decoder.parameters(), strict=True)]
    assert all(same) == (name == "dec")
    assert model.target_p.shape == (600, 4)
    torch.testing.assert_close(model.target_p.sum(1), torch.ones(600))


@pytest.mark.parametrize("name", ["dec", "idec"])
def test_batch_target_is_each_batchs_own_target_distribution(name, tmp_path):
    """``target: batch`` (ClustPy's variant): L_c of a batch against P = Eq. 3 of the batch's own
    Q, with P outside the gradient; no full-data refresh runs without ``tol``."""
    dm = blobs()
    model = small(name, tmp_path, target="batch", tol=None)
    fit(model, dm, epochs=7)  # 5 pretraining + 2 clustering epochs
    assert torch.count_nonzero(model.target_p) == 0  # never refreshed
    x = dm.features("eval")[:50]
    z = model.encode(x).detach().requires_grad_(True)
    q = student_t_assign(z.detach(), model.mu.detach(), 1.0).numpy().astype(np.float64)
    p = q**2 / q.sum(0)
    p /= p.sum(1, keepdims=True)
    expected = float((p * np.log(p / q)).sum())
    got = model.kl_loss(z, None)
    assert float(got) == pytest.approx(expected, rel=1e-4)
    (grad,) = torch.autograd.grad(got, z)
    fixed = model.kl_loss(z, torch.as_tensor(p, dtype=torch.float32))  # the same P as a constant
    torch.testing.assert_close(grad, torch.autograd.grad(fixed, z)[0])
    with pytest.raises(ProtosError, match="target must be one of dataset, batch"):
        small(name, tmp_path, target="sample")


@pytest.mark.parametrize("name", ["dec", "idec"])
def test_cluster_adam_eps_sets_the_clustering_phase_alone(name, tmp_path):
    """``cluster_adam_eps`` (the AE-CM code's epsilon on DEC's KL) reaches the clustering optimizer
    and leaves the pretraining one at ``adam_eps``; by default both use ``adam_eps``."""
    dm = blobs()
    model = small(name, tmp_path, adam_eps=1e-7, cluster_adam_eps=0.05)
    fit(model, dm, epochs=6)  # 5 pretraining + 1 clustering epoch
    pretrain_opt, cluster_opt = (opt.optimizer for opt in model.optimizers())
    assert pretrain_opt.defaults["eps"] == 1e-7
    assert cluster_opt.defaults["eps"] == 0.05
    default = small(name, tmp_path, adam_eps=1e-7)
    assert [opt.defaults["eps"] for opt in default.configure_optimizers()] == [1e-7, 1e-7]
    with pytest.raises(ProtosError, match="cluster_adam_eps must be > 0"):
        small(name, tmp_path, cluster_adam_eps=0.0)


def _student_t_numpy(z: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """DEC Eq. 1 with one degree of freedom."""
    q = 1 / (1 + ((z[:, None] - mu[None]) ** 2).sum(-1))
    return q / q.sum(1, keepdims=True)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("dec", {}), ("idec", {"gamma": 0.3}), ("dcn", {"lam": 0.7}), ("dkm", {"lam": 0.7, "alpha": 0.5})],
)
def test_a_clustering_step_sums_the_papers_terms_with_their_weights(name, kwargs, tmp_path):
    """One clustering step's logged terms against the papers' equations in float64 NumPy, on the
    step's own codes and reconstructions: DEC's KL(P || Q) (Eq. 2) against the stored targets of
    the batch's samples (by index), IDEC's L_r + gamma L_c, DCN's L_rec + lambda / 2 sum ||z_i -
    M s_i||^2 with the stored assignments, DKM's summed squared error + lambda sum_ik d_ik G_ik."""
    model = small(name, tmp_path, init="random", **kwargs)
    n, index = 20, torch.tensor([3, 17, 5, 0, 11, 8])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(index), 10, generator=g)
    model.size_per_sample_buffers(n)
    with torch.no_grad():
        centroids = model.centroids if name in ("dcn", "dkm") else model.mu
        centroids.copy_(torch.randn(4, 4, generator=g))
        if name in ("dec", "idec"):
            model.target_p.copy_(torch.distributions.Dirichlet(torch.ones(4)).sample((n,)))
        if name == "dcn":
            model.assignments.copy_(torch.randint(0, 4, (n,), generator=g))
        z, x_rec = (t.double().numpy() for t in model.autoencode(x))
    m = centroids.detach().double().numpy().copy()
    stored = model.assignments[index].numpy().copy() if name == "dcn" else None
    model.cluster_iteration = lambda batch_idx: 1  # between two target refreshes (update_interval 12)
    got = spy_step(model, x, optimizers=["pretrain", "cluster"], index=index)[0]
    x = x.double().numpy()
    squared_error = ((x - x_rec) ** 2).mean(1).sum()  # per-sample mean, summed (the AE-CM code's)
    if name in ("dec", "idec"):
        p, q = model.target_p[index].double().numpy(), _student_t_numpy(z, m)
        kl = (p * np.log(p / q)).sum()
        want = {"L_c": kl} if name == "dec" else {"L_r": squared_error, "L_c": 0.3 * kl}
    elif name == "dcn":
        m_s = m[stored]  # s_i before the step's own reassignment (b)
        want = {"L_rec": squared_error, "L_km": 0.7 / 2 * ((z - m_s) ** 2).sum()}
    else:
        d2 = ((z[:, None] - m[None]) ** 2).sum(-1)
        weights = np.exp(-0.5 * d2) / np.exp(-0.5 * d2).sum(1, keepdims=True)
        want = {"L_rec": ((x - x_rec) ** 2).sum(), "L_clust": 0.7 * (d2 * weights).sum()}
    assert got == pytest.approx(want, rel=1e-5)


def test_a_target_refresh_stores_eq3_of_the_whole_training_sets_q():
    """Step 2: Q of every training sample under the current encoder and centroids (Eq. 1), P from
    it (Eq. 3, the cluster frequencies over the whole set, not a batch's), and the assignments
    argmax Q."""
    L.seed_everything(0, verbose=False)
    model = DEC(n_clusters=4, input_shape=(10,), latent_dim=4, hidden=(32, 32), init="random")
    g = torch.Generator().manual_seed(1)
    data = torch.randn(30, 10, generator=g)
    model._fit_x = data
    model.size_per_sample_buffers(30)
    with torch.no_grad():
        model.mu.copy_(torch.randn(4, 4, generator=g))
        q = _student_t_numpy(model.encode(data).double().numpy(), model.mu.double().numpy())
    assert model.refresh_target(0) is False  # iteration 0 never stops
    p = q**2 / q.sum(0)
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(model.target_p.numpy(), p, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(model.assignments.numpy(), q.argmax(1))


def test_dcn_counts_grow_by_the_samples_seen(tmp_path):
    dm = blobs()
    model = small("dcn", tmp_path, initial_count=100)
    fit(model, dm, epochs=8)  # 5 pretraining + 3 clustering epochs
    assert int(model.counts.sum()) == 4 * 100 + 3 * 600
    assert model.assignments.shape == (600,)


def test_dcn_epoch_update_comes_before_the_epoch_s_validation(tmp_path):
    """The last validation (and the best.ckpt it picks) scores the reassigned centroids, as the
    final test does: the reassignment runs after the epoch's last step, not after validation."""
    seen = []
    grab = L.pytorch.callbacks.LambdaCallback(
        on_validation_start=lambda trainer, module: seen.append(module.centroids.detach().clone())
    )
    model = small("dcn", tmp_path, centroid_update="epoch", initial_count=100)
    fit(model, blobs(), epochs=7, callbacks=[grab], limit_val_batches=1.0, default_root_dir=tmp_path)
    assert len(seen) == 7
    assert torch.equal(seen[-1], model.centroids)
    assert not torch.equal(seen[-2], seen[-1])  # the last epoch moved them


def test_dcn_epoch_update_sets_centroids_to_the_means_of_their_samples(tmp_path):
    """``centroid_update: epoch`` (the AE-CM authors' DCN): after a clustering epoch each non-empty
    centroid is the mean of the codes assigned to it (s, from the centroids before the move); the
    counts stay."""
    dm = blobs()
    model = small("dcn", tmp_path, centroid_update="epoch", initial_count=100)
    fit(model, dm, epochs=7)  # 5 pretraining + 2 clustering epochs
    with torch.no_grad():
        z = model.ae.encoder(dm.features("fit")).numpy()
    s = model.assignments.numpy()
    m = model.centroids.numpy()
    for k in np.unique(s):
        np.testing.assert_allclose(m[k], z[s == k].mean(0), rtol=1e-4, atol=1e-5)
    # the last reassignment used the centroids before they moved to these means
    assert int(model.counts.sum()) == 4 * 100
    assert ari(model, dm) > 0.9


def test_dcn_rejects_an_unknown_update():
    with pytest.raises(ProtosError, match="centroid_update must be"):
        DCN(n_clusters=4, input_shape=(10,), centroid_update="sometimes")
    with pytest.raises(ProtosError, match="code_precision must be"):
        DCN(n_clusters=4, input_shape=(10,), code_precision="bf16")


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e6])
def test_dcn_clips_each_steps_gradient_norm(tmp_path, max_grad_norm):
    """With ``max_grad_norm`` every clustering step's gradient reaches Adam with a norm at most that
    (the pretraining steps are not clipped); the epoch's largest norm before clipping and its
    clipped steps are logged: all 12 steps of an epoch at 1e-3, none at 1e6."""
    model = small("dcn", tmp_path, max_grad_norm=max_grad_norm)
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        trainer = fit(model, blobs(), epochs=7)  # 5 pretraining epochs + 2 clustering epochs of 12 steps
    finally:
        handle.remove()
    clustering = norms[-24:]
    logged = trainer.callback_metrics
    if max_grad_norm < 1:
        assert max(clustering) == pytest.approx(max_grad_norm, rel=1e-4)
        assert max(norms[:-24]) > 1e-2  # pretraining unclipped
        assert float(logged["train/grad_norm_max"]) > 1e-2
        assert float(logged["train/clipped_steps"]) == 12
    else:
        assert float(logged["train/grad_norm_max"]) == pytest.approx(max(clustering[-12:]), rel=1e-4)
        assert float(logged["train/clipped_steps"]) == 0


def test_dcn_rejects_a_non_positive_max_grad_norm():
    with pytest.raises(ProtosError, match="max_grad_norm must be > 0"):
        DCN(n_clusters=4, input_shape=(10,), max_grad_norm=0.0)


@pytest.mark.parametrize(("code_precision", "dtype"), [("float32", torch.float32), ("autocast", torch.bfloat16)])
def test_dcn_code_layers_run_in_float32_under_bf16_autocast(tmp_path, code_precision, dtype):
    """DCN's codes (the encoder's last layer) and the decoder's first layer are float32 products of
    float32 inputs under bf16 autocast, unless ``code_precision: autocast``; the other layers stay bf16."""
    model = small("dcn", tmp_path, code_precision=code_precision)
    seen = {}
    for name, layer in (("code", model.ae.encoder[-1]), ("first", model.ae.decoder[0]), ("out", model.ae.decoder[-1])):
        layer.register_forward_hook(lambda m, args, out, name=name: seen.update({name: (args[0], out)}))
    x = torch.randn(8, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.encode(x)
        model.reconstruct(z)
    assert z.dtype == dtype
    assert seen["first"][1].dtype == dtype
    assert seen["out"][1].dtype == torch.bfloat16
    if code_precision == "float32":
        h, w, b = seen["code"][0], model.ae.encoder[-1].weight, model.ae.encoder[-1].bias
        torch.testing.assert_close(z, h.float() @ w.T + b)  # no bf16 rounding of the product
        torch.testing.assert_close(model.embed(x), model.ae.encoder(x), rtol=1e-6, atol=1e-6)  # fp32 outside


def test_dkm_alpha_follows_the_annealing_schedule(tmp_path):
    dm = blobs()
    model = small("dkm", tmp_path, "random", alpha=None, anneal_every=2)
    fit(model, dm, epochs=5)  # epochs 0..4: steps 0, 0, 1, 1, 2
    assert float(model.alpha) == pytest.approx(annealed_alpha(2), rel=1e-6)
    # a checkpoint from before 2026-12-07 also holds the step (alpha_step): it still loads
    ckpt = {"state_dict": {**model.state_dict(), "alpha_step": torch.tensor(2)}}
    fresh = small("dkm", tmp_path, "random", alpha=None, anneal_every=2)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    assert float(fresh.alpha) == pytest.approx(annealed_alpha(2), rel=1e-6)


@pytest.mark.parametrize("name", list(METHODS))
def test_checkpoint_restores_with_strict_loading(name, tmp_path, monkeypatch):
    dm = blobs()
    run_on = {"tol": None} if name in ("dec", "idec") else {}  # no early stop: the resume must train
    model = small(name, tmp_path, **run_on)
    trainer = fit(model, dm, epochs=8)
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    restored = METHODS[name].load_from_checkpoint(path, strict=True)
    x = dm.features("eval")
    with torch.no_grad():
        assert torch.equal(model.cluster_probs(x), restored.cluster_probs(x))
    for key, value in model.state_dict().items():  # incl. the (N, K) target and (N,) assignments
        torch.testing.assert_close(value, restored.state_dict()[key], rtol=0, atol=0, equal_nan=True, msg=key)
    # and training resumes from it (the trainer's restore path) in the clustering phase: no
    # pretraining step and no second initialisation from the codes, one more epoch of steps
    resumed = small(name, tmp_path, **run_on)
    resumed.init_from_codes = lambda z: pytest.fail("the clustering was initialised again")
    monkeypatch.setattr(pretrain_module, "pretrain_step", lambda *a: pytest.fail("pretrained again"))
    resumed_trainer = fit(resumed, dm, epochs=9, ckpt_path=path)
    assert resumed_trainer.global_step == trainer.global_step + resumed_trainer.num_training_batches
    assert any(not torch.equal(v, restored.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_pretraining_cache_is_hit_on_the_second_run(tmp_path, monkeypatch):
    dm = blobs()
    calls = {"n": 0}
    step = pretrain_module.pretrain_step

    def counting_step(*args, **kwargs):
        calls["n"] += 1
        return step(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "pretrain_step", counting_step)
    first = small("dec", tmp_path)
    fit(first, dm, epochs=6)
    assert calls["n"] == 5 * 12  # 5 pretraining epochs of 12 batches
    assert first.pretrain_cache_hit is None
    entries = list((tmp_path / "cache").glob("*.pt"))
    assert len(entries) == 1

    seen = {}

    class AtClusterStart(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == pl_module.pretrain_end:
                seen["ae"] = {k: v.clone() for k, v in pl_module.ae.state_dict().items()}

    second = small("dcn", tmp_path)  # another method, same DAE, data and seed
    trainer = fit(second, dm, epochs=6, callbacks=[AtClusterStart()])
    assert calls["n"] == 5 * 12  # the DAE was not trained again
    assert second.pretrain_cache_hit == entries[0]
    assert trainer.global_step == 12  # only the clustering epoch's optimizer steps
    cached = torch.load(entries[0], weights_only=True)["state_dict"]
    assert all(torch.equal(cached[k], v) for k, v in seen["ae"].items())

    other_seed = small("dcn", tmp_path)
    fit(other_seed, dm, epochs=6, seed=1)
    assert other_seed.pretrain_cache_hit is None
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2

    other_precision = small("dcn", tmp_path)  # bf16 autocast pretrains other weights
    fit(other_precision, dm, epochs=6, precision="bf16-mixed")
    assert other_precision.pretrain_cache_hit is None
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3

    # each input the DAE's weights depend on is in the key: a change misses and adds an entry
    other_points = Blobs(**BLOBS, seed=1)
    variants = {  # (model, data, epochs): the same name, size, seed and method as the first fit
        "other points": (small("dec", tmp_path), other_points, 6),
        "other pretraining epochs": (small("dec", tmp_path, pretrain_epochs=4), dm, 5),
        "other batch size": (small("dec", tmp_path), Blobs(**{**BLOBS, "batch_size": 60}), 6),
        "other learning rate": (small("dec", tmp_path, lr=2e-3), dm, 6),
    }
    for n, (what, (model, data, epochs)) in enumerate(variants.items(), start=4):
        fit(model, data, epochs=epochs)
        assert model.pretrain_cache_hit is None, what
        assert len(list((tmp_path / "cache").glob("*.pt"))) == n, what


@pytest.mark.parametrize("name", ["dec", "idec"])
def test_tol_stops_training_and_records_why(name, tmp_path):
    dm = blobs()
    model, evaluator = small(name, tmp_path, tol=0.01), ClusteringEvaluator()
    trainer = fit(model, dm, epochs=40, callbacks=[evaluator], limit_val_batches=1.0, default_root_dir=tmp_path)
    assert trainer.current_epoch < 40
    assert int(model.stop_iteration) > 0
    assert float(model.stop_delta) < 0.01
    assert model.stop_reason.startswith("tol:")
    assert float(trainer.callback_metrics["train/tol_stop"]) == 1.0
    trainer.test(model, dm, verbose=False)  # the same weights as the validation at the stop
    assert evaluator.results["val"]["epoch"] == evaluator.results["test"]["epoch"] == trainer.current_epoch

    never = small(name, tmp_path, tol=None)
    trainer = fit(never, dm, epochs=12)
    assert trainer.current_epoch == 12
    assert never.stop_reason is None
    assert float(trainer.callback_metrics["train/tol_stop"]) == 0.0
