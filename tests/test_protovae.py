"""ProtoVAE and its reconstruction baselines (AE, VAE-KL, InfoVAE): Sinkhorn and MMD against
independent references, the parameters each step of Alg. 1 updates, the warm-up, strict
checkpoint restores and resumes, a short fit of every method, bad input."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TwoSplits, make_trainer, spy_step
from reference import mmd_loops, sinkhorn_numpy
from scipy.special import logsumexp, softmax

from lightning_protos.errors import ProtosError
from lightning_protos.eval.callbacks import ClusteringEvaluator
from lightning_protos.eval.reconstruction import ReconstructionEvaluator
from lightning_protos.methods.protovae import AE, VAEKL, InfoVAE, ProtoVAE
from lightning_protos.methods.vade import VaDE
from lightning_protos.ops.mmd import grouped_mmd, mmd
from lightning_protos.ops.sinkhorn import sinkhorn

NET = {"latent_dim": 8, "channels": (4, 8), "bottleneck_dim": 16}  # a tiny network for CPU tests


def tiny_images(side: int = 28, channels: int = 1, n_train: int = 32, n_test: int = 12) -> TwoSplits:
    """Random uint8 images with two labels: 2 batches of 16 a training epoch."""
    g = torch.Generator().manual_seed(0)
    shape = (channels, side, side)
    train = (torch.randint(0, 256, (n_train, *shape), dtype=torch.uint8, generator=g), torch.arange(n_train) % 2)
    test = (torch.randint(0, 256, (n_test, *shape), dtype=torch.uint8, generator=g), torch.arange(n_test) % 2)
    return TwoSplits(train, test, batch_size=16, eval_batch_size=8, fit_on="train")


def protovae(**kwargs) -> ProtoVAE:
    L.seed_everything(0, verbose=False)
    return ProtoVAE(**{"n_clusters": 2, "warmup_epochs": 1, **NET, **kwargs})


# -- Sinkhorn ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_iters", [1, 3, 10])
def test_sinkhorn_matches_the_numpy_reference(n_iters):
    g = torch.Generator().manual_seed(0)
    scores = 2 * torch.randn(12, 5, generator=g, dtype=torch.float64)  # exp(S / eps) overflows float32 unshifted
    got = sinkhorn(scores, eps=0.05, n_iters=n_iters)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), sinkhorn_numpy(scores.numpy(), 0.05, n_iters), rtol=1e-4, atol=1e-6)


def test_sinkhorn_stays_finite_when_whole_samples_underflow():
    # sample 0 scores 3000 below the best: exp(-3000 / eps) is 0 even in float64, the plain
    # iteration gives 0/0 for that sample; its code must stay a distribution
    scores = torch.tensor([[-3000.0, -3001.0, -3000.5], [0.0, 1.0, 0.5], [1.0, 0.0, 0.5]])
    codes = sinkhorn(scores, eps=0.05, n_iters=3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(3))
    # the same iterates in float64 log space by scipy's logsumexp
    log_q = scores.double().numpy().T / 0.05
    log_q -= logsumexp(log_q)
    for _ in range(3):
        log_q -= logsumexp(log_q, axis=1, keepdims=True) + np.log(3)
        log_q -= logsumexp(log_q, axis=0, keepdims=True) + np.log(3)
    # (float32 S / eps near -60000 is resolved to 4e-3: the codes agree to that)
    np.testing.assert_allclose(codes.numpy(), np.exp(log_q + np.log(3)).T, rtol=0, atol=2e-3)


def test_sinkhorn_marginals():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(20, 4, generator=g)
    codes = sinkhorn(scores, eps=0.5, n_iters=3)
    torch.testing.assert_close(codes.sum(1), torch.ones(20))  # each sample: a distribution
    codes = sinkhorn(scores, eps=0.5, n_iters=200)  # converged: equipartition, B/K per cluster
    torch.testing.assert_close(codes.sum(0), torch.full((4,), 5.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(codes.sum(1), torch.ones(20))


def test_sinkhorn_hand_made_cases():
    torch.testing.assert_close(sinkhorn(torch.zeros(3, 4)), torch.full((3, 4), 0.25))
    # every sample prefers cluster 0; equipartition still splits 4 samples 2 / 2, the stronger
    # preferences of samples 0 and 1 for cluster 0 winning it
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.0], [0.5, 0.0]])
    codes = sinkhorn(scores, eps=0.05, n_iters=1000)
    torch.testing.assert_close(codes.sum(0), torch.tensor([2.0, 2.0]), atol=1e-3, rtol=0)
    assert codes.argmax(1).tolist() == [0, 0, 1, 1]
    assert sinkhorn(torch.randn(5, 1)).eq(1).all()  # K = 1: one cluster holds everything


def test_sinkhorn_is_float32_without_grad_under_autocast():
    scores = torch.randn(6, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sinkhorn(scores.to(torch.bfloat16))
    assert codes.dtype == torch.float32
    assert not codes.requires_grad


def test_sinkhorn_over_two_ranks_is_sinkhorn_on_their_joined_batch(two_ranks):
    scores = torch.randn(9, 3, generator=torch.Generator().manual_seed(0)) * 3
    want = sinkhorn(scores, n_iters=5)  # one process, the whole batch
    got = two_ranks.run(lambda s: sinkhorn(s, n_iters=5), (scores[:4],), (scores[4:],))
    torch.testing.assert_close(torch.cat(got), want)


@pytest.mark.parametrize(("kwargs", "match"), [({"eps": 0}, "eps"), ({"n_iters": 0}, "n_iters")])
def test_sinkhorn_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(torch.zeros(2, 2), **kwargs)


# -- MMD --------------------------------------------------------------------------------
@pytest.mark.parametrize("bandwidth", [None, 0.7])
def test_mmd_matches_the_double_loop(bandwidth):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    want = mmd_loops(x.numpy(), y.numpy(), 3.0 if bandwidth is None else bandwidth)
    assert float(mmd(x, y, bandwidth)) == pytest.approx(want, rel=1e-10)


def test_mmd_near_zero_for_one_distribution_and_growing_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 4, generator=g), torch.randn(400, 4, generator=g)
    assert abs(float(mmd(x, y))) < 0.01
    shifted = [float(mmd(x, y + shift)) for shift in (0.5, 1.0, 2.0)]
    assert 0.01 < shifted[0] < shifted[1] < shifted[2]
    with pytest.raises(ValueError, match=">= 2 samples"):
        mmd(x[:1], y)


@pytest.mark.parametrize("bandwidth", [None, 0.7])
def test_grouped_mmd_is_the_sum_of_per_group_mmds(bandwidth):
    g = torch.Generator().manual_seed(0)
    # sizes 5, 1, 0 (empty), 3, 2, in shuffled order
    groups = torch.tensor([0] * 5 + [1] + [3] * 3 + [4] * 2)[torch.randperm(11, generator=g)]
    x, y = torch.randn(11, 3, generator=g, dtype=torch.float64), torch.randn(11, 3, generator=g, dtype=torch.float64)
    want = sum(float(mmd(x[groups == k], y[groups == k], bandwidth)) for k in (0, 3, 4))
    got = grouped_mmd(x, y, groups, 5, bandwidth)
    assert got.dtype == torch.float64
    assert got.shape == ()
    assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-14)
    # one group of all: plain mmd
    torch.testing.assert_close(grouped_mmd(x, y, torch.zeros(11, dtype=torch.long), 1, bandwidth), mmd(x, y, bandwidth))


def test_grouped_mmd_is_0_without_a_group_of_2_and_passes_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64)
    lone = grouped_mmd(x, y, torch.tensor([3, 0, 2, 1]), 6)
    assert float(lone) == 0.0
    assert lone.requires_grad
    lone.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # gradients flow to x, and match those of the per-group sum
    groups = torch.tensor([0, 1, 0, 0])
    (grad,) = torch.autograd.grad(grouped_mmd(x, y, groups, 2), x)
    (want,) = torch.autograd.grad(mmd(x[groups == 0], y[groups == 0]), x)
    assert grad.abs().sum() > 0
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 2), "x and y"),
        ((torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), 2), "groups"),
        ((torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4), 2), "groups"),
        ((torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 0), "n_groups"),
    ],
)
def test_grouped_mmd_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        grouped_mmd(*args)


# -- ProtoVAE: contract and steps ----------------------------------------------------------
@pytest.mark.parametrize(("shape", "channels"), [((1, 28, 28), (4, 8)), ((3, 32, 32), (4, 8, 8))])
def test_contract_shapes(shape, channels):
    model = protovae(n_clusters=3, input_shape=shape, channels=channels).eval()
    x = torch.rand(5, *shape)
    assert model.embed(x).shape == (5, 8)
    torch.testing.assert_close(model.embed(x), model.embed(x))  # deterministic
    probs = model.cluster_probs(x)
    assert probs.shape == (5, 3)
    # P = softmax(z V / tau) (Eq. 10; dot products, the default), by numpy
    z, v = model.embed(x).detach().double().numpy(), model.V.detach().double().numpy()
    assert model.hparams.tau != 1.0
    want = softmax(z @ v / model.hparams.tau, axis=1)
    np.testing.assert_allclose(probs.detach().double().numpy(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.prototypes(), model.V.detach().T)
    assert model.decode(model.prototypes()).shape == (3, *shape)


def spy_on_steps(model) -> list[tuple[int, set[str], set[str]]]:
    """Replaces ``model.optimize``: each step records (epoch, top-level modules whose gradient
    the loss makes non-zero, modules the optimizer holds); gradients are cleared on every
    parameter first, so a gradient seen comes from that loss alone."""
    steps = []

    def optimize(loss, optimizer):
        model.zero_grad(set_to_none=True)
        model.manual_backward(loss)
        named = list(model.named_parameters())
        touched = {n.split(".")[0] for n, p in named if p.grad is not None and p.grad.abs().sum() > 0}
        held = {id(p) for group in optimizer.optimizer.param_groups for p in group["params"]}
        steps.append((model.current_epoch, touched, {n.split(".")[0] for n, p in named if id(p) in held}))
        optimizer.step()

    model.optimize = optimize
    return steps


def test_the_three_steps_update_what_algorithm_1_says():
    model = protovae()
    steps = spy_on_steps(model)
    make_trainer(max_epochs=2, limit_train_batches=1).fit(model, tiny_images())
    warmup, rec = {"encoder", "head", "decoder"}, {"encoder", "head", "decoder"}
    assert [s[0] for s in steps] == [0, 1, 1, 1]
    assert steps[0][1:] == (warmup, warmup)  # epoch 0, the warm-up: reconstruction only
    prot, reg = {"encoder", "head", "V"}, {"encoder", "head"}
    assert steps[1][1:] == (prot, prot)  # a: L_prot on the encoder and V
    assert steps[2][1:] == (reg, reg)  # b: L_reg on the encoder only, no gradient reaches V
    assert steps[3][1:] == (rec, rec)  # c: L_rec on the encoder and the decoder


@pytest.mark.parametrize("normalize", [False, True])
def test_scores_are_float32_under_bf16_autocast(normalize):
    """S is scaled by 1 / eps in the codes and 1 / tau in P: it is computed in float32 even
    where the network runs in bf16."""
    model = protovae(normalize=normalize)
    z = torch.randn(8, NET["latent_dim"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = model.scores(z)
    want = (F.normalize(z, dim=1) @ F.normalize(model.V, dim=0)) if normalize else z @ model.V
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, want, rtol=1e-6, atol=1e-6)


def test_l_reg_gives_v_no_gradient():
    model = protovae()
    x = torch.rand(16, 1, 28, 28)
    z = model.embed(x)
    assign = torch.arange(16) % 2
    model.regularisation_loss(z, assign).backward()
    assert model.V.grad is None
    assert model.head[0].weight.grad.abs().sum() > 0
    # no cluster with 2 samples: 0, still differentiable
    loss = model.regularisation_loss(model.embed(x[:2]), torch.tensor([0, 1]))
    assert float(loss) == 0.0
    assert loss.requires_grad


def test_l_reg_is_the_per_cluster_mmd_to_draws_around_each_prototype(monkeypatch):
    """Eq. 5: the sum, over the clusters with >= 2 samples, of the MMD between their codes and
    draws y ~ N(v_k, I). With the unit noise replaced by a constant 0.3, y_i = v_{k_i} + 0.3:
    checked against explicit double loops, one cluster at a time."""
    x = torch.rand(16, 1, 28, 28)
    model = protovae(n_clusters=3, mmd_bandwidth=5.0)
    z, assign = model.embed(x).detach(), torch.tensor([0, 2] * 7 + [1, 0])  # cluster 1 has 1 sample
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.full_like(t, 0.3))
    got = model.regularisation_loss(z, assign)
    v = model.V.detach().numpy()  # (latent_dim, K): prototype k is column k
    want = 0.0
    for k in (0, 2):
        codes = z[assign == k].numpy()
        want += mmd_loops(codes, np.tile(v[:, k] + 0.3, (len(codes), 1)), 5.0)
    assert float(got) == pytest.approx(want, rel=1e-4)


def test_a_step_after_the_warm_up_logs_eq10_eq5_and_eq2_by_hand(monkeypatch):
    """One step of Alg. 1 after the warm-up, its three terms in float64 NumPy: L_prot, the cross
    entropy of the Sinkhorn codes against softmax(S / tau) (Eq. 10-12, positive: minimised);
    L_reg, the MMD of each cluster (argmax of the codes, >= 2 samples) to draws around its
    prototype (Eq. 5; the unit noise set to 0.3); L_rec, the pixels' mean BCE (Eq. 2)."""
    model = protovae(n_clusters=3, warmup_epochs=0, mmd_bandwidth=5.0)
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.full_like(t, 0.3))
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the network does not move: the spy's optimize is a no-op
        z = model.embed(x)
        s, x_rec = model.scores(z).double().numpy(), model.decoder(z).double().numpy()
    z, v, xs = z.double().numpy(), model.V.detach().double().numpy(), x.double().numpy()
    codes = sinkhorn_numpy(s, 0.05, 3)
    log_p = s / 0.1 - logsumexp(s / 0.1, axis=1, keepdims=True)
    assign = codes.argmax(1)
    l_reg = sum(
        mmd_loops(z[assign == k], np.tile(v[:, k] + 0.3, ((assign == k).sum(), 1)), 5.0)
        for k in range(3)
        if (assign == k).sum() >= 2
    )
    want = {
        "L_prot": -(codes * log_p).sum(1).mean(),
        "L_reg": l_reg,
        "L_rec": -(xs * np.log(x_rec) + (1 - xs) * np.log(1 - x_rec)).mean(),
    }
    assert len(set(assign)) >= 2
    assert want["L_reg"] > 0
    assert spy_step(model, x, optimizers=("a", "b", "c"))[0] == pytest.approx(want, rel=1e-4)


