"""Data on the accelerator: the decision to move the whole data set (mocked GPU: no CUDA here)
and batches sliced where the data live. The GPU path itself runs only on a machine with one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TwoSplits

from lightning_protos.data import DataError


def with_trainer(dm, device: str):
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    return dm


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU with ``free`` bytes of free memory (set on the returned namespace)."""
    gpu = SimpleNamespace(free=10**9)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gpu.free, 2 * gpu.free))
    return gpu


@pytest.mark.parametrize(("fit_on", "splits", "nbytes"), [("train", 2, 480), ("all", 2, 480), ("all", 1, 320)])
def test_the_data_goes_to_the_gpu_when_it_fits(two_splits, fake_gpu, fit_on, splits, nbytes):
    """Images of 16 bytes, 20 + 10 of them, each counted once (fit_on: all's splits are views
    of their concatenation)."""
    dm = with_trainer(TwoSplits(*two_splits[:splits], fit_on=fit_on), "cuda:0")
    assert dm.resident_device() == torch.device("cuda:0")
    fake_gpu.free = 2 * nbytes - 1  # the features would take more than half of it (device_fraction 0.5)
    assert dm.resident_device() is None
    fake_gpu.free = 2 * nbytes
    assert dm.resident_device() == torch.device("cuda:0")


@pytest.mark.parametrize(
    ("device", "kwargs"),
    [("cpu", {}), ("cuda:0", {"num_workers": 2}), ("cuda:0", {"device_fraction": 0.0})],
    ids=["host-trainer", "workers", "switched-off"],
)
def test_the_data_stays_on_the_host(two_splits, fake_gpu, device, kwargs):
    assert with_trainer(TwoSplits(*two_splits, **kwargs), device).resident_device() is None


def test_a_device_fraction_outside_0_1_is_refused(two_splits):
    with pytest.raises(DataError, match="device_fraction must be in"):
        TwoSplits(*two_splits, device_fraction=1.5)


@pytest.mark.parametrize("fit_on", ["all", "train"])
def test_batches_are_sliced_where_the_data_live(two_splits, fit_on, monkeypatch):
    """``meta`` stands in for the GPU: setup moves the features once, batches come from there,
    and labels and indices stay on the host for evaluation."""
    dm = TwoSplits(*two_splits, batch_size=8, fit_on=fit_on)
    monkeypatch.setattr(type(dm), "resident_device", lambda self: torch.device("meta"))
    dm.setup("fit")
    assert dm.features("fit").device.type == "meta"
    assert all(x.device.type == "meta" for x, _ in dm.splits.values())  # every split, no host copy left
    train = next(iter(dm.train_dataloader()))
    assert train["x"].device.type == "meta"
    assert train["x"].dtype == torch.float32
    assert train["index"].device.type == "cpu"
    evaluation = next(iter(dm.val_dataloader()))
    assert evaluation["x"].device.type == "meta"
    assert evaluation["y"].device.type == "cpu"
    assert dm.labels("eval").device.type == "cpu"
