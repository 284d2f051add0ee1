"""Pictures of what a method found, read through its contract only (``embed``,
``predict_clusters``, ``prototypes``, ``decode``, the optional ``similarities`` that ranks each
prototype's nearest images, and ``prepare_evaluation`` before drawing): decoded prototypes,
reconstructions, samples around each prototype, interpolations between prototypes, each
prototype's nearest real images, a 2-D map of the latent and TensorBoard's embedding projector
(VAESim Figs. 3-6, ProtoVAE Figs. 2-5, AE-CM Sec. 5.3.6).

Functions first (tensors in, pictures out), then :class:`InspectionImages`, the callback that
logs them to TensorBoard during ``fit`` and at test end and, on request (``protos inspect``),
writes them as PNG files.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import matplotlib.image
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.utils import make_grid

from ..errors import check_choices, check_non_negative, check_positive
from ..ops import around, interpolate, nearest
from .callbacks import run_dir
from .probes import embed_and_assign


def as_images(
    x: Tensor | None, image_shape: tuple[int, ...] | None, value_range: tuple[float, float] = (0.0, 1.0)
) -> Tensor | None:
    """``(B, C, H, W)`` float images in [0, 1] on the CPU from ``(B, C, H, W)`` or flattened
    ``(B, C*H*W)`` inputs / decoder outputs whose values span ``value_range`` (the data's: a
    user's standardised images are drawn in their own range, not clipped to [0, 1]); ``None``
    for ``None`` or non-image data."""
    if x is None:
        return None
    if x.ndim in (2, 3) and image_shape is not None and math.prod(x.shape[1:]) == math.prod(image_shape):
        x = x.reshape(len(x), *image_shape)  # flattened, or one-channel (H, W) samples
    if x.ndim != 4:
        return None
    low, high = value_range
    return ((x.detach().float().cpu() - low) / max(high - low, 1e-12)).clamp(0, 1)


@torch.no_grad()
def similarities(pl_module, x: Tensor, batch_size: int) -> Tensor | None:
    """``(N, K)`` ``similarities`` of the inputs ``x`` to the prototypes, in batches, on the CPU
    (VAESim's, written as ``sim_k`` by ``predict``); ``None`` for methods that have none."""
    parts = [pl_module.similarities(x[i : i + batch_size].to(pl_module.device)) for i in range(0, len(x), batch_size)]
    return None if not parts or parts[0] is None else torch.cat([p.float().cpu() for p in parts])


def picture_title(pl_module, latent_map: str) -> str:
    """The method, its number of prototypes (VAE+KMeans' ``n_clusters`` is the largest K its
    elbow tries, not the K it chose) and the map's projection."""
    protos = pl_module.prototypes()
    k = pl_module.n_clusters if protos is None else len(protos)
    return f"{type(pl_module).__name__}, K={k}, {latent_map}"


def rows_note(rows: list[int]) -> str:
    """Which prototype each row of the per-prototype pictures shows."""
    listed = ", ".join(map(str, rows))
    return (
        f"rows of nearest and samples, top to bottom: prototypes {listed} (interpolation row i joins rows i and i + 1)"
    )


def image_grid(images: Tensor, nrow: int) -> Tensor:
    """``(3, H', W')`` grid of ``images`` ``(B, C, H, W)``, ``nrow`` images a row, white padding
    of 2 pixels: ``H' = rows * (H + 2) + 2``, ``W' = min(nrow, B) * (W + 2) + 2``."""
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def latent_map(
    z: np.ndarray, prototypes: np.ndarray | None, how: str = "tsne", seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """2-D coordinates of the latents ``z`` ``(N, p)`` and of the ``prototypes`` ``(K, p)``,
    fitted together so that the prototypes sit among the points: t-SNE (scikit-learn,
    Barnes-Hut, PCA initialisation, 500 iterations, perplexity min(30, (N + K - 1) / 3)) or PCA.
    Latents of one or two dimensions are drawn as they are.

    Returns:
        ``(N, 2)`` and ``(K, 2)`` (``None`` without prototypes) float arrays.
    """
    if how not in ("tsne", "pca"):
        raise ValueError(f"latent_map must be 'tsne' or 'pca', got {how!r}")
    both = z if prototypes is None else np.concatenate([z, prototypes])
    both = both.astype(np.float64)
    if both.shape[1] <= 2:
        coords = np.pad(both, ((0, 0), (0, 2 - both.shape[1])))
    elif np.ptp(both, axis=0).max() == 0:  # all one point (a collapsed encoder): drawn at the
        coords = np.zeros((len(both), 2))  # origin; t-SNE crashes the process, PCA divides by 0
    elif how == "pca":
        from sklearn.decomposition import PCA

        coords = PCA(n_components=2, random_state=seed).fit_transform(both)
    else:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(both) - 1) / 3)
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed).fit_transform(
            both
        )
    return coords[: len(z)], (None if prototypes is None else coords[len(z) :])


