"""Pictures of what a method found (eval/images.py): the ops behind them, the TensorBoard tags and
PNG files of InspectionImages on tiny models, methods without a decoder, and `protos inspect`."""

import math
import warnings

import lightning as L
import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import ROOT, make_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from scipy.spatial.distance import cdist
from sklearn.decomposition import PCA
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import QUIET, run_main

from lightning_protos.data import ArrayFile, Digits
from lightning_protos.eval.images import (
    InspectionImages,
    Pictures,
    as_images,
    eval_sample,
    image_grid,
    latent_map,
    picture_title,
    similarities,
    square,
)
from lightning_protos.methods.aecm import AECM
from lightning_protos.methods.cm import CM
from lightning_protos.ops import nearest

PICTURES = ("prototypes", "reconstructions", "samples", "interpolations", "nearest")
TINY_AECM = {"n_clusters": 5, "input_shape": (64,), "hidden": (16,), "latent_dim": 3, "pretrain_epochs": 1}


def tiny_aecm(**kwargs) -> AECM:
    L.seed_everything(0, verbose=False)
    return AECM(**{**TINY_AECM, "pretrain_cache": False, **kwargs})


class NoDecoder(AECM):
    """AE-CM with its decoder dropped from the contract (as DEC after pretraining)."""

    def decode(self, z):
        return None


class InputSpacePrototypes(AECM):
    """AE-CM breaking the contract: prototypes in the input space (64-d), latents 3-d."""

    def prototypes(self):
        return torch.zeros(self.n_clusters, self.input_dim)


def digits(**kwargs) -> Digits:
    return Digits(**{"batch_size": 256, "flatten": True, **kwargs})


def pictures(**kwargs) -> InspectionImages:
    """Small pictures with the fast PCA map."""
    return InspectionImages(**{"n_points": 300, "latent_map": "pca", "projector_points": 50, **kwargs})


# -- the pure helpers -------------------------------------------------------------------
def test_nearest_matches_scipy_distances():
    g = torch.Generator().manual_seed(0)
    points, queries = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g)
    got = nearest(queries.double(), points, 5)
    want = np.argsort(cdist(queries.double().numpy(), points.numpy()), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got.numpy(), want)
    assert nearest(queries.double(), points[:2], 5).shape == (3, 2)  # fewer points than asked
    # only the allowed points, nearest first, then -1 where a query allows fewer than asked
    allowed = torch.rand(3, 50, generator=g) < 0.1
    got = nearest(queries.double(), points, 8, allowed=allowed)
    for k in range(3):
        d = cdist(queries[k : k + 1].double().numpy(), points.numpy())[0]
        ok = np.flatnonzero(allowed[k].numpy())
        want = ok[np.argsort(d[ok], kind="stable")][:8]
        np.testing.assert_array_equal(got[k, : len(want)].numpy(), want)
        assert (got[k, len(want) :] == -1).all()


def test_pca_map_is_sklearns_and_places_prototypes_among_the_points():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((40, 5))
    protos = z[[3, 7]].copy()  # prototypes on two data points land on them
    coords, proto_coords = latent_map(z, protos, "pca")
    np.testing.assert_allclose(proto_coords, coords[[3, 7]], atol=1e-10)
    want = PCA(n_components=2, random_state=0).fit_transform(np.concatenate([z, protos]))
    np.testing.assert_allclose(np.abs(coords), np.abs(want[:40]), atol=1e-10)  # up to the sign of each axis


def test_tsne_map_shapes_and_low_dimensional_latents_drawn_as_they_are():
    z = np.random.default_rng(0).standard_normal((60, 3))
    coords, proto_coords = latent_map(z, z[:4], "tsne")
    assert coords.shape == (60, 2)
    assert proto_coords.shape == (4, 2)
    assert np.isfinite(coords).all()
    flat, none = latent_map(z[:, :1], None, "tsne")
    np.testing.assert_array_equal(flat, np.pad(z[:, :1], ((0, 0), (0, 1))))
    assert none is None
    with pytest.raises(ValueError, match="tsne"):
        latent_map(z, None, "umap")


