"""Shared tiny fixtures: small tensors, small data modules, a quiet CPU trainer."""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_protos.data import ArrayDataModule

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # every shipped config

# Tiny tensors: one thread is faster than contending for the 2 shared cores.
torch.set_num_threads(1)


class RandomStream(L.Callback):
    """A digest of torch's generator after each training batch (its draws included), by step."""

    def __init__(self) -> None:
        self.digests: dict[int, str] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.digests[trainer.global_step] = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()


@pytest.fixture(autouse=True)
def _quiet():
    """Lightning's info lines and its 'few workers' warnings are noise in tests."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        yield


@pytest.fixture(autouse=True)
def _writes_nothing_into_the_working_directory():
    """A trainer without ``default_root_dir`` writes its run files (``metrics.json``,
    ``lightning_logs``) into the working directory: the repository, when tests run there."""
    cwd = Path.cwd()
    before = {p.name for p in cwd.iterdir()}
    yield
    added = sorted({p.name for p in cwd.iterdir()} - before - {".pytest_cache", "__pycache__"})
    assert not added, f"the test wrote {added} into {cwd}: give its trainer default_root_dir=tmp_path"


@pytest.fixture
def shared_data() -> Path:
    """The offline data sets of ../shared/data, or a skip saying why."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def deterministic():
    """Deterministic kernels for the duration of a test."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


class TwoRanks:
    """Two DDP ranks simulated by two threads of this process: ``torch.distributed``'s
    ``all_reduce`` (sum and max) really combines the tensors the two threads pass at the same
    call, so code written for a process group runs in lockstep on two ranks, in milliseconds."""

    def __init__(self, monkeypatch) -> None:
        self._barrier = threading.Barrier(2, timeout=10)  # (a new one each run: a failure breaks it)
        self._slots: list[Tensor | None] = [None, None]
        self._rank = threading.local()
        self._monkeypatch = monkeypatch

    def _all_reduce(self, tensor: Tensor, op=dist.ReduceOp.SUM, group=None, async_op=False) -> None:
        rank = self._rank.value
        self._slots[rank] = tensor.clone()
        self._barrier.wait()
        other = self._slots[1 - rank]
        if op == dist.ReduceOp.MAX:
            tensor.copy_(torch.maximum(tensor, other))
        elif op == dist.ReduceOp.SUM:
            tensor.add_(other)
        else:
            raise NotImplementedError(op)
        self._barrier.wait()  # both have read before either writes its next tensor

    def run(self, fn, *per_rank_args) -> list:
        """``[fn(*per_rank_args[0]), fn(*per_rank_args[1])]``, the two calls on ranks 0 and 1."""
        results, errors = [None, None], []
        self._barrier = threading.Barrier(2, timeout=10)

        def on(rank: int) -> None:
            self._rank.value = rank
            try:
                results[rank] = fn(*per_rank_args[rank])
            except BaseException as err:  # re-raised below, in the test's thread
                errors.append(err)
                self._barrier.abort()

        threads = [threading.Thread(target=on, args=(r,)) for r in (0, 1)]
        with self._monkeypatch.context() as m:  # a process group only while the two ranks run
            m.setattr(dist, "is_initialized", lambda: True)
            m.setattr(dist, "get_world_size", lambda group=None: 2)
            m.setattr(dist, "get_rank", lambda group=None: self._rank.value)
            m.setattr(dist, "all_reduce", self._all_reduce)
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def two_ranks(monkeypatch) -> TwoRanks:
    return TwoRanks(monkeypatch)


class TwoSplits(ArrayDataModule):
    """In-memory train / test tensors handed in directly (for data-layer tests)."""

    name = "two_splits"

    def __init__(self, train: tuple[Tensor, Tensor | None], test=None, **kwargs) -> None:
        kwargs.setdefault("download", False)
        super().__init__(**kwargs)
        self._given = {"train": train, **({"test": test} if test is not None else {})}

    def load(self):
        return dict(self._given)


@pytest.fixture
def two_splits():
    """20 train + 10 test uint8 'images' of shape 1x4x4 with labels 0..2."""
    g = torch.Generator().manual_seed(0)
    train = (torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(20) % 3)
    test = (torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(10) % 3)
    return train, test


def fixed_draw(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """A reparameterisation without noise, z = mu + 0.5 sigma: a step's draws, known to a test."""
    return mu + 0.5 * torch.exp(0.5 * logvar)


def make_trainer(**kwargs) -> L.Trainer:
    """A quiet CPU trainer with no logger, checkpoints or validation unless asked."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture
def trainer_factory():
    return make_trainer


def cli_fit_then_predict(tmp_path: Path, capsys, config: str, data: Path, *model_args: str) -> tuple[Path, list]:
    """``protos fit`` (1-2 epochs, batch 8) of ``configs/CONFIG`` on an ``.npz`` file, checking
    the final evaluation prints the probes, then ``protos predict`` of its ``last.ckpt``:
    returns the predict run directory and the rows of its ``predictions.csv``."""
    import csv
    import json

    from lightning_protos.cli import main

    args = [
        "--config", str(ROOT / "configs" / config),
        "--data", "lightning_protos.data.ArrayFile", "--data.path", str(data), "--data.batch_size", "8",
        *model_args, "--trainer.check_val_every_n_epoch", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    main(["fit", *args])
    out = capsys.readouterr().out
    assert "final evaluation: acc=" in out
    assert "stat_acc=" in out
    run = tmp_path / "lightning_logs" / "version_0"
    assert {"stat_acc", "knn_acc", "linear_acc"} <= set(json.loads((run / "metrics.json").read_text())["test"])
    main(["predict", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    predicted = tmp_path / "lightning_logs" / "version_1"
    with open(predicted / "predictions.csv") as f:
        return predicted, list(csv.DictReader(f))


def spy_step(model, x: Tensor, optimizers=None, index: Tensor | None = None) -> tuple[dict[str, float], list]:
    """What one ``training_step`` of ``model`` does on the batch ``x`` (its samples' ``index`` in
    the data set: 0..B-1 by default), without optimising: the loss terms it sums
    (``check_and_log``), as floats, and the optimizers it steps, in order."""
    terms, stepped = {}, []
    model.check_and_log = lambda t, **kw: terms.update({k: float(v) for k, v in t.items()}) or sum(t.values())
    model.optimize = lambda loss, optimizer, *args, **kwargs: stepped.append(optimizer)
    model.optimizers = lambda: optimizers
    model.training_step({"x": x, "index": torch.arange(len(x)) if index is None else index}, 0)
    return terms, stepped


def check_contract(model, x: Tensor, latent_dim: int, out_shape: tuple[int, ...]) -> None:
    """The method contract on a batch ``x`` (DESIGN.md): a deterministic ``(B, p)`` embedding,
    ``(B, K)`` probabilities summing to 1, ``(K, p)`` prototypes, ``decode`` of p-d latents
    to inputs of ``out_shape``, manual optimization."""
    model.eval()
    k = model.n_clusters
    with torch.no_grad():
        assert model.embed(x).shape == (len(x), latent_dim)
        assert torch.equal(model.embed(x), model.embed(x))
        probs = model.cluster_probs(x)
        assert probs.shape == (len(x), k)
        torch.testing.assert_close(probs.sum(1), torch.ones(len(x)))
        assert model.prototypes().shape == (k, latent_dim)
        assert model.decode(torch.randn(2, latent_dim)).shape == (2, *out_shape)
    assert model.automatic_optimization is False
