"""Bad input stops before training with a one-line error; a non-finite loss names its term."""

import numpy as np
import pytest
import torch
from conftest import make_trainer

from lightning_protos.data import MNIST, ArrayFile, Blobs, DataError, Digits, get_datamodule
from lightning_protos.errors import ProtosError
from lightning_protos.methods.cm import CM


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("k", [1, 0, -3])
def test_fewer_than_two_clusters(k):
    with pytest.raises(ProtosError, match="n_clusters") as err:
        CM(n_clusters=k, input_shape=(2,))
    assert str(k) in one_line(err)


@pytest.mark.parametrize(("name", "value"), [("lr", 0.0), ("lr", -1e-3), ("alpha", 0.0), ("alpha", -2.0)])
def test_non_positive_learning_rate_or_concentration(name, value):
    with pytest.raises(ProtosError, match=f"{name} must be > 0") as err:
        CM(n_clusters=3, input_shape=(2,), **{name: value})
    one_line(err)


def test_more_clusters_than_samples_stops_before_training():
    model = CM(n_clusters=10, input_shape=(2,))
    trainer = make_trainer(max_epochs=1)
    with pytest.raises(ProtosError, match=r"K=10\) exceeds the 6 training samples") as err:
        trainer.fit(model, Blobs(n_samples=6))
    one_line(err)
    assert trainer.global_step == 0


def test_input_shape_that_does_not_match_the_network():
    model = CM(n_clusters=10, input_shape=(10,))
    trainer = make_trainer(max_epochs=1)
    with pytest.raises(ProtosError, match=r"\(64,\).*'digits'.*\(10,\)") as err:
        trainer.fit(model, Digits(flatten=True))
    one_line(err)
    assert trainer.global_step == 0


def test_unknown_data_set():
    with pytest.raises(DataError, match=r"unknown data set 'mnits'.*mnist") as err:
        get_datamodule("mnits")
    one_line(err)


def test_missing_data_offline_stops_before_training(tmp_path):
    model = CM(n_clusters=10, input_shape=(784,))
    trainer = make_trainer(max_epochs=1)
    dm = MNIST(data_dir=str(tmp_path), download=False, flatten=True)
    with pytest.raises(DataError, match="MNIST/raw/train-images-idx3-ubyte") as err:
        trainer.fit(model, dm)
    assert str(tmp_path) in one_line(err)
    assert trainer.global_step == 0


def test_nan_inputs_stop_the_run_naming_the_terms(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    x[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    dm = ArrayFile(str(tmp_path / "nan.npy"), batch_size=40)
    trainer = make_trainer(max_epochs=2)
    with pytest.raises(FloatingPointError, match=r"non-finite loss term E1, E2, E3, E4 at epoch 0, step 0"):
        trainer.fit(CM(n_clusters=3, input_shape=(3,)), dm)


def test_a_huge_learning_rate_stops_the_run_naming_the_term():
    torch.manual_seed(0)
    model = CM(n_clusters=3, input_shape=(2,), lr=1e30, average_last_epoch=False)
    trainer = make_trainer(max_epochs=20)
    with pytest.raises(FloatingPointError, match=r"non-finite loss term (E\d)(, E\d)*") as err:
        trainer.fit(model, Blobs(n_samples=64, batch_size=16))
    one_line(err)
    assert trainer.current_epoch < 19  # stopped early, not at the end