def test_checkpoint_restores_strictly_and_resumes_after_the_warm_up(tmp_path):
    model = protovae()
    dm = tiny_images()
    trainer = make_trainer(max_epochs=1, limit_train_batches=1)
    trainer.fit(model, dm)
    path = tmp_path / "warmup.ckpt"
    trainer.save_checkpoint(path)
    restored = ProtoVAE.load_from_checkpoint(path, strict=True).eval()
    x = torch.rand(6, 1, 28, 28)
    torch.testing.assert_close(restored.cluster_probs(x), model.eval().cluster_probs(x), rtol=0, atol=0)
    resumed = protovae()
    steps = spy_on_steps(resumed)
    make_trainer(max_epochs=2, limit_train_batches=1).fit(resumed, dm, ckpt_path=path)
    assert [s[0] for s in steps] == [1, 1, 1]  # epoch 1 onwards: past the warm-up, all three steps
    assert resumed.global_step > trainer.global_step


@pytest.mark.parametrize("method", [ProtoVAE, AE, VAEKL, InfoVAE])
def test_short_fit_end_to_end(method, tmp_path):
    kwargs = {"n_clusters": 2} if method is ProtoVAE else {}
    L.seed_everything(0, verbose=False)
    model = method(**NET, **kwargs, **({} if method is AE else {"warmup_epochs": 1}))
    callbacks = [ReconstructionEvaluator(), *([ClusteringEvaluator()] if method is ProtoVAE else [])]
    trainer = make_trainer(max_epochs=2, default_root_dir=tmp_path, callbacks=callbacks, limit_val_batches=None)
    trainer.fit(model, tiny_images())
    logged = dict(trainer.logged_metrics)
    trainer.test(model, tiny_images(), verbose=False)
    test = json.loads((tmp_path / "metrics.json").read_text())["test"]
    dm = tiny_images()
    model.eval()
    for split, key in (("eval", "test_mse"), ("fit", "train_mse")):  # per-scalar MSE of decode(embed(x))
        x = dm.features(split)
        with torch.no_grad():
            x_rec = model.decode(model.embed(x))
        assert test[key] == pytest.approx(float(((x_rec.double() - x.double()) ** 2).mean()), rel=1e-6)
    assert "val_mse" in json.loads((tmp_path / "metrics.json").read_text())["val"]
    assert "train/MSE" in logged
    assert "train/L_rec" in logged
    regulariser = {ProtoVAE: "train/L_reg", AE: None, VAEKL: "train/KL", InfoVAE: "train/MMD"}[method]
    assert regulariser is None or regulariser in logged
    if method is ProtoVAE:
        assert "acc" in test
    else:
        assert model.cluster_probs(torch.rand(3, 1, 28, 28)).eq(1).all()
        assert model.prototypes() is None


