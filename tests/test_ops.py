"""ops/: the CM and AE-CM loss terms against explicit loops, the k-means initialisations, and
the batch augmentations against torchvision, the latent walks against NumPy."""

import numpy as np
import pytest
import torch
from reference import aecm_terms_numpy, cm_terms_loops, dirichlet_loops
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from lightning_protos.nets import ClusteringModule
from lightning_protos.ops import (
    aecm_terms,
    affine,
    around,
    cm_terms,
    dirichlet_term,
    interpolate,
    kmeans_pp_centres,
    nearest_one_hot,
    pinv_encoder,
    random_affine,
    random_equalize,
)


@pytest.fixture
def tiny():
    """B=5 samples in d=3, K=4 clusters; gamma rows on the simplex, float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    gamma = torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    return x, gamma, mu


@pytest.mark.parametrize("alpha", [1.0, 0.5, 177.0])
def test_cm_terms_match_loops(tiny, alpha):
    x, gamma, mu = tiny
    got = cm_terms(x, gamma, mu, alpha)
    want = cm_terms_loops(x.numpy(), gamma.numpy(), mu.numpy(), alpha)
    assert set(got) == {"E1", "E2", "E3", "E4"}
    for name, value in want.items():
        assert float(got[name]) == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_cm_terms_hand_case():
    """One sample, two orthogonal unit centroids, gamma = (1/2, 1/2), x = 0, alpha = 1."""
    x = torch.zeros(1, 2, dtype=torch.float64)
    gamma = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    mu = torch.eye(2, dtype=torch.float64)
    t = cm_terms(x, gamma, mu, 1.0)
    assert float(t["E1"]) == pytest.approx(0.5)  # ||(1/2, 1/2)||^2
    assert float(t["E2"]) == pytest.approx(0.5)  # 2 * 1/2 * 1/2 * 1
    assert float(t["E3"]) == pytest.approx(0.0)  # orthogonal centroids
    assert float(t["E4"]) == pytest.approx(0.0)  # alpha = 1


def test_cm_terms_e3_counts_only_distinct_pairs():
    """With identical centroids E3 = -sum_i sum_{k != l} g_ik g_il ||mu||^2, not the full square."""
    gamma = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    mu = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    t = cm_terms(torch.zeros(1, 2, dtype=torch.float64), gamma, mu, 1.0)
    assert float(t["E3"]) == pytest.approx(-2 * 0.25 * 0.75 * 2.0)


def test_cm_terms_sum_to_the_weighted_distances(tiny):
    """E1 + E2 + E3 = sum_i sum_k gamma_ik ||x_i - mu_k||^2 for rows of gamma on the simplex."""
    x, gamma, mu = tiny
    t = cm_terms(x, gamma, mu, 1.0)
    weighted = sum(
        float(gamma[i, k]) * float(((x[i] - mu[k]) ** 2).sum()) for i in range(len(x)) for k in range(len(mu))
    )
    assert float(t["E1"] + t["E2"] + t["E3"]) == pytest.approx(weighted, rel=1e-10)


def test_cm_terms_are_differentiable_in_float32(tiny):
    x, gamma, mu = (a.float() for a in tiny)
    mu.requires_grad_(True)
    sum(cm_terms(x, gamma, mu, 2.0).values()).backward()
    assert mu.grad is not None
    assert torch.isfinite(mu.grad).all()


@pytest.mark.parametrize(
    ("fn", "term"),
    [("cm", t) for t in ("E1", "E2", "E3", "E4")] + [("aecm", t) for t in ("L_rec", "E1", "E2", "E4", "L_orth")],
)
def test_cm_and_aecm_terms_have_their_finite_difference_gradients(tiny, fn, term):
    """Autograd's gradient of each term in x (or z), gamma's logits and mu equals its central
    finite differences (float64): no term is cut off from the graph in any of its inputs."""
    x, gamma, mu = tiny
    logits = gamma.log()
    x_rec = x.flip(0)  # another (B, d) tensor, as dec(z)

    def value(x, logits, mu, x_rec):
        gamma = torch.softmax(logits, dim=1)
        if fn == "cm":
            return cm_terms(x, gamma, mu, 3.0)[term]
        t = aecm_terms(x, x_rec, x, gamma, mu, alpha=3.0, beta=0.7, lam=0.4)
        return t[term]

    inputs = tuple(t.clone().requires_grad_(True) for t in (x, logits, mu, x_rec))
    assert torch.autograd.gradcheck(value, inputs)


def test_dirichlet_term_scalar_alpha(tiny):
    _, gamma, _ = tiny
    assert float(dirichlet_term(gamma, 3.0)) == pytest.approx(dirichlet_loops(gamma.numpy(), 3.0))
    assert float(dirichlet_term(gamma, 1.0)) == 0.0


def test_dirichlet_term_vector_alpha_is_paired_in_sorted_order(tiny):
    _, gamma, _ = tiny
    alpha = [5.0, 0.5, 2.0, 1.5]
    got = float(dirichlet_term(gamma, torch.tensor(alpha, dtype=torch.float64)))
    assert got == pytest.approx(dirichlet_loops(gamma.numpy(), alpha))
    # the pairing ignores the order in which the concentrations are given
    shuffled = float(dirichlet_term(gamma, torch.tensor(alpha[::-1], dtype=torch.float64)))
    assert shuffled == pytest.approx(got)
    # a constant vector equals the scalar
    assert float(dirichlet_term(gamma, torch.full((4,), 2.0, dtype=torch.float64))) == pytest.approx(
        float(dirichlet_term(gamma, 2.0))
    )


@pytest.mark.parametrize(("alpha", "beta", "lam"), [(1.0, 1.0, 1.0), (230.0, 5.0, 0.5)])
def test_aecm_terms_match_numpy(alpha, beta, lam):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 7, generator=g, dtype=torch.float64)
    x_rec = torch.rand(6, 7, generator=g, dtype=torch.float64)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64)
    gamma = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    got = aecm_terms(x, x_rec, z, gamma, mu, alpha, beta, lam)
    want = aecm_terms_numpy(x, x_rec, z, gamma, mu, alpha, beta, lam)
    assert set(got) == set(want)
    for name, value in want.items():
        assert float(got[name]) == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_aecm_orthonormality_penalty_vanishes_on_orthonormal_centroids():
    mu = torch.eye(3, 5, dtype=torch.float64)
    gamma = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    z, x = torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    assert float(aecm_terms(x, x, z, gamma, mu, 1.0, 1.0, 1.0)["L_orth"]) == 0.0


def test_pinv_encoder_maps_each_centre_to_its_cluster():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=g)  # K = 5 centres in d = 8
    w = pinv_encoder(centres)
    assert w.shape == (8, 5)
    np.testing.assert_allclose((centres.double() @ w.double()).numpy(), np.eye(5), atol=1e-5)
    cm = ClusteringModule(8, 5)
    cm.init_from_centres(centres)
    with torch.no_grad():
        assert torch.equal(cm(centres).argmax(1), torch.arange(5))
        torch.testing.assert_close(cm.centroids(), centres)


def test_posterior_encoder_gives_the_isotropic_gmm_responsibilities():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    cm = ClusteringModule(3, 4).double()
    cm.init_from_centres(centres, encoder="posterior")
    sq = ((x.numpy()[:, None, :] - centres.numpy()[None]) ** 2).sum(-1)  # (50, 4)
    logits = -0.5 * sq
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    with torch.no_grad():
        np.testing.assert_allclose(cm(x).numpy(), expected, rtol=1e-10)
        torch.testing.assert_close(cm.centroids(), centres)
    assert (cm(x).argmax(1).numpy() == sq.argmin(1)).all()  # the k-means partition


def test_nearest_one_hot_marks_the_closest_centre_by_scipy():
    from scipy.spatial.distance import cdist

    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    want = np.eye(6)[cdist(x.numpy(), c.numpy()).argmin(1)]  # 6 columns: the last 2 stay 0
    got = nearest_one_hot(x, c, 6)
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(nearest_one_hot(x, c).numpy(), want[:, :4])


def test_kmeans_pp_centres_shape_and_determinism():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    a = kmeans_pp_centres(x, 6, seed=3)
    assert a.shape == (6, 4)
    assert a.dtype == x.dtype
    assert torch.equal(a, kmeans_pp_centres(x, 6, seed=3))
    assert not torch.equal(a, kmeans_pp_centres(x, 6, seed=4))
    # k-means++ seeds are data points, all distinct
    matches = (torch.cdist(a, x) < 1e-6).sum(1)
    assert (matches >= 1).all()
    assert len({tuple(r.tolist()) for r in a}) == 6
    # lloyd_steps: that many Lloyd iterations from the same seeds, in NumPy
    want = a.double().numpy()
    for _ in range(2):
        nearest_seed = ((x.double().numpy()[:, None] - want) ** 2).sum(-1).argmin(1)
        want = np.stack([x.double().numpy()[nearest_seed == k].mean(0) for k in range(6)])
    refined = kmeans_pp_centres(x, 6, seed=3, lloyd_steps=2)
    np.testing.assert_allclose(refined.double().numpy(), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, a.numpy())


# -- batch augmentations (VAESim (aug)) ------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (3, 3, 20, 28), (3, 1, 32, 24)])
def test_affine_moves_each_image_as_torchvisions_affine(shape):
    """One transform per image, each equal to torchvision's ``affine`` of that image alone,
    on square and non-square images (pixel units keep the rotations rigid)."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    angle = torch.tensor([12.0, -7.5, 0.0])
    scale = torch.tensor([0.9, 1.15, 1.0])
    shift = torch.tensor([[1.5, -2.0], [-3.0, 0.5], [0.0, 0.0]])
    moved = affine(x, angle, scale, shift)
    for i in range(len(x)):
        want = TF.affine(
            x[i], angle=float(angle[i]), translate=shift[i].tolist(), scale=float(scale[i]), shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
        )  # fmt: skip
        torch.testing.assert_close(moved[i], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(moved[2], x[2], atol=1e-5, rtol=0)


def test_augmentations():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 28, 28, generator=g)
    torch.testing.assert_close(random_affine(x, degrees=0, translate=0, scale=(1, 1)), x, atol=1e-5, rtol=0)
    moved = random_affine(x.expand(6, 1, 28, 28)[:1].repeat(6, 1, 1, 1), generator=g)
    assert moved.shape == x.shape
    assert not torch.allclose(moved[0], moved[1])  # one draw per image
    u8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(random_equalize(x, p=1.0), TF.equalize(u8).float() / 255)
    assert torch.equal(random_equalize(x, p=0.0), x)


