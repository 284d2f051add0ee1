"""Every shipped config starts training: one training step on its own data from ../shared/data,
through the ``protos`` command (no validation: VAE+KMeans' elbow alone takes minutes on all
of MNIST). Parsing (tests/test_cli.py) does not build the trainer, whose callbacks once refused a
config (ProtoVAE's listed a second ClusteringEvaluator). Slow: a few seconds a config, most of
it reading the data."""

from __future__ import annotations

import pytest
from conftest import CONFIGS

from lightning_protos.cli import main

OFFLINE = ("mnist", "usps", "pendigits", "pneumonia", "digits", "5gaussians")  # data in ../shared/data


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_trains_a_batch(config, shared_data, tmp_path, monkeypatch):
    if not any(name in config.stem.replace("fmnist", "") for name in OFFLINE):
        pytest.skip(f"{config.name}: its data set has no offline copy")
    monkeypatch.setenv("PROTOS_DATA_DIR", str(shared_data))
    args = ["fit", "--config", str(config), "--final_test", "false", "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
    try:
        main(args)
    except SystemExit as exit_:
        pytest.fail(f"{config.name}: exit {exit_.code}")