def test_the_baselines_warm_up_skips_the_regulariser():
    L.seed_everything(0, verbose=False)
    model = VAEKL(**NET, warmup_epochs=5)
    trainer = make_trainer(max_epochs=1, limit_train_batches=1)
    trainer.fit(model, tiny_images())
    assert "train/KL" not in trainer.logged_metrics


# -- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_clusters": 0}, r"n_clusters \(K\) must be >= 1, got 0"),
        ({"tau": 0}, "tau must be > 0, got 0"),
        ({"eps": -1}, "eps must be > 0, got -1"),
        ({"sinkhorn_iters": 0}, "sinkhorn_iters must be >= 1, got 0"),
        ({"reg_assign": "sample"}, "reg_assign must be one of argmax, softmax; got 'sample'"),
        ({"input_shape": (784,)}, "square images"),
        ({"input_shape": (1, 28, 28), "channels": (4, 8, 8)}, "not divisible"),
    ],
)
def test_bad_input_one_line_errors(kwargs, match):
    with pytest.raises(ProtosError, match=match) as err:
        ProtoVAE(**{**NET, **kwargs})
    assert "\n" not in str(err.value)


def test_k_equal_1_is_allowed():
    model = protovae(n_clusters=1)
    assert model.cluster_probs(torch.rand(2, 1, 28, 28)).eq(1).all()


