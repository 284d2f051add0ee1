"""Exact resume: a run stopped after an epoch and resumed from its checkpoint ends where an
uninterrupted run with the same seed ends (same batches, same averaging epoch, same centroids)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_protos.data import Digits
from lightning_protos.methods.aecm import AECM
from lightning_protos.methods.cm import CM


def _fit(tmp_path, model, epochs: int, ckpt_path=None) -> L.Trainer:
    L.seed_everything(0)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer = L.Trainer(
        max_epochs=epochs, enable_progress_bar=False, logger=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[every_epoch], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, Digits(batch_size=64, flatten=True), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(
    ("make", "epochs"),
    [
        (lambda: CM(10, (64,), alpha=20.0, init="kmeans++"), 4),
        (
            lambda: AECM(
                10,
                (64,),
                latent_dim=5,
                hidden=(16,),
                alpha=20.0,
                init="pretrained",
                pretrain_epochs=1,
                cm_epochs=1,
                pretrain_cache=False,
            ),
            5,
        ),
    ],
    ids=["cm", "aecm"],
)
def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, make, epochs):
    L.seed_everything(0)
    straight = make()
    _fit(tmp_path / "a", straight, epochs)
    L.seed_everything(123)  # the resumed process starts from a different global RNG state ...
    resumed = make()
    _fit(tmp_path / "b", resumed, epochs, ckpt_path=tmp_path / "a" / "ckpt" / "epoch=1.ckpt")
    x = Digits(flatten=True).features("eval")
    with torch.no_grad():
        assert torch.allclose(straight.prototypes(), resumed.prototypes(), atol=1e-6)
        assert torch.equal(straight.predict_clusters(x), resumed.predict_clusters(x))