def test_random_augmentations_draw_over_their_whole_ranges(monkeypatch):
    """One draw per image, uniform over each range: angle in (-15, 15) degrees (both signs), scale
    in (0.9, 1.1), shifts within 10% of the width (x) and of the height (y) of a non-square image;
    equalisation of about half the images at p = 0.5, each either equalised or untouched."""
    import lightning_protos.ops.augment as augment

    drawn = {}
    monkeypatch.setattr(augment, "affine", lambda x, angle, scale, shift: drawn.update(a=angle, s=scale, t=shift) or x)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4000, 1, 8, 20, generator=g)
    augment.random_affine(x, degrees=15.0, translate=0.1, scale=(0.9, 1.1), generator=g)
    edges = {"a": (-15.0, 15.0), "s": (0.9, 1.1)}
    edges.update(tx=(-2.0, 2.0), ty=(-0.8, 0.8))  # 10% of 20 and of 8 pixels
    values = {"a": drawn["a"], "s": drawn["s"], "tx": drawn["t"][:, 0], "ty": drawn["t"][:, 1]}
    for name, (low, high) in edges.items():
        v, margin = values[name], 0.01 * (high - low)
        assert v.shape == (4000,)
        assert low <= float(v.min()) < low + margin, name
        assert high - margin < float(v.max()) <= high, name
        assert abs(float(v.mean()) - (low + high) / 2) < 0.05 * (high - low), name  # a symmetric draw
    equalised = TF.equalize((x[:, :, :8, :8] * 255).round().to(torch.uint8)).float() / 255
    out = random_equalize(x[:, :, :8, :8], p=0.5, generator=g)
    chosen = (out - equalised).abs().amax((1, 2, 3)) < 1e-6
    assert torch.equal(out[~chosen], x[~chosen][:, :, :8, :8])
    assert abs(float(chosen.float().mean()) - 0.5) < 0.03


# -- latent walks (inspection) --------------------------------------------------------------
def test_interpolate_is_evenly_spaced_on_the_segment():
    a, b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([3.0, 4.0, -1.5], dtype=torch.float64)
    t = np.linspace(0, 1, 6)[:, None]
    np.testing.assert_allclose(interpolate(a, b, 6).numpy(), (1 - t) * a.numpy() + t * b.numpy(), rtol=0, atol=1e-15)


def test_around_draws_from_an_isotropic_gaussian_at_the_prototype():
    prototype = torch.tensor([2.0, -1.0, 0.0, 5.0], dtype=torch.float64)
    draws = around(prototype, 20000, scale=0.3, generator=torch.Generator().manual_seed(0)).numpy()
    assert draws.shape == (20000, 4)
    np.testing.assert_allclose(draws.mean(0), prototype.numpy(), atol=4 * 0.3 / np.sqrt(20000))
    np.testing.assert_allclose(np.cov(draws.T), 0.09 * np.eye(4), atol=0.0045)  # ~5 standard errors of a variance
