"""The deep autoencoder that AE-CM, DEC, IDEC, DCN and DKM are built on, and the phases they share.

Every such method is an :class:`AutoencoderMethod`. Its phases run by epoch inside one ``fit``
(so a checkpoint resumes in the right phase):

1. ``init: pretrained`` only: ``pretrain_epochs`` of the DAE alone on reconstruction
   (:func:`reconstruction_loss`). The result is cached (:class:`PretrainCache`) by
   architecture, data, seed and schedule, so that a benchmark of several methods pretrains
   once per seed; a run that finds its entry loads it and skips these epochs.
2. once, at the first clustering epoch: :meth:`AutoencoderMethod.init_from_codes` with the codes
   of the whole training set, e.g. k-means on the pretrained codes (``init: pretrained``) or on
   the codes of the random network (``init: random``: DEC, IDEC, DCN, DKM^r; AE-CM^r starts
   from its random clustering module instead and skips this step).
3. the method's own :meth:`AutoencoderMethod.clustering_step` until the end.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from ..errors import check_choices, check_non_negative, check_positive, check_widths
from ..nets import MLPAutoencoder
from ..nets.mlp import BiasInit
from ..ops import kmeans_centres
from .base import ClusteringMethod, adam
from .distributed import broadcast_from_rank0, on_rank0


def reconstruction_loss(x: Tensor, x_rec: Tensor) -> Tensor:
    """Per-sample MSE (mean over features) summed over the batch, as in the AE-CM code (RC 4)."""
    return (x - x_rec).pow(2).mean(dim=1).sum()


def pretrain_step(method: ClusteringMethod, autoencoder: nn.Module, x: Tensor, optimizer) -> Tensor:
    """One DAE pretraining update on ``x`` ``(B, d)``; logged as ``pretrain/L_rec``."""
    _, x_rec = autoencoder(x)
    loss = method.check_and_log({"L_rec": reconstruction_loss(x, x_rec)}, prefix="pretrain")
    method.optimize(loss, optimizer)
    return loss


@torch.no_grad()
def encode_all(encoder: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 4096) -> Tensor:
    """``(N, d)`` -> ``(N, p)`` codes, computed in batches without gradients."""
    return torch.cat([encoder(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def data_digest(x: Tensor) -> str:
    """A short content hash of a data tensor (identifies the data set in cache keys)."""
    return hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class PretrainCache:
    """Pretrained autoencoder weights on disk, one file per key.

    The key holds everything the pretrained weights depend on: the architecture, the data
    (name, size and content hash), the seed, the number of epochs, the batch size, the
    optimiser and the trainer's precision. A file is written once (atomically, by rank zero)
    and read by every later run with the same key, whatever the method that follows the
    pretraining.

    Args:
        folder: where the files live (created on the first write).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / f"{key['data']['name']}_seed{key['seed']}_ep{key['epochs']}_{digest}.pt"

    @staticmethod
    def read(path: str | os.PathLike) -> dict[str, Any]:
        """An entry file as written by :meth:`save`: ``{"key": ..., "state_dict": ...}``."""
        return torch.load(path, map_location="cpu", weights_only=True)

    def load(self, key: dict[str, Any], module: nn.Module) -> Path | None:
        """Loads the entry of ``key`` into ``module``; its path, or ``None`` if there is none."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = self.read(path)
        except Exception as err:  # a truncated or foreign file: pretrain again
            rank_zero_warn(f"ignoring unreadable pretraining cache entry {path}: {err}")
            return None
        if entry.get("key") != json.loads(json.dumps(key)):
            rank_zero_warn(f"ignoring pretraining cache entry {path}: its key differs")
            return None
        module.load_state_dict(entry["state_dict"])
        return path

    def save(self, key: dict[str, Any], module: nn.Module) -> Path:
        """Writes ``module``'s weights under ``key`` (write to a temporary file, then rename)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        torch.save({"key": key, "state_dict": state}, tmp)
        os.replace(tmp, path)
        return path