def square(images: Tensor | None) -> Tensor | None:
    """``(N, C, H, W)`` images padded with black to square: TensorBoard's projector tiles its
    sprite as if they were (portrait ones overflow it)."""
    if images is None or images.shape[2] == images.shape[3]:
        return images
    h, w = images.shape[2:]
    return torch.nn.functional.pad(images, (0, max(0, h - w), 0, max(0, w - h)))


def latent_map_figure(
    coords: np.ndarray,
    clusters: np.ndarray,
    labels: np.ndarray | None = None,
    prototype_coords: np.ndarray | None = None,
    title: str = "",
) -> Figure:
    """Scatter of the 2-D ``coords`` ``(N, 2)``, one panel coloured by true label (when given)
    and one by cluster, the prototypes ``(K, 2)`` marked by black crosses with their index.
    Each panel is 5.5 x 5.5 inches at 100 dpi: a ``(550, 550 * panels)`` pixel PNG."""
    panels = ([("true label", labels)] if labels is not None else []) + [("cluster", clusters)]
    fig = Figure(figsize=(5.5 * len(panels), 5.5), dpi=100, layout="constrained")
    for ax, (name, colour) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        n_colours = int(colour.max()) + 1
        # one distinct colour per value: value k takes the k-th colour of tab10 / tab20
        cmap, top = (
            ("tab10", 9) if n_colours <= 10 else ("tab20", 19) if n_colours <= 20 else ("nipy_spectral", n_colours)
        )
        points = ax.scatter(coords[:, 0], coords[:, 1], c=colour, cmap=cmap, vmin=0, vmax=top, s=4, lw=0)
        if n_colours <= 10:
            ax.legend(*points.legend_elements(), loc="best", fontsize=7, markerscale=0.8, title=name)
        if prototype_coords is not None:
            ax.scatter(*prototype_coords.T, marker="X", s=70, c="black", edgecolors="white", linewidths=0.8)
            for k, (u, v) in enumerate(prototype_coords):
                ax.annotate(str(k), (u, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xticks=[], yticks=[], title=f"coloured by {name}")
    fig.suptitle(title)
    return fig


def save_grid_png(grid: Tensor, path: Path, tile: int, min_tile: int = 56) -> tuple[int, int]:
    """Writes the ``(3, H', W')`` ``grid`` of ``tile``-pixel images as a PNG, each pixel repeated
    ``s = ceil(min_tile / tile)`` times along both axes (crisp digits); returns its
    ``(height, width) = (s H', s W')``."""
    s = max(1, math.ceil(min_tile / tile))
    array = grid.permute(1, 2, 0).numpy().repeat(s, axis=0).repeat(s, axis=1)
    matplotlib.image.imsave(path, array)
    return array.shape[:2]


def eval_sample(datamodule, n: int, seed: int = 0) -> dict[str, Tensor]:
    """``n`` evaluation samples drawn without replacement by a generator seeded with ``seed``
    (the same ones at every call; the global random stream is untouched), in index order, as one
    batch ``{"x", "y" (if labelled), ...}`` from the data set of the test loader."""
    dataset = datamodule.test_dataloader().dataset
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[:n].sort().values.tolist()
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(index)
    return default_collate([dataset[i] for i in index])


@dataclass
class Pictures:
    """What :meth:`InspectionImages.pictures` draws: image grids by name (``(3, H', W')``), the
    side of their tiles, the 2-D latent map and the projector's sample."""

    grids: dict[str, Tensor] = field(default_factory=dict)
    tile: int = 0
    coords: np.ndarray | None = None
    prototype_coords: np.ndarray | None = None
    clusters: np.ndarray | None = None
    labels: np.ndarray | None = None
    embedding: Tensor | None = None
    thumbnails: Tensor | None = None
    rows: list[int] = field(default_factory=list)  # the prototype of each row, top to bottom
    notes: list[str] = field(default_factory=list)


class InspectionImages(L.Callback):
    """Pictures of what a method found, from a fixed random sample of the evaluation split.

    Logged to TensorBoard as ``{stage}/{name}`` every ``every_n_epochs`` training epochs
    (stage ``fit``) and at test end (stage ``test``); with ``save_png`` (``protos inspect``) also
    written at test end as ``RUN/inspect/{name}.png``. The pictures:

    * ``prototypes``: ``decode(prototypes())``, all K in index order.
    * ``reconstructions``: ``n_images`` inputs (top row) above ``decode(embed(x))`` (bottom row).
    * ``samples``: per row, a decoded prototype then ``n_samples`` decodings of
      N(prototype, (noise * sigma)^2 I), sigma the mean per-dimension standard deviation of the
      sample's latents (the latent scale differs between methods).
    * ``interpolations``: per row, ``steps`` decodings on the segment between two prototypes.
    * ``nearest``: per row, a decoded prototype (when there is a decoder) then the
      ``n_nearest`` sample images most similar to it by the method's ``similarities`` (VAESim's
      ``sim_k``, as ``prototype_neighbours.csv``), else closest in the latent space (Euclidean).
      The prototype of each row is logged as text (``{stage}/rows``) and, with PNGs, in ``rows.txt``.
    * ``latent_map``: the 2-D map of :func:`latent_map`, coloured by true label and by cluster,
      prototypes marked. t-SNE by default: on ``n_points`` (2,000) points it takes seconds,
      whereas MNIST's 70,000 would take many minutes, hence the subsample (t-SNE shows the
      clusters that a linear PCA map, the fast alternative, overlaps).
    * the embedding projector: ``projector_points`` latents with label / cluster metadata and
      the images as thumbnails (``add_embedding``, tag ``{stage}_latent``).

    The per-prototype rows show the ``max_rows`` prototypes with most sample points assigned,
    most populated first; interpolations join consecutive ones. Methods whose ``prototypes`` or
    ``decode`` is ``None``, and non-image data, skip the pictures that need them with one
    logged note. The sample, noise and t-SNE are seeded by ``seed`` with their own generators,
    so the callback leaves training's random stream unchanged.

    Args:
        every_n_epochs: training epochs between two loggings (0: only at test end).
        n_points: size of the evaluation sample (latent map, nearest images).
        n_images: reconstructions shown.
        n_samples: samples per prototype.
        noise: noise scale relative to the latent's spread (see ``samples``).
        steps: images per interpolation.
        n_nearest: nearest real images per prototype (by ``similarities`` where the method has
            them, else the closest among the images it assigns to the prototype).
        max_rows: prototypes given a row in ``samples``, ``interpolations`` (rows - 1) and ``nearest``.
        latent_map: ``tsne`` or ``pca``.
        projector_points: points given to the embedding projector (0: none).
        save_png: write the PNG files at test end.
        seed: seed of the sample, the noise and the map.
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        n_points: int = 2000,
        n_images: int = 10,
        n_samples: int = 8,
        noise: float = 0.5,
        steps: int = 8,
        n_nearest: int = 8,
        max_rows: int = 16,
        latent_map: str = "tsne",
        projector_points: int = 500,
        save_png: bool = False,
        seed: int = 0,
    ) -> None:
        sizes = dict(n_points=n_points, n_images=n_images, n_samples=n_samples, steps=steps, n_nearest=n_nearest)
        check_positive(**sizes, max_rows=max_rows)
        check_non_negative(every_n_epochs=every_n_epochs, noise=noise)
        check_choices(latent_map=(latent_map, ("tsne", "pca")))
        self.every_n_epochs, self.n_points, self.n_images = every_n_epochs, n_points, n_images
        self.n_samples, self.noise, self.steps, self.n_nearest = n_samples, noise, steps, n_nearest
        self.max_rows, self.latent_map, self.projector_points = max_rows, latent_map, projector_points
        self.save_png, self.seed = save_png, seed
        self._noted: set[str] = set()
        self.written: list[Path] = []

    # -- drawing ----------------------------------------------------------------------
    @torch.no_grad()
    def pictures(self, pl_module, datamodule) -> Pictures:
        """All pictures of ``pl_module`` on a sample of ``datamodule``'s evaluation split."""
        out = Pictures()
        batch = eval_sample(datamodule, self.n_points, self.seed)
        x, y = batch["x"], batch.get("y")
        image_shape = getattr(datamodule, "image_shape", None)
        values = datamodule.value_range() if hasattr(datamodule, "value_range") else (0.0, 1.0)
        images = as_images(x, image_shape, values)
        z, clusters = embed_and_assign(pl_module, x, getattr(datamodule, "eval_batch_size", 1024))
        protos = pl_module.prototypes()
        if protos is None:
            out.notes.append("prototypes is None: no prototype pictures")
        elif protos.shape[1] != z.shape[1]:  # a method whose prototypes are not in its embedding space
            out.notes.append(f"prototypes are {protos.shape[1]}-d, embed {z.shape[1]}-d: no prototype pictures")
            protos = None
        protos = None if protos is None else protos.to(z)

        def decode(latents: Tensor) -> Tensor | None:
            return as_images(pl_module.decode(latents.to(z)), image_shape, values)

        decoded_protos = None if protos is None else decode(protos)
        if images is None:
            out.notes.append("the inputs are not images: no image pictures")
        elif decode(z[:1]) is None:
            out.notes.append("decode is None (no decoder): no decoded pictures")
        if images is not None:
            out.tile = images.shape[-1]
            batch_size = getattr(datamodule, "eval_batch_size", 1024)
            sims = None if protos is None else similarities(pl_module, x, batch_size)
            self._draw(out, images, z, clusters, protos, decoded_protos, decode, sims)
        out.coords, out.prototype_coords = latent_map(
            z.cpu().numpy(), None if protos is None else protos.cpu().numpy(), self.latent_map, self.seed
        )
        out.clusters = clusters.numpy()
        out.labels = None if y is None else y.cpu().numpy()
        m = min(self.projector_points, len(z))
        out.embedding = z[:m].cpu()
        out.thumbnails = None if images is None else images[:m]
        return out

    def _draw(self, out: Pictures, images, z, clusters, protos, decoded_protos, decode, sims=None) -> None:
        """Fills ``out.grids`` with the image pictures the method allows; the nearest images of
        a prototype are the most similar by the method's ``sims`` ``(N, K)`` where it has them
        (as ``prototype_neighbours.csv`` ranks them), else, among the images the method assigns
        to the prototype, the closest in Euclidean distance (white tiles where fewer are)."""
        recon = decode(z[: self.n_images])
        if recon is not None:
            out.grids["reconstructions"] = image_grid(torch.cat([images[: len(recon)], recon]), len(recon))
        if protos is None:
            return
        rows = torch.bincount(clusters, minlength=len(protos)).argsort(descending=True, stable=True)
        rows = out.rows = rows[: self.max_rows].tolist()
        if sims is not None:
            near = sims[:, rows].topk(min(self.n_nearest, len(sims)), dim=0).indices.T.cpu()
        else:  # the assignment need not follow the distance (ProtoVAE's dot product, VaDE's posterior)
            members = clusters.to(z.device)[None, :] == torch.tensor(rows, device=z.device)[:, None]
            near = nearest(protos[rows], z, self.n_nearest, allowed=members).cpu()
        tiles = images[near].masked_fill((near < 0)[..., None, None, None], 1.0)  # (R, n, C, H, W)
        heads = [decoded_protos[k : k + 1] if decoded_protos is not None else images[:0] for k in rows]
        out.grids["nearest"] = image_grid(
            torch.cat([torch.cat([h, t]) for h, t in zip(heads, tiles, strict=True)]),
            len(heads[0]) + near.shape[1],
        )
        if decoded_protos is None:
            return
        out.grids["prototypes"] = image_grid(decoded_protos, math.ceil(math.sqrt(len(decoded_protos))))
        generator = torch.Generator().manual_seed(self.seed)
        scale = self.noise * float(z.std(dim=0).mean()) if len(z) > 1 else self.noise
        noisy = [around(protos[k].cpu(), self.n_samples, scale, generator) for k in rows]
        samples = decode(torch.cat(noisy)).reshape(len(rows), self.n_samples, *decoded_protos.shape[1:])
        out.grids["samples"] = image_grid(
            torch.cat([torch.cat([decoded_protos[k : k + 1], s]) for k, s in zip(rows, samples, strict=True)]),
            self.n_samples + 1,
        )
        if len(rows) > 1:
            walks = [interpolate(protos[a], protos[b], self.steps) for a, b in itertools.pairwise(rows)]
            out.grids["interpolations"] = image_grid(decode(torch.cat(walks)), self.steps)

    # -- output -----------------------------------------------------------------------
    def map_figure(self, pictures: Pictures, title: str) -> Figure:
        return latent_map_figure(pictures.coords, pictures.clusters, pictures.labels, pictures.prototype_coords, title)

    def write_tensorboard(self, writer, pictures: Pictures, stage: str, step: int, title: str) -> None:
        """Logs ``pictures`` to a TensorBoard ``SummaryWriter``."""
        for name, grid in pictures.grids.items():
            writer.add_image(f"{stage}/{name}", grid, global_step=step)
        writer.add_figure(f"{stage}/latent_map", self.map_figure(pictures, title), global_step=step)
        if pictures.rows:
            writer.add_text(f"{stage}/rows", rows_note(pictures.rows), global_step=step)
        if self.projector_points and pictures.embedding is not None:
            if pictures.labels is not None:
                m = len(pictures.embedding)
                metadata = list(zip(pictures.labels[:m].tolist(), pictures.clusters[:m].tolist(), strict=True))
                header = ["label", "cluster"]
            else:
                metadata, header = pictures.clusters[: len(pictures.embedding)].tolist(), None
            writer.add_embedding(
                pictures.embedding,
                metadata=metadata,
                metadata_header=header,
                label_img=square(pictures.thumbnails),
                global_step=step,
                tag=f"{stage}_latent",
            )

    def save_pngs(self, pictures: Pictures, folder: Path, title: str) -> list[Path]:
        """Writes ``{name}.png`` for every picture into ``folder``; returns the paths."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, grid in pictures.grids.items():
            save_grid_png(grid, folder / f"{name}.png", pictures.tile)
            paths.append(folder / f"{name}.png")
        self.map_figure(pictures, title).savefig(folder / "latent_map.png")
        paths.append(folder / "latent_map.png")
        if pictures.rows:
            (folder / "rows.txt").write_text(rows_note(pictures.rows) + "\n")
            paths.append(folder / "rows.txt")
        return paths

    def _run(self, stage: str, trainer: L.Trainer, pl_module) -> None:
        if stage == "fit":
            pl_module.prepare_evaluation()  # every rank: collectives (BatchNorm means, VAE+KMeans' k-means)
        writers = [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_embedding")]
        png = self.save_png and stage == "test"
        dm = getattr(trainer, "datamodule", None)
        if not trainer.is_global_zero or dm is None or not (writers or png):
            return
        with pl_module.evaluating():
            pictures = self.pictures(pl_module, dm)
        for note in pictures.notes:
            if note not in self._noted:
                rank_zero_info(f"InspectionImages ({type(pl_module).__name__}): {note}")
                self._noted.add(note)
        title = picture_title(pl_module, self.latent_map)
        if stage == "fit":  # a test from a checkpoint does not know the epoch
            title += f", after {trainer.current_epoch + 1} epochs"
        for writer in writers:
            # at the step Lightning logs the stage's scalars at, counted in batches trained (a
            # training epoch's at its last batch, one before): global_step counts optimizer
            # steps, three a batch in ProtoVAE, and drew its pictures ever further right of its curves
            step = trainer.fit_loop.epoch_loop._batches_that_stepped - (stage == "fit")
            self.write_tensorboard(writer, pictures, stage, step, title)
        if png:
            self.written = self.save_pngs(pictures, run_dir(trainer) / "inspect", title)
            print(f"pictures written to {run_dir(trainer) / 'inspect'}: {', '.join(p.name for p in self.written)}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run("fit", trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._run("test", trainer, pl_module)
