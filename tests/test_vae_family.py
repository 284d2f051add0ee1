"""VaDE and GMVAE: the mixture ops against SciPy / torch.distributions and a Monte-Carlo ELBO,
positive variances under adversarial steps, recovery of well-separated image blobs (on the conv
network and on VaDE's fully connected one with a Bernoulli likelihood), strict checkpoint
restores, bad input, the probes and the CLI (fit, then predict)."""

from __future__ import annotations

import csv
import json
import math
import re

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TwoSplits, check_contract, cli_fit_then_predict, fixed_draw, make_trainer, spy_step
from scipy.stats import entropy, norm
from sklearn.metrics import adjusted_rand_score
from torch import nn
from torch.distributions import Normal, kl_divergence

from lightning_protos.cli import main
from lightning_protos.errors import ProtosError
from lightning_protos.eval.callbacks import AssignmentWriter, ClusteringEvaluator
from lightning_protos.eval.probes import ProbeEvaluator
from lightning_protos.methods.gmvae import GMVAE
from lightning_protos.methods.vade import VaDE
from lightning_protos.methods.vae import VAE
from lightning_protos.ops.mixture import (
    VAR_FLOOR,
    categorical_kl,
    diag_gaussian_kl,
    expected_gaussian_kl,
    floored_logvar,
    mixture_log_responsibilities,
    mixture_responsibilities,
    raw_logvar,
    vade_kl_terms,
)

SMALL = {"n_clusters": 3, "latent_dim": 4, "channels": (4, 8, 8)}  # a tiny network for CPU tests
# VaDE's fully connected network, narrow, with its Bernoulli likelihood and beta = q / d (28 x 28 inputs)
MLP = {"network": "mlp", "hidden": (32, 16, 64), "reconstruction": "bce", "beta": 4 / 784}
F64 = torch.float64