def test_infovae_takes_an_epoch_s_last_batch_of_one_sample():
    model = InfoVAE(input_shape=(1, 28, 28), latent_dim=4, channels=(4, 8), bottleneck_dim=8)
    z = torch.randn(1, 4, requires_grad=True)
    mmd_term = model.regulariser(z, z, z)["MMD"]  # the unbiased MMD needs two samples a side
    assert float(mmd_term) == 0.0
    mmd_term.backward()  # still part of the graph


def test_a_bernoulli_reconstruction_refuses_data_outside_0_1_before_training():
    x = torch.rand(16, 1, 28, 28) * 255  # float pixels not scaled to [0, 1]
    for model in (
        ProtoVAE(n_clusters=2, input_shape=(1, 28, 28), latent_dim=4, channels=(4, 8), bottleneck_dim=8),
        VaDE(n_clusters=2, input_shape=(1, 28, 28), latent_dim=4, channels=(4, 8, 8), reconstruction="bce"),
    ):
        trainer = make_trainer(max_epochs=1)
        with pytest.raises(ProtosError, match=r"Bernoulli reconstruction \(BCE\) needs inputs in \[0, 1\]; .* \[0"):
            trainer.fit(model, TwoSplits((x, None), batch_size=8))
        assert trainer.global_step == 0


