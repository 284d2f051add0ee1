"""Bad input stops before training with a one-line error; a non-finite loss names its term."""

import numpy as np
import pytest
import torch
from conftest import make_trainer

from lightning_protos.data import MNIST, ArrayFile, Blobs, DataError, Digits, FiveGaussians, ImageFolder, get_datamodule
from lightning_protos.errors import ProtosError
from lightning_protos.methods.aecm import AECM
from lightning_protos.methods.cm import CM
from lightning_protos.methods.dec import DEC
from lightning_protos.methods.protovae import AE
from lightning_protos.methods.vae import VAE


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


@pytest.mark.parametrize("init", ["random", "kmeans++"])  # k-means++ reads the data before any step
def test_nan_inputs_are_refused_before_training(tmp_path, init):
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    x[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    dm = ArrayFile(str(tmp_path / "nan.npy"), batch_size=40)
    trainer = make_trainer(max_epochs=2)
    with pytest.raises(DataError, match=r"nan.npy\): 1 feature values of its train split are NaN or Inf") as err:
        trainer.fit(CM(n_clusters=3, input_shape=(3,), init=init), dm)
    one_line(err)
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: CM(3, (2,), terms=()), r"terms must be one or more of E1, E2, E3, E4, got \[\]"),
        (lambda: CM(3, (2,), adam_eps=0.0), "adam_eps must be > 0, got 0.0"),
        (lambda: CM(3, (2,), step_batch=-1), "step_batch must be >= 0, got -1"),  # 0 / None: the loaded batch
        (lambda: CM(3, (2,), e3_weight=-1.0), "e3_weight must be >= 0, got -1.0"),
        (lambda: CM(3, (2,), init_lloyd_steps=-3), "init_lloyd_steps must be >= 0, got -3"),
        (lambda: AECM(3, (6,), hidden=(0, 8)), r"hidden \[0, 8\]: 0 at position 0 is below 1"),
        (lambda: AECM(3, (6,), hidden=(8,), latent_dim=0), "latent_dim must be > 0, got 0"),
        (lambda: AECM(3, (6,), hidden=(8,), slope=-1.0), "slope must be >= 0, got -1.0"),
        (lambda: AECM(3, (6,), hidden=(8,), cm_epochs=-2), "cm_epochs must be >= 0, got -2"),
        (lambda: DEC(3, (6,), hidden=(8,), adam_eps=-1.0), "adam_eps must be > 0, got -1.0"),
        (lambda: VAE(3, (1, 28, 28), network="conv", channels=(0, 8)), r"channels \[0, 8\]: 0 at position 0"),
        (lambda: AE((1, 28, 28), channels=()), "channels must name at least one conv block"),
        (lambda: AE((1, 28, 28), channels=(8, 0)), r"channels \[8, 0\]: 0 at position 1"),
    ],
)
def test_bad_method_arguments_are_one_line_errors(make, match):
    with pytest.raises(ProtosError, match=match) as err:
        make()
    one_line(err)


def test_bad_image_size_or_no_samples_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="image_size must be >= 1") as err:
        ImageFolder(str(tmp_path), image_size=0)
    one_line(err)
    with pytest.raises(DataError, match=r"no samples in its train split") as err:
        FiveGaussians(n_samples=0).splits  # noqa: B018
    one_line(err)


def test_a_nan_reconstruction_is_a_nan_bce_term_not_an_exception():
    """F.binary_cross_entropy raises on a NaN input; L_rec must go NaN for check_and_log to name it."""
    x = torch.rand(4, 1, 28, 28)
    x_rec = torch.rand(4, 1, 28, 28)
    x_rec[0, 0, 0, 0] = float("nan")
    terms, _ = AE((1, 28, 28)).reconstruction_terms(x, x_rec)
    assert torch.isnan(terms["L_rec"])
    x_rec[0, 0, 0, 0] = 0.3
    expected = torch.nn.functional.binary_cross_entropy(x_rec, x)
    assert torch.equal(AE((1, 28, 28)).reconstruction_terms(x, x_rec)[0]["L_rec"], expected)


def test_a_huge_learning_rate_stops_the_run_naming_the_term():
    torch.manual_seed(0)
    model = CM(n_clusters=3, input_shape=(2,), lr=1e30, average_last_epoch=False)
    trainer = make_trainer(max_epochs=20)
    with pytest.raises(FloatingPointError, match=r"non-finite loss term (E\d)(, E\d)*") as err:
        trainer.fit(model, Blobs(n_samples=64, batch_size=16))
    one_line(err)
    assert trainer.current_epoch < 19  # stopped early, not at the end