def test_pictures_of_one_channel_hw_arrays_portrait_thumbnails_and_a_collapsed_encoder(tmp_path):
    x = np.zeros((6, 16, 8), dtype=np.uint8)  # (N, H, W) grayscale, portrait, as users store them
    np.savez(tmp_path / "xrays.npz", X=x)
    dm = ArrayFile(str(tmp_path / "xrays.npz"))
    assert dm.image_shape == (1, 16, 8)
    assert as_images(torch.zeros(2, 16, 8), dm.image_shape).shape == (2, 1, 16, 8)
    assert square(torch.ones(2, 1, 16, 8)).shape == (2, 1, 16, 16)  # the projector's sprite tiles squares
    assert square(torch.ones(2, 3, 8, 8)).shape == (2, 3, 8, 8)
    same = np.ones((40, 5))  # every latent one point: t-SNE would crash the process, PCA divide by 0
    for how in ("tsne", "pca"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            coords, protos = latent_map(same, same[:2], how)
        assert (coords == 0).all()
        assert (protos == 0).all()
        assert coords.shape == (40, 2)
        assert protos.shape == (2, 2)


def test_nearest_images_rank_by_the_methods_similarity_else_by_distance():
    x = digits().features("eval")[:10]
    assert similarities(tiny_aecm().eval(), x, batch_size=4) is None  # no similarity: by distance
    images = torch.arange(6.0).div(10).reshape(6, 1, 1, 1).expand(6, 1, 2, 2)  # image i is all i / 10
    z = torch.arange(6.0).reshape(6, 1)  # Euclidean: image 0, then 1, nearest to prototype 0
    protos = torch.tensor([[0.0], [5.0]])
    sims = torch.tensor([[0.1, 0], [0.5, 0], [0.2, 0], [0.9, 0], [0.3, 0], [0.0, 1]])  # prototype 0: 3, then 1
    clusters = torch.tensor([0, 0, 0, 0, 0, 1])  # prototype 0 first: it has most images

    def top_row(sims, clusters=clusters, row=0, n=2):
        out = Pictures()
        pictures(n_nearest=n)._draw(out, images, z, clusters, protos, None, lambda t: None, sims)
        grid = out.grids["nearest"]  # tiles of 2 + 2 pixels of padding
        return [round(float(grid[0, 2 + 4 * row, 2 + 4 * c]) * 10) for c in range(n)], out.rows

    assert top_row(sims) == ([3, 1], [0, 1])
    assert top_row(None) == ([0, 1], [0, 1])
    # by distance among the images the method assigns to the prototype: image 0, the closest to
    # prototype 0, is assigned to prototype 1 (as a dot product or a posterior may); prototype
    # 1 has two images, its third tile is white (10 / 10)
    elsewhere = torch.tensor([1, 0, 0, 0, 0, 1])
    assert top_row(None, elsewhere) == ([1, 2], [0, 1])
    assert top_row(None, elsewhere, row=1, n=3) == ([5, 0, 10], [0, 1])


def test_the_title_counts_the_prototypes():
    model = CM(n_clusters=5, input_shape=(4,))
    assert picture_title(model, "pca") == "CM, K=5, pca"
    model.prototypes = lambda: torch.zeros(3, 5)  # as VAE+KMeans after its elbow chose K = 3 of up to 5
    assert picture_title(model, "tsne") == "CM, K=3, tsne"


def test_as_images_unflattens_decoder_outputs_and_rejects_vectors():
    x = torch.linspace(-1, 2, 2 * 64).reshape(2, 64)
    images = as_images(x, (1, 8, 8))
    assert images.shape == (2, 1, 8, 8)
    assert images.min() == 0  # clamped to [0, 1]
    assert images.max() == 1
    assert as_images(x, None) is None  # tabular data: no images
    assert as_images(None, (1, 8, 8)) is None
    assert image_grid(images, 2).shape == (3, 12, 22)  # 1 row, 2 columns of (8 + 2) + 2
    torch.testing.assert_close(as_images(x, (1, 8, 8), (-1.0, 2.0)).flatten(), (x.flatten() + 1) / 3)


# -- the callback ----------------------------------------------------------------------
def event_tags(folder) -> dict[str, int]:
    """Image tags in the TensorBoard event files of ``folder`` and how many steps each has."""
    acc = EventAccumulator(str(folder), size_guidance={"images": 0})
    acc.Reload()
    return {tag: len(acc.Images(tag)) for tag in acc.Tags()["images"]}


def test_callback_logs_every_picture_each_n_epochs_and_at_test_end(tmp_path):
    model, dm = tiny_aecm(), digits()
    logger = TensorBoardLogger(tmp_path, name="", version="run")
    callback = pictures(every_n_epochs=2)
    trainer = make_trainer(max_epochs=4, logger=logger, callbacks=[callback])
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    logger.experiment.flush()
    tags = event_tags(tmp_path / "run")
    for stage, steps in (("fit", 2), ("test", 1)):  # epochs 2 and 4, then the test
        for name in (*PICTURES, "latent_map"):
            assert tags.get(f"{stage}/{name}") == steps, (stage, name, tags)
    projector = (tmp_path / "run" / "projector_config.pbtxt").read_text()
    assert "fit_latent" in projector
    assert "test_latent" in projector
    assert "sprite" in projector  # the images as thumbnails
    assert not callback.written  # no PNG unless asked


def test_pngs_have_the_expected_size(tmp_path):
    model, dm = tiny_aecm(), digits()
    callback = pictures(every_n_epochs=0, save_png=True, n_nearest=4, n_samples=3, steps=5, max_rows=4)
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    folder = tmp_path / "inspect"
    assert sorted(p.name for p in callback.written) == sorted(
        [*(f"{n}.png" for n in (*PICTURES, "latent_map")), "rows.txt"]
    )
    # the rows are the 4 prototypes with most images of the sample, most first
    listed = (folder / "rows.txt").read_text().split("prototypes ")[1].split(" (")[0]
    rows = [int(k) for k in listed.split(", ")]
    with torch.no_grad():
        sample = eval_sample(dm, 300, callback.seed)["x"]
        counts = torch.bincount(model.eval().predict_clusters(sample), minlength=5)
    assert len(rows) == 4
    assert counts[rows].tolist() == sorted(counts.tolist(), reverse=True)[:4]
    s = math.ceil(56 / 8)  # 8x8 digits, each pixel repeated 7 times
    tile = 8 + 2
    want = {  # (rows, columns) of tiles
        "prototypes": (2, 3),  # K = 5 in rows of ceil(sqrt(5)) = 3
        "reconstructions": (2, 10),  # inputs above their reconstructions
        "samples": (4, 1 + 3),  # max_rows rows: the prototype, then its samples
        "interpolations": (3, 5),
        "nearest": (4, 1 + 4),  # the decoded prototype, then its nearest images
    }
    for name, (rows, cols) in want.items():
        assert matplotlib.image.imread(folder / f"{name}.png").shape[:2] == (
            (rows * tile + 2) * s,
            (cols * tile + 2) * s,
        )
    assert matplotlib.image.imread(folder / "latent_map.png").shape[:2] == (550, 1100)  # label and cluster panels


class NoisyAECM(AECM):
    """Tiny AE-CM whose steps draw from the global random stream (input noise), so that pictures
    drawing from it would change what the run trains."""

    def clustering_step(self, batch, batch_idx):
        super().clustering_step({**batch, "x": batch["x"] + 0.01 * torch.randn_like(batch["x"])}, batch_idx)


def test_pictures_leave_training_unchanged(tmp_path):
    def trained(callbacks, logger=False):
        L.seed_everything(0, verbose=False)
        model = NoisyAECM(**TINY_AECM, pretrain_cache=False)
        make_trainer(max_epochs=3, callbacks=callbacks, logger=logger, default_root_dir=tmp_path).fit(model, digits())
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    seen = []  # (global random state, training mode) just before and just after the pictures' hook
    state = L.pytorch.callbacks.LambdaCallback(
        on_train_epoch_end=lambda trainer, module: seen.append((torch.get_rng_state(), module.training))
    )
    drawn = InspectionImages(every_n_epochs=1, n_points=200, latent_map="pca")
    with_pictures = trained([state, drawn, state], logger=TensorBoardLogger(tmp_path, name="tb"))
    tags = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")))).Reload().Tags()
    assert "fit/prototypes" in tags["images"]  # the pictures were drawn
    assert len(seen) == 6
    for (state_before, _), (state_after, training) in zip(seen[::2], seen[1::2], strict=True):
        assert torch.equal(state_before, state_after)
        assert training
    assert torch.equal(trained([]), with_pictures)


@pytest.mark.parametrize(
    ("method", "want", "note"),
    [
        (lambda: NoDecoder(**TINY_AECM, pretrain_cache=False), {"nearest"}, "decode is None"),
        (lambda: InputSpacePrototypes(**TINY_AECM, pretrain_cache=False), {"reconstructions"}, "64-d, embed 3-d"),
    ],
    ids=["no-decoder", "input-space-prototypes"],
)
def test_methods_without_a_decoder_or_latent_prototypes_skip_those_pictures(method, want, note):
    dm = digits()
    dm.setup()
    out = pictures().pictures(method().eval(), dm)
    assert set(out.grids) == want
    assert any(note in n for n in out.notes), out.notes
    assert out.coords.shape == (300, 2)  # the latent map is always drawn
    if "nearest" in want:  # real images only: K rows of n_nearest
        assert out.grids["nearest"].shape[1:] == (5 * 10 + 2, 8 * 10 + 2)


def test_cm_draws_every_picture_with_its_centroids_as_the_prototypes():
    """CM's latent is the assignment: its prototypes, the one-hot vertices, decode to the centroids."""
    dm = digits()
    dm.setup()
    model = CM(n_clusters=5, input_shape=(64,))
    centres = dm.features("fit")[:5]
    model.cm.init_from_centres(centres)  # five digits as the centroids
    out = pictures().pictures(model.eval(), dm)
    assert set(out.grids) == set(PICTURES), out.notes
    want = image_grid(as_images(centres, dm.image_shape), 3)  # K = 5 in rows of 3
    torch.testing.assert_close(out.grids["prototypes"], want, atol=1e-5, rtol=0)
    assert out.prototype_coords.shape == (5, 2)  # the vertices marked on the latent map


def test_standardised_images_are_drawn_in_their_own_range(tmp_path):
    """A user's images in [-2, 2] (standardised): pictures map the data's range onto [0, 1]
    instead of clipping every value outside it to black or white."""
    x = digits().features("fit")[:300].reshape(-1, 8, 8) * 4 - 2  # digits span [0, 1]
    np.savez(tmp_path / "standard.npz", X=x.numpy())
    dm = ArrayFile(str(tmp_path / "standard.npz"))
    dm.setup()
    assert dm.value_range() == (-2.0, 2.0)
    model = CM(n_clusters=5, input_shape=(1, 8, 8))
    centres = dm.features("fit")[:5].reshape(5, -1)
    model.cm.init_from_centres(centres)
    out = pictures(n_images=4).pictures(model.eval(), dm)  # all 300 images, in index order
    want = image_grid((centres.reshape(5, 1, 8, 8) + 2) / 4, 3)
    torch.testing.assert_close(out.grids["prototypes"], want, atol=1e-5, rtol=0)
    inputs = image_grid((x[:4, None] + 2) / 4, 4)[:, :10]  # the top row: padding and the inputs
    torch.testing.assert_close(out.grids["reconstructions"][:, :10], inputs, atol=1e-5, rtol=0)


def test_tabular_data_gets_the_map_but_no_images():
    from lightning_protos.data import Blobs

    dm = Blobs(n_samples=200, n_features=4, centers=3)
    dm.setup()
    model = AECM(n_clusters=3, input_shape=(4,), hidden=(8,), latent_dim=2, pretrain_epochs=1, pretrain_cache=False)
    out = pictures(n_points=100).pictures(model.eval(), dm)
    assert out.grids == {}
    assert out.thumbnails is None
    assert "the inputs are not images: no image pictures" in out.notes
    assert out.coords.shape == (100, 2)
    assert out.prototype_coords.shape == (3, 2)


# -- protos inspect --------------------------------------------------------------------
def test_protos_inspect_round_trip_on_digits(tmp_path, capsys):
    config = [
        "--config", str(ROOT / "configs" / "cm_digits.yaml"), "--trainer.default_root_dir", str(tmp_path), *QUIET,
        "--model", "lightning_protos.methods.aecm.AECM", "--model.init_args.hidden", "[16]",
        "--model.init_args.latent_dim", "3", "--model.init_args.pretrain_epochs", "1",
        "--model.init_args.pretrain_cache", "false",
    ]  # fmt: skip
    code, _, err = run_main(["fit", *config, "--trainer.max_epochs", "2", "--final_test", "false"], capsys)
    assert code == 0, err
    ckpt = str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    code, out, err = run_main(["inspect", *config, "--ckpt_path", ckpt], capsys)
    assert code == 0, err
    folder = tmp_path / "lightning_logs" / "version_1" / "inspect"
    assert f"pictures written to {folder}" in out
    for name in (*PICTURES, "latent_map"):
        assert (folder / f"{name}.png").stat().st_size > 0, name
    assert (tmp_path / "lightning_logs" / "version_1" / "metrics.json").is_file()  # the test ran too

    code, _, err = run_main(["inspect", *config], capsys)
    assert code == 1
    assert "inspect needs --ckpt_path" in err
    code, out, _ = run_main(["inspect", "--help"], capsys)  # its options (test's), not that error
    assert code == 0
    assert "protos inspect: a `protos test` of --ckpt_path" in out
    assert "--ckpt_path CKPT_PATH" in out