def test_pictures_share_the_scalars_steps_with_three_updates_a_batch(tmp_path):
    """After the warm-up ProtoVAE takes three optimizer steps a batch (global_step 3 a batch);
    its pictures are drawn at the step its epoch's scalars are logged at (counted in batches),
    so that TensorBoard shows them at the same epoch's point of the curves."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_protos.eval.images import InspectionImages

    logger = TensorBoardLogger(tmp_path, name="", version="run")
    pictures = InspectionImages(every_n_epochs=1, n_points=24, latent_map="pca", projector_points=0)
    trainer = make_trainer(max_epochs=3, logger=logger, callbacks=[pictures, ClusteringEvaluator()])
    model, data = protovae(), tiny_images()
    trainer.fit(model, data)
    assert trainer.global_step == 2 + 2 * 2 * 3  # warm-up epoch, then two epochs of 2 batches x 3
    trainer.test(model, data, verbose=False)
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0}).Reload()
    scalar_steps = sorted({e.step for e in events.Scalars("train/loss")})
    assert scalar_steps == [1, 3, 5]  # Lightning logs an epoch's scalars at its last batch
    assert [e.step for e in events.Images("fit/prototypes")] == scalar_steps  # not global_step's 2, 8, 14
    test_step = [e.step for e in events.Scalars("test/acc")]
    assert [e.step for e in events.Images("test/prototypes")] == test_step == [6]  # the test's, after 6 batches