def image_blobs(n: int, seed: int, k: int = 3, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 1, size, size)`` images of k well-separated classes: class j is a bright vertical
    band in the j-th of k strips, plus Gaussian pixel noise; labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.zeros(k, 1, size, size)
    for j in range(k):
        templates[j, 0, :, j * size // k : (j + 1) * size // k] = 1.0
    y = torch.arange(n) % k
    x = (0.8 * templates[y] + 0.1 + 0.05 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)
    return x, y


def blobs_data(n_train: int = 60, batch_size: int = 20, fit_on: str = "all") -> TwoSplits:
    train, test = image_blobs(n_train, 0), image_blobs(30, 1)
    return TwoSplits(train, test, batch_size=batch_size, eval_batch_size=30, fit_on=fit_on)


def make(kind: str, seed: int = 0, **kwargs):
    L.seed_everything(seed, verbose=False)
    if kind == "vade":
        return VaDE(**{**SMALL, "pretrain_epochs": 3, "lr_step_epochs": None, **kwargs})
    return GMVAE(**{**SMALL, "w_dim": 2, "prior_hidden": 16, **kwargs})


def fit(model, dm, epochs: int, ckpt_path=None, seed: int = 0, **kwargs) -> L.Trainer:
    L.seed_everything(seed, verbose=False)
    trainer = make_trainer(max_epochs=epochs, **kwargs)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer


# -- ops ------------------------------------------------------------------------------
def scipy_posterior(z: np.ndarray, pi: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """p(c | z) = pi_c prod_j N(z_j; mu_cj, var_cj) / sum over c', by scipy's normal density;
    mu, var ``(K, q)``, or per sample ``(B, K, q)``."""
    mu, var = np.broadcast_to(mu, (len(z), *mu.shape[-2:])), np.broadcast_to(var, (len(z), *var.shape[-2:]))
    joint = pi * np.stack([norm.pdf(z, mu[:, c], np.sqrt(var[:, c])).prod(1) for c in range(len(pi))], axis=1)
    return joint / joint.sum(1, keepdims=True)


def test_responsibilities_equal_the_posterior_over_components_by_scipy():
    z = np.array([[0.0, 0.0], [1.0, -1.0], [3.0, 2.5], [-2.0, 0.5]])
    pi = np.array([0.5, 0.3, 0.2])
    mu = np.array([[0.0, 0.0], [2.0, 2.0], [-2.0, 1.0]])
    var = np.array([[1.0, 0.5], [0.3, 2.0], [1.5, 1.5]])
    want = scipy_posterior(z, pi, mu, var)
    t = {k: torch.tensor(v, dtype=F64) for k, v in {"z": z, "pi": pi, "mu": mu, "var": var}.items()}
    got = mixture_responsibilities(t["z"], t["pi"].log(), t["mu"], t["var"].log())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    # per-sample components (GMVAE's mu_c(w)): the same numbers when every row has the same set
    per_sample = mixture_responsibilities(
        t["z"], t["pi"].log(), t["mu"].expand(4, 3, 2), t["var"].log().expand(4, 3, 2)
    )
    np.testing.assert_allclose(per_sample.numpy(), want, rtol=1e-10)
    # a component 1e4 standard deviations away gets an exact 0, not a NaN
    far = mixture_log_responsibilities(
        t["z"][:1], t["pi"].log(), t["mu"] + torch.tensor([[0.0, 0.0], [1e4, 0], [0, 0]]), t["var"].log()
    )
    assert torch.isfinite(far).all()
    assert float(far[0, 1].exp()) == 0.0


def test_diag_gaussian_and_categorical_kl_against_references():
    g = torch.Generator().manual_seed(0)
    mu_q, logvar_q, mu_p, logvar_p = torch.randn(4, 5, 3, generator=g, dtype=F64)
    want = kl_divergence(Normal(mu_q, (0.5 * logvar_q).exp()), Normal(mu_p, (0.5 * logvar_p).exp()))
    torch.testing.assert_close(diag_gaussian_kl(mu_q, logvar_q, mu_p, logvar_p), want)
    gamma = torch.softmax(torch.randn(5, 4, generator=g, dtype=F64), 1)
    pi = torch.softmax(torch.randn(4, generator=g, dtype=F64), 0)
    want = [entropy(row, pi.numpy()) for row in gamma.numpy()]  # scipy's KL(row || pi)
    np.testing.assert_allclose(categorical_kl(gamma.log(), pi.log()).numpy(), want, rtol=1e-10)


def test_vade_kl_equals_the_papers_closed_form_and_a_monte_carlo_estimate_on_a_tiny_model():
    model = make("vade").double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a mixture prior as a GMM fit would leave it
        model.pi_logits.copy_(torch.tensor([0.2, -0.3, 0.1]))
        model.mu_c.copy_(torch.randn(3, 4, generator=g, dtype=F64))
        model.logvar_raw.copy_(raw_logvar(torch.rand(3, 4, generator=g, dtype=F64) + 0.5))
        x = torch.rand(2, 1, 28, 28, generator=g, dtype=F64)
        mu, logvar = model.encode(x)
        logvar = logvar.clamp(-1, 1)  # an untrained head: keep q(z|x) of the order of the prior
        z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=g, dtype=F64)
        kl_z, kl_c, gamma = vade_kl_terms(mu, logvar, z, model.log_pi, model.mu_c, model.logvar_c)
    assert (kl_z >= 0).all()
    assert (kl_c >= 0).all()
    m, s2 = mu.numpy(), logvar.exp().numpy()
    pi, mc, vc, gm = (
        model.log_pi.exp().detach().numpy(),
        model.mu_c.detach().numpy(),
        model.logvar_c.exp().detach().numpy(),
        gamma.numpy(),
    )
    # the paper's closed form (VaDE §3.2; constants cancel), written out per sample
    paper = [
        0.5 * sum(gm[i, c] * np.sum(np.log(vc[c]) + s2[i] / vc[c] + (m[i] - mc[c]) ** 2 / vc[c]) for c in range(3))
        - sum(gm[i, c] * np.log(pi[c] / gm[i, c]) for c in range(3))
        - 0.5 * np.sum(1 + np.log(s2[i]))
        for i in range(2)
    ]
    np.testing.assert_allclose((kl_z + kl_c).numpy(), paper, rtol=1e-10)
    # Monte Carlo: E_{z ~ q(z|x), c ~ gamma} [log q(z|x) + log gamma_c - log p(z|c) - log pi_c]
    rng = np.random.default_rng(0)
    n = 200_000
    for i in range(2):
        draws = m[i] + np.sqrt(s2[i]) * rng.standard_normal((n, 4))
        c = rng.choice(3, size=n, p=gm[i])
        log_q = norm.logpdf(draws, m[i], np.sqrt(s2[i])).sum(1) + np.log(gm[i, c])
        log_p = norm.logpdf(draws, mc[c], np.sqrt(vc[c])).sum(1) + np.log(pi[c])
        estimate, se = (log_q - log_p).mean(), (log_q - log_p).std() / math.sqrt(n)
        assert abs(estimate - float(kl_z[i] + kl_c[i])) < 4 * se + 1e-3


def test_gmvae_kl_terms_are_non_negative_and_zero_where_posterior_equals_prior():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    mu_c, logvar_c = torch.randn(6, 4, 3, generator=g), torch.randn(6, 4, 3, generator=g)
    gamma_logits = torch.randn(6, 4, generator=g)
    uniform = torch.full((4,), -math.log(4))
    gamma = torch.softmax(gamma_logits, 1)
    assert (expected_gaussian_kl(mu, logvar, gamma, mu_c, logvar_c) > 0).all()  # conditional prior term
    assert (categorical_kl(torch.log_softmax(gamma_logits, 1), uniform) > 0).all()  # z-prior term
    # zero where q(z|x) equals every component and p(c | z, w) is the uniform prior
    same = expected_gaussian_kl(mu, logvar, gamma, mu.unsqueeze(1).expand(6, 4, 3), logvar.unsqueeze(1).expand(6, 4, 3))
    torch.testing.assert_close(same, torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(categorical_kl(uniform.expand(6, 4), uniform), torch.zeros(6), atol=1e-6, rtol=0)
    # the model's terms: one batch's logged KL_cond, KL_w, KL_c are >= 0
    terms = spy_step(make("gmvae"), image_blobs(8, 0)[0])[0]
    assert set(terms) == {"L_recon", "KL_cond", "KL_w", "KL_c"}
    assert all(float(v) >= 0 for v in terms.values())
    assert float(terms["KL_c"]) >= 0.5 * 5e-3 / 4 * (1 - 1e-6)  # beta / q * lambda: the floor


def diag_kl_numpy(mu, logvar, mu_p, logvar_p):
    """Element-wise KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)), broadcast."""
    return 0.5 * (logvar_p - logvar + (np.exp(logvar) + (mu - mu_p) ** 2) / np.exp(logvar_p) - 1)


def test_gmvae_step_terms_are_the_docstrings_recomputed_in_numpy():
    """One training step's L_recon, KL_cond, KL_w and KL_c (methods/gmvae.py's docstring) from
    the step's own encoder and prior-network outputs, in float64 NumPy: the weight beta / q, the
    responsibilities at the drawn z, and the floor lambda on the batch mean of KL_c (not on each
    sample's). The draws are fixed at mu + 0.5 sigma."""
    model = make("gmvae", kl_c_floor=0.0)
    model.reparameterise = fixed_draw
    images = image_blobs(8, 0)[0]
    with torch.no_grad():  # the step's forward pass (train mode: batch statistics)
        x = model.to_net(images)
        z_mu, z_lv, w_mu, w_lv = model.encode_zw(x)
        z, w = model.reparameterise(z_mu, z_lv), model.reparameterise(w_mu, w_lv)
        mu_c, lv_c = (t.double().numpy() for t in model.components(w))
        out = model.reconstruct(z).double().numpy()
    x, z_mu, z_lv, w_mu, w_lv, z = (t.double().numpy() for t in (x, z_mu, z_lv, w_mu, w_lv, z))
    log_density = -0.5 * (np.log(2 * np.pi) + lv_c + (z[:, None] - mu_c) ** 2 / np.exp(lv_c)).sum(-1)  # (B, K)
    gamma = np.exp(log_density - log_density.max(1, keepdims=True))
    gamma /= gamma.sum(1, keepdims=True)  # p(c | z, w) under the uniform p(c)
    kl_to_c = diag_kl_numpy(z_mu[:, None], z_lv[:, None], mu_c, lv_c)
    kl_c = (gamma * np.log(gamma * 3)).sum(1)  # per sample
    weight = 5e-3 / 4  # beta / q
    want = {
        "L_recon": ((out - x) ** 2).mean(),
        "KL_cond": weight * (gamma * kl_to_c.sum(-1)).sum(1).mean(),
        "KL_w": weight * (0.5 * (np.exp(w_lv) + w_mu**2 - 1 - w_lv)).sum(1).mean(),
    }
    floors = (0.0, (kl_c.min() + kl_c.mean()) / 2, kl_c.max() + 0.1)  # none, some samples below, all below
    assert kl_c.min() < floors[1] < kl_c.mean()
    for floor in floors:
        model.hparams.kl_c_floor = floor
        got = spy_step(model, images)[0]
        assert got == pytest.approx({**want, "KL_c": weight * max(floor, kl_c.mean())}, rel=1e-5)
    logged = {}  # beside the terms, outside the loss: KL_c before the (last, highest) floor
    model.check_and_log = lambda t, metrics=None: logged.update({k: float(v) for k, v in metrics.items()}) or 0
    model.training_step({"x": images, "index": torch.arange(len(images))}, 0)
    assert logged == pytest.approx({"KL_c_unfloored": weight * kl_c.mean()}, rel=1e-5)


def test_vae_step_is_the_elbo_of_its_docstring_in_numpy():
    """One VAE step: L_recon the squared error averaged over pixels and batch, KL = beta times the
    KL to N(0, s^2 I) averaged over batch and latent dimensions (methods/vae.py); the draw fixed
    at mu + 0.5 sigma. The VAE family (VAESim included) sums these two terms."""
    L.seed_everything(0, verbose=False)
    model = VAE(**SMALL, beta=0.3, prior_std=0.8)
    model.reparameterise = fixed_draw
    images = image_blobs(8, 0)[0]
    with torch.no_grad():  # the step's forward pass (train mode: batch statistics)
        x = model.to_net(images)
        mu, logvar = model.encoder(x)
        out = model.reconstruct(fixed_draw(mu, logvar))
    x, out, mu, logvar = (t.double().numpy() for t in (x, out, mu, logvar))
    want = {"L_recon": ((out - x) ** 2).mean(), "KL": 0.3 * diag_kl_numpy(mu, logvar, 0.0, 2 * np.log(0.8)).mean()}
    assert spy_step(model, images)[0] == pytest.approx(want, rel=1e-5)


def test_vade_step_is_the_papers_closed_form_weighted_by_beta_over_q():
    """One VaDE step after pretraining: KL_z = E_gamma KL(q(z|x) || p(z|c)) and KL_c = KL(gamma ||
    pi), each summed over its dimensions, times beta / q and averaged over the batch, with gamma =
    p(c | z) at the draw (fixed at mu + 0.5 sigma), under a non-uniform mixture."""
    model = make("vade", beta=0.3)
    model.trainer = type("Trainer", (), {"current_epoch": 3})()  # after the 3 pretraining epochs
    model.reparameterise = fixed_draw
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.pi_logits.copy_(torch.randn(3, generator=g))
        model.mu_c.copy_(torch.randn(3, 4, generator=g))
        model.logvar_raw.copy_(0.5 * torch.randn(3, 4, generator=g))
    images = image_blobs(8, 0)[0]
    with torch.no_grad():
        x = model.to_net(images)
        mu, logvar = model.encoder(x)
        z = fixed_draw(mu, logvar)
        out = model.reconstruct(z)
        pi, mu_c, logvar_c = (t.double().numpy() for t in (model.log_pi.exp(), model.mu_c, model.logvar_c))
    mu, logvar, z = (t.double().numpy() for t in (mu, logvar, z))
    log_joint = np.log(pi) + norm.logpdf(z[:, None], mu_c, np.exp(0.5 * logvar_c)).sum(-1)  # (B, K)
    gamma = np.exp(log_joint - log_joint.max(1, keepdims=True))
    gamma /= gamma.sum(1, keepdims=True)
    kl_z = (gamma * diag_kl_numpy(mu[:, None], logvar[:, None], mu_c, logvar_c).sum(-1)).sum(1)
    kl_c = (gamma * np.log(gamma / pi)).sum(1)
    want = {
        "L_recon": ((out.double().numpy() - x.double().numpy()) ** 2).mean(),
        "KL_z": 0.3 / 4 * kl_z.mean(),
        "KL_c": 0.3 / 4 * kl_c.mean(),
    }
    assert spy_step(model, images, optimizers=("vade", "pretrain"))[0] == pytest.approx(want, rel=1e-5)


def test_variances_stay_positive_when_driven_to_zero():
    # VaDE: a component that collapses onto a point: q(z|x) = N(mu_c, ~0) pulls sigma_c^2 to 0 for
    # ever (the KL's derivative in log sigma_c^2 is 1/2 there), and Adam drives it down ...
    model = make("vade")
    optimizer = torch.optim.Adam([model.logvar_raw], lr=10.0)
    mu = model.mu_c.detach()[:1]
    for _ in range(100):
        kl = expected_gaussian_kl(
            mu, torch.full_like(mu, -200.0), torch.tensor([[1.0, 0, 0]]), model.mu_c, model.logvar_c
        )
        optimizer.zero_grad()
        kl.sum().backward()
        optimizer.step()
    assert float(model.logvar_raw[0].max()) < -80  # exp(raw) < 1e-34: sigma_c^2 = exp(raw) is ~0
    torch.testing.assert_close(model.logvar_c.exp()[0], torch.full((4,), VAR_FLOOR), rtol=1e-5, atol=0)
    with torch.no_grad():  # ... and past the point where exp(raw) underflows to 0
        model.logvar_raw[0] = -1e4
    assert torch.exp(torch.tensor(-1e4)) == 0
    variances = model.logvar_c.exp()
    assert (variances > 0).all()
    torch.testing.assert_close(variances[0], torch.full((4,), VAR_FLOOR), rtol=1e-5, atol=0)
    with torch.no_grad():
        assert torch.isfinite(model.eval().cluster_probs(image_blobs(4, 0)[0])).all()
    # GMVAE: a prior network whose log-variance outputs are -1e4
    model = make("gmvae")
    with torch.no_grad():
        last = model.prior_net[-1]
        last.bias[model.n_clusters * model.hparams.latent_dim :] = -1e4
        _, logvar_c = model.components(torch.randn(5, 2))
        assert (logvar_c.exp() > 0).all()
        assert torch.isfinite(model.eval().cluster_probs(image_blobs(4, 0)[0])).all()
    # the floor is smooth, and the identity well above it
    raw = torch.tensor([-1e4, 0.0, 5.0], requires_grad=True)
    floored_logvar(raw).sum().backward()
    assert torch.isfinite(raw.grad).all()
    assert (raw.grad >= 0).all()
    assert float(raw.grad[2]) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(floored_logvar(torch.tensor(0.0)), torch.tensor(math.log(1 + VAR_FLOOR)))
    torch.testing.assert_close(floored_logvar(raw_logvar(torch.tensor([0.5, 2.0]))).exp(), torch.tensor([0.5, 2.0]))


# -- the methods ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vade", "gmvae"])
def test_contract_shapes_and_a_deterministic_embedding(kind):
    check_contract(make(kind), image_blobs(5, 0)[0], latent_dim=4, out_shape=(1, 28, 28))


def linear_widths(module: nn.Module) -> list[int]:
    return [m.out_features for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("kind", ["vade", "gmvae"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (16,)])
def test_the_fully_connected_network_round_trips_images_and_vectors(kind, shape):
    model = make(kind, input_shape=shape, **MLP)
    x = torch.rand(5, *shape)
    check_contract(model, x, latent_dim=4, out_shape=shape)
    d = math.prod(shape)
    assert model.to_net(x).shape == (5, d)  # flattened at its own size, no resize to 32x32
    assert torch.equal(model.from_net(model.to_net(x)), x)
    # d-32-16-64 ReLU trunk and two linear heads; the decoder mirrors it: q-64-16-32-d, sigmoid
    assert linear_widths(model.encoder.features) == [32, 16, 64]
    assert all(isinstance(m, (nn.Linear, nn.ReLU)) for m in model.encoder.features)
    assert isinstance(model.encoder.features[-1], nn.ReLU)
    assert (model.encoder.mu.in_features, model.encoder.mu.out_features) == (64, 4)
    assert (model.encoder.logvar.in_features, model.encoder.logvar.out_features) == (64, 4)
    assert model.decoder.net[0].in_features == 4
    assert linear_widths(model.decoder) == [64, 16, 32, d]
    with torch.no_grad():
        z = torch.randn(3, 4)
        images = model.decode(z)
        assert ((images >= 0) & (images <= 1)).all()
        torch.testing.assert_close(model.from_net(torch.sigmoid(model.reconstruct(z))), images)  # bce: logits
    # the paper's widths by default: 784-500-500-2000-10 and 10-2000-500-500-784
    paper = VaDE(n_clusters=10, latent_dim=10, network="mlp")
    assert linear_widths(paper.encoder) == [500, 500, 2000, 10, 10]
    assert linear_widths(paper.decoder) == [2000, 500, 500, 784]


def test_bce_is_the_bernoulli_likelihood_per_pixel_computed_from_logits():
    model = make("vade", input_shape=(4,), **MLP)
    logits = torch.tensor([[2.0, -1.0, 0.0, 3.0], [-2.0, 0.5, 1.0, -4.0]])
    x = torch.tensor([[1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 1.0, 0.9]])
    p = torch.sigmoid(logits)
    by_hand = -(x * p.log() + (1 - x) * (1 - p).log()).mean()  # the mean over the 8 pixels
    torch.testing.assert_close(model.reconstruction_loss(x, logits), F.binary_cross_entropy(p, x))
    torch.testing.assert_close(model.reconstruction_loss(x, logits), by_hand)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 under a bf16 network
        assert model.reconstruction_loss(x, logits.bfloat16()).dtype == torch.float32
    # a saturated wrong pixel: from logits the loss is its 100 nats and the gradient is there;
    # through the sigmoid's output (p = 1.0 exactly in float32) the gradient would vanish
    saturated = torch.tensor([[100.0]], requires_grad=True)
    loss = model.reconstruction_loss(torch.zeros(1, 1), saturated)
    loss.backward()
    assert float(loss) == pytest.approx(100.0)
    assert float(saturated.grad) == pytest.approx(1.0)
    # the pretraining step minimises the same BCE of d(z_mu)
    model.trainer = type("Trainer", (), {"current_epoch": 0})()
    batch = torch.rand(6, 4)
    terms = spy_step(model, batch, optimizers=(None, None))[0]
    with torch.no_grad():
        want = F.binary_cross_entropy(model.decoder(model.encode(batch)[0]), batch)
    assert terms["L_recon"] == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize(
    ("kind", "seed", "network"),
    [("vade", 0, {}), ("vade", 1, {}), ("gmvae", 0, {}), ("vade", 0, MLP), ("vade", 1, MLP)],
    ids=["vade-0", "vade-1", "gmvae-0", "vade-mlp-bce-0", "vade-mlp-bce-1"],
)
def test_recovers_well_separated_image_blobs(kind, seed, network):
    # VaDE: 10 pretraining + 5 VaDE epochs of 3 steps; GMVAE: 30 epochs of 6 steps (it also
    # learns its prior network). Seeds 0-3 all give ARI 1.0 for both, and for VaDE on the fully
    # connected network with BCE (checked by hand).
    dm = blobs_data(n_train=60 if kind == "vade" else 120)
    model = make(kind, seed, pretrain_epochs=10, **network) if kind == "vade" else make(kind, seed)
    fit(model, dm, 15 if kind == "vade" else 30, seed=seed)
    x, y = dm.features("eval"), dm.labels("eval")
    with torch.no_grad():
        found = model.eval().predict_clusters(x)
    assert adjusted_rand_score(y.numpy(), found.numpy()) > 0.9


def test_vade_pretrains_then_fits_the_gmm_once_on_the_codes():
    dm = blobs_data()
    model = make("vade")
    calls = []
    init = model.init_mixture

    def spy():
        calls.append(model.current_epoch)
        before = [p.detach().clone() for p in (model.pi_logits, model.mu_c, model.logvar_raw)]
        model.eval()  # z_mu of every training image, encoded here in one batch
        with torch.no_grad():
            z = model.encode(dm.features("fit"))[0].double().numpy()
        model.train()
        init()
        # scikit-learn's GMM on those codes with the run's seed gives the same parameters
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(3, covariance_type="diag", random_state=torch.initial_seed() % 2**31).fit(z)
        np.testing.assert_allclose(model.log_pi.exp().detach().numpy(), gmm.weights_, rtol=1e-4)
        np.testing.assert_allclose(model.mu_c.detach().numpy(), gmm.means_, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(model.logvar_c.exp().detach().numpy(), gmm.covariances_, rtol=1e-4)
        assert not torch.equal(before[1], model.mu_c)

    model.init_mixture = spy
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((pl_module.current_epoch, pl_module.mu_c.detach().clone()))

    fit(model, dm, 5, callbacks=[Record()])
    assert calls == [3]  # once, after the 3 pretraining epochs
    pretraining = [m for e, m in seen if e < 3]
    assert all(torch.equal(m, pretraining[0]) for m in pretraining)  # the mixture waits for the GMM
    assert not torch.equal(seen[-1][1], seen[9][1])  # and is then trained with the network


def test_uniform_mixture_weights_stay_one_over_k_while_the_rest_trains():
    """``mixture_weights: uniform``: the GMM sets the means and variances but not pi, which stays
    1/K through training; ``learned`` takes the GMM's weights and trains them."""
    dm = blobs_data()
    weights = {}
    for how in ("uniform", "learned"):
        model = make("vade", mixture_weights=how)
        fit(model, dm, 5)  # 3 pretraining + 2 VaDE epochs
        weights[how] = model.pi_logits.detach().clone()
        assert bool(model.initialised)
        assert not torch.equal(model.mu_c.detach(), torch.zeros(3, 4))
    assert torch.equal(weights["uniform"], torch.zeros(3))  # softmax: 1/3 each
    assert (torch.softmax(weights["learned"], 0) - 1 / 3).abs().max() > 1e-3
    with pytest.raises(ProtosError, match="mixture_weights must be one of learned, uniform"):
        make("vade", mixture_weights="fixed")


@pytest.mark.parametrize("kind", ["vade", "gmvae"])
def test_checkpoint_restores_the_mixture_strictly(kind, tmp_path):
    dm = blobs_data()
    model = make(kind)
    trainer = fit(model, dm, 4)
    path = tmp_path / f"{kind}.ckpt"
    trainer.save_checkpoint(path)
    restored = type(model).load_from_checkpoint(path, strict=True)
    names = (
        ["pi_logits", "mu_c", "logvar_raw", "initialised"] if kind == "vade" else ["w_mu.weight", "prior_net.2.bias"]
    )
    state, want = restored.state_dict(), model.state_dict()
    for name in names:
        assert torch.equal(state[name], want[name]), name
    x = dm.features("eval")
    with torch.no_grad():
        torch.testing.assert_close(restored.eval().cluster_probs(x), model.eval().cluster_probs(x))
        torch.testing.assert_close(restored.prototypes(), model.prototypes())
    if kind == "vade":  # resuming past the pretraining does not fit the GMM again
        assert bool(restored.initialised)
        resumed = make(kind)
        resumed.init_mixture = lambda: pytest.fail("the GMM was fitted again")
        fit(resumed, dm, 5, ckpt_path=path)


def test_bad_input_gives_one_line_errors_before_training():
    cases = [
        (VaDE, {"n_clusters": 1}, r"n_clusters \(K\) must be >= 2, got 1"),
        (GMVAE, {"n_clusters": 1}, r"n_clusters \(K\) must be >= 2, got 1"),
        (VaDE, {"pretrain_epochs": -1}, "pretrain_epochs must be >= 0"),
        (VaDE, {"gmm_n_init": 0}, "gmm_n_init must be > 0"),
        (VaDE, {"beta": -1.0}, "beta must be >= 0"),
        (VaDE, {"lr": 0.0}, "lr must be > 0"),
        (GMVAE, {"kl_c_floor": 1.2}, r"kl_c_floor .* must be in \[0, log K = 1.099\)"),
        (GMVAE, {"kl_c_floor": -0.1}, r"kl_c_floor \(lambda\) must be in \[0, log K = .*\) nats, got -0.1"),
        (GMVAE, {"w_dim": 0}, "w_dim must be > 0"),
        (GMVAE, {"input_shape": (784,)}, "flatten false"),
        (VaDE, {"input_shape": (1, 8, 8)}, r"takes images \(C, 28, 28\) or \(C, 32, 32\)"),
        (VaDE, {"input_shape": (784,), "network": "conv"}, "conv network takes images .*flatten false"),
        (VaDE, {"network": "foo"}, "network must be one of conv, mlp; got 'foo'"),
        (GMVAE, {"network": "foo"}, "network must be one of conv, mlp"),
        (VaDE, {"reconstruction": "foo"}, "reconstruction must be one of mse, bce; got 'foo'"),
        (VaDE, {"network": "mlp", "hidden": (8, 0)}, r"hidden \[8, 0\]: 0 at position 1 is below 1"),
    ]
    for cls, kwargs, message in cases:
        with pytest.raises(ProtosError, match=message) as err:
            cls(**{**SMALL, **kwargs})
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.flatten", "true", "--model.network", "conv"], r"conv network takes .* input shape \(784,\)"),
        (["--model.network", "foo"], r"\"network\": Expected .*'conv', 'mlp'.*Got value: foo"),
        (["--model.reconstruction", "foo"], r"\"reconstruction\": Expected .*'mse', 'bce'.*Got value: foo"),
    ],
)
def test_the_paper_config_rejects_a_bad_network_or_likelihood_in_one_line(extra, message, tmp_path, capsys):
    data = tmp_path / "blobs.npz"
    x, y = image_blobs(24, 0)
    np.savez(data, X=(x * 255).to(torch.uint8).numpy(), y=y.numpy())
    config = str(ROOT / "configs" / "vade_mnist_paper.yaml")
    args = ["fit", "--config", config, "--data", "lightning_protos.data.ArrayFile", "--data.path", str(data)]
    args += ["--trainer.default_root_dir", str(tmp_path), *extra]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = "\n".join(filter(None, [capsys.readouterr().err.strip(), str(exit_.value.code)]))
    lines = [line for line in err.splitlines() if line.startswith("protos: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(message, lines[0])
    assert not (tmp_path / "lightning_logs").exists()  # nothing was trained


@pytest.mark.parametrize("kind", ["vade", "gmvae"])
def test_probes_and_clustering_evaluation_run_on_a_short_fit(kind, tmp_path):
    dm = blobs_data(fit_on="train")  # the probes score held-out samples
    callbacks = [ClusteringEvaluator(), ProbeEvaluator(knn_k=3, linear_epochs=5)]
    trainer = fit(make(kind), dm, 4, limit_val_batches=1.0, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.test(trainer.lightning_module, dm, verbose=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for stage in ("val", "test"):
        assert {"acc", "nmi", "ari", "stat_acc", "knn_acc", "linear_acc"} <= set(metrics[stage])
        assert all(0 <= metrics[stage][k] <= 1 for k in ("acc", "stat_acc", "knn_acc", "linear_acc"))
    assert metrics["test"]["knn_acc"] == 1.0  # the blobs are separable in any sensible embedding


@pytest.mark.parametrize("kind", ["vade", "gmvae"])
def test_cli_fit_then_predict_on_the_pneumonia_config(kind, tmp_path, capsys):
    data = tmp_path / "blobs.npz"
    x, y = image_blobs(24, 0)
    np.savez(data, X=(x * 255).to(torch.uint8).numpy(), y=y.numpy())
    model = ["--model.n_clusters", "3", "--model.latent_dim", "4", "--model.channels", "[4, 8, 8]"]
    model += ["--model.pretrain_epochs", "1"] if kind == "vade" else []
    _, rows = cli_fit_then_predict(
        tmp_path, capsys, f"{kind}_pneumonia.yaml", data, *model, "--trainer.max_epochs", "2"
    )
    assert len(rows) == 24
    assert {"label", "cluster", "p_0", "p_2"} <= set(rows[0])
    np.testing.assert_allclose([sum(float(r[f"p_{j}"]) for j in range(3)) for r in rows], 1.0, atol=1e-4)


@pytest.mark.parametrize("kind", ["vade", "gmvae"])
def test_cluster_probs_are_the_posterior_at_the_encoder_means_by_scipy(kind):
    """VaDE: gamma = p(c | z_mu) under its mixture (weights pi included); GMVAE: p(c | z_mu, w_mu)
    with the prior network's components at w_mu and p(c) = 1/K. In training and in eval mode
    (BatchNorm's batch or running statistics), and the same on a second call: no sampling."""
    model = make(kind)
    x = image_blobs(6, 0)[0]
    if kind == "vade":
        with torch.no_grad():
            model.pi_logits.copy_(torch.tensor([1.0, -0.5, 0.2]))  # weights far from uniform
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            if kind == "vade":
                z = model.embed(x)
                mu, var, pi = model.mu_c, model.logvar_c.exp(), model.log_pi.exp()
            else:
                z, _, w, _ = model.encode_zw(model.to_net(x))
                out = model.prior_net(w).reshape(len(w), 2, 3, 4)
                mu, var, pi = out[:, 0], out[:, 1].exp() + VAR_FLOOR, torch.full((3,), 1 / 3)  # ops.floored_logvar
            want = scipy_posterior(*(t.double().numpy() for t in (z, pi, mu, var)))
            assert want.max(1).min() < 0.99  # no row decided outright: a wrong weight or variance shows
            for _ in range(2):
                np.testing.assert_allclose(model.cluster_probs(x).double().numpy(), want, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the prototypes: VaDE's mu_c; GMVAE's component means at w = 0, the mode of p(w)
        want = model.mu_c if kind == "vade" else model.prior_net(torch.zeros(1, 2)).reshape(2, 3, 4)[0]
        torch.testing.assert_close(model.prototypes(), want)


def test_predict_writes_the_component_posterior(tmp_path):
    dm = blobs_data()
    model = make("vade")
    fit(model, dm, 4)
    trainer = make_trainer(default_root_dir=tmp_path, callbacks=[AssignmentWriter(n_nearest=2)])
    trainer.predict(model, dm)
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    order = [int(r["index"]) for r in rows]
    with torch.no_grad():
        gamma = model.eval().cluster_probs(dm.features("eval")).numpy()[order]
    got = np.array([[float(r[f"p_{j}"]) for j in range(3)] for r in rows])
    np.testing.assert_allclose(got, gamma, rtol=1e-4, atol=1e-5)
    assert [int(r["cluster"]) for r in rows] == list(gamma.argmax(1))