class AutoencoderMethod(ClusteringMethod):
    """Base of the methods on a fully connected DAE d-h1-..-p-..-h1-d: the network, the optional
    pretraining phase (cached), and the one-off initialisation of the clustering from the codes.

    A subclass implements :meth:`init_from_codes`, :meth:`clustering_step` and
    :meth:`clustering_optimizers`, and the contract members (``embed`` and ``decode`` go through
    :meth:`encode` and :meth:`reconstruct`, the encoder and the decoder unless a subclass says
    otherwise; the clustering initialisation sees the codes of :meth:`encode`; pretraining always
    runs the plain DAE, so the cached weights do not depend on the method). State with one row
    per training sample (DEC's target distribution, DCN's assignments) is registered with
    :meth:`register_per_sample_buffer`.

    Args:
        n_clusters: K.
        input_shape: shape of one sample (linked from the data by the CLI).
        latent_dim: code size p.
        hidden: encoder widths (decoder mirrored), d-500-500-2000-p in the AE-CM paper.
        slope: LeakyReLU slope (0 gives ReLU).
        lr: Adam learning rate of every phase.
        adam_eps: Adam epsilon.
        init: ``random`` or ``pretrained``.
        pretrain_epochs: DAE pretraining epochs (``init: pretrained``).
        kmeans_n_init: k-means restarts of :meth:`kmeans`.
        pretrain_cache: a folder for the pretrained weights, ``True`` for
            ``<root>/pretrain_cache`` (root: the logger's ``save_dir``, else the trainer's
            ``default_root_dir``; for ``protos bench`` the table's run folder), ``False`` for none.
        init_from_codes: whether :meth:`init_from_codes` runs before clustering.
        bias_init: the DAE's biases, ``zeros`` or ``glorot_normal``
            (see :func:`~lightning_protos.nets.mlp.glorot_init`).
    """

    def __init__(
        self,
        n_clusters: int,
        input_shape: tuple[int, ...],
        latent_dim: int,
        hidden: Sequence[int],
        slope: float,
        lr: float,
        adam_eps: float,
        init: Literal["random", "pretrained"],
        pretrain_epochs: int,
        kmeans_n_init: int,
        pretrain_cache: bool | str,
        init_from_codes: bool = True,
        bias_init: BiasInit = "zeros",
    ) -> None:
        super().__init__(n_clusters, input_shape)
        check_positive(lr=lr, adam_eps=adam_eps, latent_dim=latent_dim, kmeans_n_init=kmeans_n_init)
        check_choices(init=(init, ("random", "pretrained")))
        check_non_negative(pretrain_epochs=pretrain_epochs)
        check_widths("hidden", hidden)
        self.ae = MLPAutoencoder(self.input_dim, hidden, latent_dim, slope, bias_init)
        self.register_buffer("initialised", torch.tensor(not init_from_codes))
        self._architecture = {
            "d": self.input_dim, "hidden": list(hidden), "p": latent_dim, "slope": slope, "bias_init": bias_init,
        }  # fmt: skip
        self._adam = {"lr": lr, "eps": adam_eps}
        self._pretrain_epochs = pretrain_epochs if init == "pretrained" else 0
        self._kmeans_n_init = kmeans_n_init
        self._pretrain_cache = pretrain_cache
        self.pretrain_cache_hit: Path | None = None  # the cache entry this run's pretraining came from
        self._cache_key_of_fit: dict[str, Any] | None = None
        self._cache_checked = False
        self._per_sample: list[str] = []
        self._fit_x: Tensor | None = None
        self.register_load_state_dict_pre_hook(self._size_per_sample_buffers)

    # -- phases -----------------------------------------------------------------------
    @property
    def pretrain_end(self) -> int:
        """First epoch after pretraining."""
        return self._pretrain_epochs

    def clustering_start(self) -> int:
        return self.pretrain_end

    def phase(self, epoch: int) -> str:
        """``pretrain`` or ``cluster`` (subclasses may split the latter)."""
        return "pretrain" if epoch < self._pretrain_epochs else "cluster"

    def cluster_iteration(self, batch_idx: int) -> int:
        """Training iterations since the clustering phase began (counts from 0)."""
        return (self.current_epoch - self.pretrain_end) * int(self.trainer.num_training_batches) + batch_idx

    # -- to implement -----------------------------------------------------------------
    def init_from_codes(self, z: Tensor) -> None:
        """Initialise the clustering from the codes ``(N, p)`` of the whole training set."""
        raise NotImplementedError

    def clustering_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """One training step of the clustering phase."""
        raise NotImplementedError

    def clustering_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers of the phases after pretraining."""
        raise NotImplementedError

    # -- contract defaults ------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """``(B, d)`` -> codes ``(B, p)``: the encoder; what :meth:`embed` and the clustering
        initialisation see (a subclass may compute the code layer otherwise: DCN)."""
        return self.ae.encoder(x)

    def embed(self, x: Tensor) -> Tensor:
        return self.encode(self.flat(x))

    def reconstruct(self, z: Tensor) -> Tensor:
        """Codes ``(B, p)`` -> ``(B, d)``: the decoder (the counterpart of :meth:`encode`)."""
        return self.ae.decoder(z)

    def decode(self, z: Tensor) -> Tensor:
        return self.reconstruct(z).reshape(len(z), *self.input_shape)

    def autoencode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, d)`` -> (codes, reconstruction) through :meth:`encode` and :meth:`reconstruct`: the
        clustering steps' forward pass (pretraining runs ``self.ae`` itself)."""
        z = self.encode(x)
        return z, self.reconstruct(z)

    # -- helpers ----------------------------------------------------------------------
    def adam(self, params, eps: float | None = None) -> torch.optim.Adam:
        """Adam at the method's learning rate, with its epsilon unless ``eps`` is given."""
        return adam(params, self._adam["lr"], self._adam["eps"] if eps is None else eps)

    def kmeans(self, z: Tensor) -> Tensor:
        """``(K, p)`` k-means centres of codes ``z`` (k-means++, ``kmeans_n_init`` restarts), seeded
        by the run's seed; fitted by rank 0 alone under DDP."""
        seed = self.sklearn_seed
        return on_rank0(kmeans_centres, z, self.n_clusters, seed, self._kmeans_n_init).to(z.device)

    def fit_data(self) -> Tensor:
        """The whole training split as ``(N, d)`` float features on this device, kept for the fit."""
        if self._fit_x is None:
            self._fit_x = self.fit_features().reshape(-1, self.input_dim)
        return self._fit_x

    def register_per_sample_buffer(self, name: str, trailing: tuple[int, ...] = (), dtype=torch.float32) -> None:
        """A buffer with one row per training sample, ``(N, *trailing)``.

        N is not known when the method is built (it comes with the data), so the buffer is
        registered here with N = 0, which keeps its key in every state dict; it is sized by
        :meth:`size_per_sample_buffers` when the data are known, and to the stored shape when a
        state dict is loaded, so that strict checkpoint loading works on a freshly built method.
        Sized in place, so that DDP keeps its reference to the tensor.
        """
        self.register_buffer(name, torch.zeros(0, *trailing, dtype=dtype))
        self._per_sample.append(name)

    def size_per_sample_buffers(self, n: int) -> None:
        """Sizes every per-sample buffer to ``n`` rows of zeros (``n``: the training samples)."""
        for name in self._per_sample:
            buffer = getattr(self, name)
            buffer.resize_(n, *buffer.shape[1:]).zero_()

    def _size_per_sample_buffers(self, module, state_dict, prefix, *args) -> None:
        for name in self._per_sample:
            stored = state_dict.get(prefix + name)
            if stored is not None:
                getattr(self, name).resize_(stored.shape)

    # -- the pretraining cache --------------------------------------------------------
    def _cache(self) -> PretrainCache | None:
        if not self._pretrain_epochs or self._pretrain_cache is False:
            return None
        if isinstance(self._pretrain_cache, str):
            return PretrainCache(self._pretrain_cache)
        logger = self.trainer.logger
        root = getattr(logger, "save_dir", None) if logger is not None else None
        return PretrainCache(Path(root or self.trainer.default_root_dir) / "pretrain_cache")

    def _cache_key(self) -> dict[str, Any]:
        if self._cache_key_of_fit is not None:
            return self._cache_key_of_fit
        dm = self.trainer.datamodule
        x = self.fit_data()
        self._cache_key_of_fit = {
            "architecture": self._architecture,
            "data": {"name": getattr(dm, "name", type(dm).__name__), "n": len(x), "sha1": data_digest(x)},
            "seed": self.run_seed,
            "epochs": self._pretrain_epochs,
            "batch_size": getattr(dm, "batch_size", None),
            "optimizer": {"name": "adam", **self._adam},
            "precision": str(self.trainer.precision),  # bf16 autocast trains other weights than fp32
            # batch_size is per process: under DDP each step sees world_size batches (a single
            # process's entries keep their earlier key)
            **({"world_size": self.trainer.world_size} if self.trainer.world_size > 1 else {}),
        }
        return self._cache_key_of_fit

    def _load_pretrained(self) -> None:
        """Rank 0 looks the key up and, on a hit, sends the weights to every rank: the ranks must
        agree on skipping the pretraining (a node without the file, or an entry written by
        another run between two ranks' look-ups, would otherwise leave one rank training alone)."""
        cache = self._cache()
        path = on_rank0(lambda: cache.load(self._cache_key(), self.ae)) if cache is not None else None
        if path is not None:
            broadcast_from_rank0([*self.ae.parameters(), *self.ae.buffers()])
            self.pretrain_cache_hit = path
            rank_zero_info(f"pretrained autoencoder loaded from {path}: pretraining epochs skipped")

    def _save_pretrained(self) -> None:
        cache = self._cache()
        if cache is None or self.pretrain_cache_hit is not None or not self.trainer.is_global_zero:
            return  # the key (a hash of the whole data set) is computed by rank 0 alone
        key = self._cache_key()
        if not cache.path(key).is_file():
            rank_zero_info(f"pretrained autoencoder cached in {cache.save(key, self.ae)}")

    # -- Lightning hooks --------------------------------------------------------------
    def configure_optimizers(self):
        """The pretraining optimizer first, then :meth:`clustering_optimizers` (each phase has its
        own moments, all checkpointed)."""
        return [self.adam(self.ae.parameters()), *self.clustering_optimizers()]

    def on_fit_start(self) -> None:
        self._fit_x, self._cache_key_of_fit, self.pretrain_cache_hit = None, None, None
        self._cache_checked = False

    def on_fit_end(self) -> None:
        self._fit_x, self._cache_key_of_fit = None, None

    def on_train_epoch_start(self) -> None:
        if self.phase(self.current_epoch) == "pretrain":
            if not self._cache_checked:  # once a fit; a resumed run may find an entry written since
                self._cache_checked = True
                self._load_pretrained()
        elif not bool(self.initialised):
            self._save_pretrained()
            self.init_from_codes(encode_all(self.encode, self.fit_data()))
            self.initialised.fill_(True)
            broadcast_from_rank0([*self.parameters(), *self.buffers()])  # rank 0's initialisation everywhere

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> int | None:
        super().on_train_batch_start(batch, batch_idx)
        if self.pretrain_cache_hit is not None and self.phase(self.current_epoch) == "pretrain":
            return -1  # the pretrained weights came from the cache: skip the epoch
        return None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.phase(self.current_epoch) == "pretrain":
            pretrain_step(self, self.ae, self.flat(batch["x"]), self.optimizers()[0])
        else:
            self.clustering_step(batch, batch_idx)
