"""data/: whole-batch loading, splits, users' files, the synthetic sets and the offline copies."""

import math

import numpy as np
import pytest
import torch
from conftest import TwoSplits
from PIL import Image
from sklearn.metrics import adjusted_rand_score
from torchvision.io import write_png

from lightning_protos.data import (
    CIFAR100,
    MNIST,
    USPS,
    ArrayFile,
    Blobs,
    DataError,
    Digits,
    FiveGaussians,
    ImageFolder,
    Pendigits,
    PneumoniaMNIST,
    get_datamodule,
    resolve_root,
)
from lightning_protos.data.base import TensorBatches
from lightning_protos.data.medmnist import MedMNIST
from lightning_protos.data.synthetic import FIVE_GAUSSIANS_RADIUS, five_gaussians

# -- the in-memory batches ----------------------------------------------------------------


def test_tensor_batches_return_whole_float_batches(two_splits):
    (x, y), _ = two_splits
    ds = TensorBatches(x, y, with_labels=True)
    batch = ds.__getitems__([3, 0, 7])
    assert set(batch) == {"x", "y", "index"}
    assert batch["x"].dtype == torch.float32
    assert batch["x"].shape == (3, 1, 4, 4)
    assert float(batch["x"].min()) >= 0.0
    assert float(batch["x"].max()) <= 1.0
    torch.testing.assert_close(batch["x"], x[[3, 0, 7]].float() / 255)
    assert batch["y"].tolist() == y[[3, 0, 7]].tolist()
    assert batch["index"].tolist() == [3, 0, 7]
    assert x.dtype == torch.uint8  # the stored tensor is untouched
    one = ds[5]
    assert one["x"].shape == (1, 4, 4)
    assert int(one["index"]) == 5


def test_float_features_pass_through_unscaled():
    x = torch.tensor([[2.5, -1.0], [300.0, 0.0]])
    batch = TensorBatches(x, None, with_labels=True).__getitems__([0, 1])
    assert "y" not in batch
    torch.testing.assert_close(batch["x"], x)


def test_training_batches_carry_no_labels_evaluation_batches_do(two_splits):
    train, test = two_splits
    dm = TwoSplits(train, test, batch_size=8, eval_batch_size=16, fit_on="train")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "index"}  # no "y": methods cannot read labels
    assert batch["x"].shape == (8, 1, 4, 4)
    assert batch["x"].dtype == torch.float32
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"x", "y", "index"}
        assert len(batch["x"]) == 10


def test_a_training_epoch_visits_every_sample_once(two_splits):
    train, _ = two_splits
    dm = TwoSplits(train, batch_size=6)
    seen = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert sorted(seen.tolist()) == list(range(20))


def test_fit_on_all_versus_train(two_splits):
    train, test = two_splits
    on_all = TwoSplits(train, test, fit_on="all")
    on_train = TwoSplits(train, test, fit_on="train")
    assert on_all.n_train == 30
    assert on_all.n_of("eval") == 30
    assert on_train.n_train == 20
    assert on_train.n_of("eval") == 10
    assert torch.equal(on_train.labels("eval"), test[1])
    # all: the training split then the test split, each image with its own label (labels without a period)
    g = torch.Generator().manual_seed(1)
    train = (train[0], torch.randint(0, 3, (20,), generator=g))
    test = (test[0], torch.randint(0, 3, (10,), generator=g))
    on_all = TwoSplits(train, test, fit_on="all")
    for stage in ("fit", "eval"):
        assert torch.equal(on_all.features(stage), torch.cat([train[0], test[0]]).float() / 255)
        assert torch.equal(on_all.labels(stage), torch.cat([train[1], test[1]]))
    assert on_all.input_shape == (1, 4, 4)
    assert on_all.n_classes == 3
    flat = TwoSplits(train, test, flatten=True)
    assert flat.input_shape == (16,)
    assert next(iter(flat.train_dataloader()))["x"].shape[1:] == (16,)


def test_features_are_floats_in_the_served_shape(two_splits):
    train, test = two_splits
    f = TwoSplits(train, test, fit_on="train").features("fit")
    assert f.shape == (20, 1, 4, 4)
    assert f.dtype == torch.float32
    assert float(f.max()) <= 1.0


def test_bad_batch_size_and_fit_on():
    with pytest.raises(DataError, match="batch_size"):
        Digits(batch_size=0)
    with pytest.raises(DataError, match="eval_batch_size must be >= 1, got 256 and 0"):
        Digits(eval_batch_size=0)
    with pytest.raises(DataError, match="num_workers must be >= 0, got -1"):
        Digits(num_workers=-1)
    with pytest.raises(DataError, match="fit_on"):
        Digits(fit_on="everything")


def test_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("PROTOS_DATA_DIR", str(tmp_path / "env"))
    assert resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("PROTOS_DATA_DIR")
    assert resolve_root(None).name == "lightning_protos"


# -- users' files ---------------------------------------------------------------------------


def test_array_file_npz_keeps_uint8_and_labels(tmp_path):
    x = np.arange(6 * 2 * 3, dtype=np.uint8).reshape(6, 2, 3)
    path = tmp_path / "mine.npz"
    np.savez(path, X=x, y=np.array([0, 1, 0, 1, 2, 2]))
    dm = ArrayFile(str(path), batch_size=4)
    xt, yt = dm.splits["train"]
    assert xt.dtype == torch.uint8
    assert xt.shape == (6, 1, 2, 3)  # (N, H, W) images gain their channel
    assert yt.tolist() == [0, 1, 0, 1, 2, 2]
    assert dm.n_classes == 3
    assert dm.input_shape == (1, 2, 3)
    assert dm.name == "mine"
    torch.testing.assert_close(dm.features(), torch.as_tensor(x).float().unsqueeze(1) / 255)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((5, 28, 28, 3), (3, 28, 28)),  # channels-last RGB, as NumPy and PIL hold it
        ((5, 28, 28, 1), (1, 28, 28)),
        ((5, 28, 28, 4), (4, 28, 28)),  # RGBA channels-last: four channels, not 28 of 28 x 4
        ((5, 28, 28, 2), (2, 28, 28)),  # grey + alpha
        ((5, 4, 28, 28), (4, 28, 28)),  # four channels first already
        ((5, 3, 32, 32), (3, 32, 32)),  # channels-first already
        ((5, 7), (7,)),  # features
    ],
)
def test_array_file_reads_images_channels_first(tmp_path, shape, expected):
    x = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    xt = ArrayFile(str(tmp_path / "x.npy")).splits["train"][0]
    assert tuple(xt.shape[1:]) == expected
    if len(shape) == 4 and shape[3] < 28:  # the pixel at (row 2, column 5) keeps its channels
        assert xt[1, :, 2, 5].tolist() == x[1, 2, 5].tolist()


def test_array_file_labels_not_0_to_c_are_mapped_and_named(tmp_path):
    path = tmp_path / "ones.npz"
    np.savez(path, X=np.zeros((6, 2)), y=np.array([10, 1, 2, 2, 3, 10]))
    dm = ArrayFile(str(path))
    assert dm.labels().tolist() == [3, 0, 1, 1, 2, 3]  # sorted order: 1, 2, 3, 10
    assert dm.n_classes == 4  # not 11
    assert dm.class_names == ["1", "2", "3", "10"]
    np.savez(path, X=np.zeros((3, 2)), y=np.array([2, 0, 1]))
    plain = ArrayFile(str(path))
    assert plain.labels().tolist() == [2, 0, 1]
    assert plain.class_names is None


def test_array_file_npy_big_endian(tmp_path):
    x = np.arange(12, dtype=">f4").reshape(4, 3)  # as some instruments write
    np.save(tmp_path / "big.npy", x)
    assert ArrayFile(str(tmp_path / "big.npy")).features().tolist() == x.astype(np.float32).tolist()


def test_array_file_npy(tmp_path):
    path = tmp_path / "feats.npy"
    np.save(path, np.random.default_rng(0).normal(size=(9, 4)))
    dm = ArrayFile(str(path), flatten=True)
    assert dm.n_train == 9
    assert dm.input_shape == (4,)
    assert dm.labels() is None
    assert dm.features().dtype == torch.float32
    assert "y" not in next(iter(dm.val_dataloader()))


def test_array_file_csv_with_header_and_label_column(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("f1,label,f2\n0.5,1,2.0\n1.5,0,3.0\n2.5,1,4.0\n")
    dm = ArrayFile(str(path), label_column="label")
    x, y = dm.splits["train"]
    assert x.tolist() == [[0.5, 2.0], [1.5, 3.0], [2.5, 4.0]]
    assert y.tolist() == [1, 0, 1]
    by_index = ArrayFile(str(path), label_column="1").splits["train"]
    assert torch.equal(by_index[1], y)


def test_array_file_csv_without_header(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("1,2,3\n4,5,6\n")
    x, y = ArrayFile(str(path)).splits["train"]
    assert x.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert y is None


def test_array_file_csv_first_row_with_missing_values_is_data_not_a_header(tmp_path):
    """A first row of numbers with a gap is refused (as every other row with one), not skipped."""
    for gap in ("NA", "", "n/a"):
        path = tmp_path / "gap.csv"
        path.write_text(f"1,{gap},3\n4,5,6\n7,8,9\n")
        with pytest.raises(DataError, match="expected numbers only"):
            ArrayFile(str(path)).splits  # noqa: B018


def test_array_file_csv_quoted_header_and_a_row_number_column(tmp_path):
    quoted = tmp_path / "r.csv"  # R's write.csv quotes the names
    quoted.write_text('"a","b","label"\n0.5,2,1\n1.5,3,0\n')
    x, y = ArrayFile(str(quoted), label_column="label").splits["train"]
    assert x.tolist() == [[0.5, 2.0], [1.5, 3.0]]
    assert y.tolist() == [1, 0]
    for index_name in ("", "Unnamed: 0"):  # DataFrame.to_csv() without index=False
        path = tmp_path / "pandas_index.csv"
        path.write_text(f"{index_name},a,b\n0,1.5,2.5\n1,3.5,4.5\n2,5.5,6.5\n")
        with pytest.warns(UserWarning, match="read as row numbers and dropped"):
            x, _ = ArrayFile(str(path)).splits["train"]
        assert x.tolist() == [[1.5, 2.5], [3.5, 4.5], [5.5, 6.5]]
    # a label column by index counts the file's columns, the row numbers' too
    path.write_text(",a,label,b\n0,1.5,1,2.5\n1,3.5,0,4.5\n")
    for column in (2, "label"):
        with pytest.warns(UserWarning, match="read as row numbers and dropped"):
            x, y = ArrayFile(str(path), label_column=column).splits["train"]
        assert x.tolist() == [[1.5, 2.5], [3.5, 4.5]]
        assert y.tolist() == [1, 0]


def test_array_file_csv_with_a_byte_order_mark_or_a_header_of_numbers(tmp_path):
    excel = tmp_path / "excel.csv"  # a spreadsheet's UTF-8 export starts with a byte-order mark
    excel.write_bytes("1,2,3\n4,5,6\n".encode("utf-8-sig"))
    assert ArrayFile(str(excel)).splits["train"][0].tolist() == [[1, 2, 3], [4, 5, 6]]
    pandas = tmp_path / "pandas.csv"  # DataFrame(X).to_csv(index=False) names the columns 0, 1, 2
    pandas.write_text("0,1,2\n0.5,2.0,1\n1.5,3.0,0\n")
    x, y = ArrayFile(str(pandas), header=True, label_column="2").splits["train"]
    assert x.tolist() == [[0.5, 2.0], [1.5, 3.0]]
    assert y.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.npz", None, "no such file"),
        ("wrong.npz", {"A": np.zeros(3)}, "named 'X'"),
        ("data.txt", "1 2 3", "unsupported file type"),
        ("uneven.npz", {"X": np.zeros((4, 2)), "y": np.zeros(3)}, "4 samples but 3 labels"),
        ("unlabelled.npz", {"X": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, "labels must be >= 0, found -1"),
        ("words.csv", "f1,f2\n0.5,dog\n", r"expected numbers only, as many in every row \(NumPy: could not convert"),
        (
            "ragged.csv",
            "1,2,3\n4,5\n",
            r"expected numbers only, as many in every row "
            r"\(NumPy: the number of columns changed from 3 to 2 at row 2\)$",
        ),
        ("table.csv", "f1,label\n0.5,1\n", r"no column 'lbl' for label_column \(the header names f1, label\)"),
        ("plain.csv", "0.5,1\n1.5,0\n", "no column 'lbl' for label_column \\(the file has no header\\)"),
        (
            "gaps.npz",
            {"X": np.array([[0.0, np.nan], [np.inf, 1.0], [2.0, 3.0]])},
            "2 feature values of its train split are NaN",
        ),
        ("nan.csv", "f1,f2\n0.5,nan\n1.5,2\n", "1 feature values of its train split are NaN or Inf"),
        ("empty.npz", {"X": np.zeros((0, 4))}, r"no samples in its train split \(shape \(0, 4\)\)"),
        ("capital.npz", {"X": np.zeros((2, 2)), "Y": np.zeros(2)}, r"labels must be named 'y' \(found Y beside 'X'\)"),
        ("header_only.csv", "f1,f2\n", "no samples in its train split"),
        ("halves.npz", {"X": np.zeros((2, 2)), "y": np.array([0.0, 1.5])}, "labels must be whole numbers .* found 1.5"),
        ("folder", "folder", "is a folder: name a .npz, .npy or .csv file"),
        ("no_features.npz", {"X": np.zeros((3, 0))}, r"no features in its train split \(shape \(3, 0\)\)"),
        (
            "words.npz",
            {"X": np.zeros((2, 2)), "y": np.array(["cat", "dog"])},
            "labels must be whole numbers .* found <U3 values",
        ),
    ],
)
def test_array_file_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    elif content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match) as err:
        ArrayFile(str(path), label_column="lbl" if name in ("table.csv", "plain.csv") else None).splits  # noqa: B018
    assert "\n" not in str(err.value)


def test_array_file_csv_label_column_out_of_range_or_from_the_end(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("0.5,1\n1.5,0\n")
    with pytest.raises(DataError, match="label_column 2 is outside the file's 2 columns"):
        ArrayFile(str(path), label_column="2").splits  # noqa: B018
    short = tmp_path / "short.csv"  # the header names a label column the rows lack
    short.write_text("f1,f2,label\n0.5,1\n")
    with pytest.raises(DataError, match="the header names 3 columns, the rows hold 2"):
        ArrayFile(str(short), label_column="label").splits  # noqa: B018
    x, y = ArrayFile(str(path), label_column="-1").splits["train"]
    assert x.tolist() == [[0.5], [1.5]]
    assert y.tolist() == [1, 0]


def test_array_file_csv_warns_of_a_label_column_read_as_a_feature(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("f1,Label\n0.5,1\n1.5,0\n")
    with pytest.warns(
        UserWarning, match="column 'Label' is read as a feature; if it holds labels, set label_column: Label"
    ):
        x, y = ArrayFile(str(path)).splits["train"]
    assert x.shape == (2, 2)
    assert y is None


def test_array_file_one_dimensional_x_is_one_feature(tmp_path):
    np.savez(tmp_path / "one.npz", X=np.arange(5.0), y=np.arange(5) % 2)
    dm = ArrayFile(str(tmp_path / "one.npz"))
    assert dm.input_shape == (1,)
    assert dm.splits["train"][0][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def _write_images(folder, sizes_by_class):
    for cls, sizes in sizes_by_class.items():
        (folder / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            img = torch.full((3, h, w), 40 * i, dtype=torch.uint8)
            img[0] = 200 if cls == "cat" else 10
            write_png(img, str(folder / cls / f"{i}.png"))


def test_image_folder_with_class_subfolders(tmp_path):
    _write_images(tmp_path, {"dog": [(5, 5)] * 2, "cat": [(5, 5)] * 3})
    dm = ImageFolder(str(tmp_path), batch_size=2)
    x, y = dm.splits["train"]
    assert x.dtype == torch.uint8
    assert x.shape == (5, 3, 5, 5)
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1]  # sorted class names: cat = 0, dog = 1
    assert (x[y == 0][:, 0] == 200).all()
    assert (x[y == 1][:, 0] == 10).all()
    assert dm.class_names == ["cat", "dog"]
    gray = ImageFolder(str(tmp_path), grayscale=True, image_size=3)
    assert gray.input_shape == (1, 3, 3)


def test_image_folder_reads_webp_and_gif_in_the_channels_asked(tmp_path):
    (tmp_path / "a").mkdir()
    rgba = np.zeros((5, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    write_png(torch.full((1, 5, 5), 7, dtype=torch.uint8), str(tmp_path / "a" / "0.png"))
    Image.fromarray(rgba).save(tmp_path / "a" / "1.webp", lossless=True)
    frames = [Image.fromarray(np.full((5, 5, 3), v, dtype=np.uint8)) for v in (30, 90)]
    frames[0].save(tmp_path / "a" / "2.gif", save_all=True, append_images=frames[1:])  # animated
    gray = ImageFolder(str(tmp_path), grayscale=True).splits["train"][0]
    assert gray.shape == (3, 1, 5, 5)
    assert gray[1].float().mean() == pytest.approx(0.299 * 200, abs=1)  # the red WebP, as luma
    assert gray[2].float().mean() == pytest.approx(30, abs=2)  # the GIF's first frame
    colour = ImageFolder(str(tmp_path)).splits["train"][0]
    assert colour.shape == (3, 3, 5, 5)  # the alpha channel dropped
    assert colour[1, 0].float().mean() == 200


def test_image_folder_skips_hidden_files_and_names_an_undecodable_image(tmp_path):
    _write_images(tmp_path, {"cat": [(5, 5)] * 2})
    for junk in ("__MACOSX/cat/._0.png", ".ipynb_checkpoints/0.png", "cat/._1.png"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_bytes(b"not an image")
    dm = ImageFolder(str(tmp_path))
    assert dm.sample_names() == ["cat/0.png", "cat/1.png"]
    assert dm.class_names == ["cat"]
    (tmp_path / "cat" / "2.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=r"cat/2.png: cannot decode this image") as err:
        ImageFolder(str(tmp_path)).splits  # noqa: B018
    assert "\n" not in str(err.value)
    assert ".cpp" not in str(err.value)  # torchvision's message, without its C++ source location


def test_image_folder_warns_of_files_it_cannot_read(tmp_path):
    _write_images(tmp_path, {"cat": [(5, 5)] * 2})
    (tmp_path / "cat" / "3.tif").write_bytes(b"II*\x00")
    with pytest.warns(UserWarning, match=r"1 files are not .* images and are left out \(e.g. cat/3.tif\)"):
        assert ImageFolder(str(tmp_path)).n_train == 2


def test_image_folder_without_classes_and_size_errors(tmp_path):
    for i in range(2):
        write_png(torch.zeros(1, 4, 4 + i, dtype=torch.uint8), str(tmp_path / f"{i}.png"))
    with pytest.raises(DataError, match="differ in size"):
        ImageFolder(str(tmp_path)).splits  # noqa: B018
    dm = ImageFolder(str(tmp_path), image_size=4, grayscale=True)
    assert dm.splits["train"][1] is None
    assert dm.n_train == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolder(str(tmp_path / "empty")).splits  # noqa: B018


def test_image_folder_classes_are_the_top_folders_and_16_bit_images_are_scaled(tmp_path):
    for cls, value in (("cat", 65535), ("dog", 257)):  # 16-bit, as X-ray PNGs often are
        for patient in ("p1", "p2"):
            (tmp_path / cls / patient).mkdir(parents=True)
            write_png(torch.full((1, 4, 4), 0, dtype=torch.uint8), str(tmp_path / cls / patient / "8bit.png"))
            Image.fromarray(np.full((4, 4), value, dtype=np.uint16)).save(tmp_path / cls / patient / "16bit.png")
    dm = ImageFolder(str(tmp_path), grayscale=True)
    x, y = dm.splits["train"]
    names = dm.sample_names()
    assert y.tolist() == [int(n.startswith("dog")) for n in names] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert x.dtype == torch.uint8
    assert [int(x[i].max()) for i, n in enumerate(names) if n.endswith("16bit.png")] == [255, 255, 1, 1]


def test_image_folder_with_images_beside_class_subfolders_is_a_one_line_error(tmp_path):
    _write_images(tmp_path, {"cat": [(5, 5)]})
    write_png(torch.zeros(3, 5, 5, dtype=torch.uint8), str(tmp_path / "loose.png"))
    with pytest.raises(DataError, match=r"both in class sub-folders and at the top \(loose.png\)"):
        ImageFolder(str(tmp_path)).splits  # noqa: B018


def test_multi_label_or_3d_medmnist_sets_are_one_line_errors(tmp_path):
    import medmnist

    imgs = np.zeros((4, 28, 28), dtype=np.uint8)
    np.savez(
        tmp_path / "chestmnist.npz",
        **{f"{s}_images": imgs for s in ("train", "val", "test")},
        **{f"{s}_labels": np.zeros((4, 14), dtype=np.uint8) for s in ("train", "val", "test")},
    )
    assert "chestmnist" in medmnist.INFO
    with pytest.raises(DataError, match=r"chestmnist: images \(28, 28\) with labels \(14,\) per image") as err:
        MedMNIST(flag="chestmnist", data_dir=str(tmp_path), download=False).splits  # noqa: B018
    assert "\n" not in str(err.value)


def test_image_folder_missing(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        ImageFolder(str(tmp_path / "nope")).splits  # noqa: B018


# -- embedded and synthetic sets --------------------------------------------------------------


def test_digits_embedded():
    dm = Digits()
    assert dm.n_train == 1797
    assert dm.input_shape == (1, 8, 8)
    assert dm.n_classes == 10
    assert float(dm.features().min()) >= 0.0
    assert float(dm.features().max()) <= 1.0


def test_five_gaussians_bayes_assignment_has_the_designed_overlap():
    """Nearest true mean (equal priors, identity covariance) in the raw space. The generator
    standardises X; its population scale is sqrt(r^2 / 2 + 1) on both axes, its mean 0."""
    x, y, means = five_gaussians(seed=0)
    assert x.shape == (2000, 2)
    assert means.shape == (5, 2)
    assert np.bincount(y).tolist() == [400] * 5
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-5)
    raw = x * math.sqrt(FIVE_GAUSSIANS_RADIUS**2 / 2 + 1)
    bayes = ((raw[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert 0.85 <= adjusted_rand_score(y, bayes) <= 0.90
    dm = FiveGaussians()
    assert dm.n_train == 2000
    assert dm.input_shape == (2,)
    assert dm.n_classes == 5


def test_blobs():
    dm = Blobs(n_samples=50, n_features=3, centers=4)
    assert dm.n_train == 50
    assert dm.input_shape == (3,)
    assert dm.n_classes == 4


# -- registry and offline errors --------------------------------------------------------------


def test_get_datamodule():  # an unknown name: tests/test_bad_input.py
    assert isinstance(get_datamodule("digits", batch_size=7), Digits)
    assert get_datamodule("digits", batch_size=7).batch_size == 7


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (MNIST, "MNIST/raw/train-images-idx3-ubyte"),
        (PneumoniaMNIST, "pneumoniamnist.npz"),
        (USPS, "usps/usps.npz"),
        (Pendigits, "pendigits/pendigits.tra"),
        (CIFAR100, "cifar-100-python/train"),
    ],
)
def test_missing_data_offline_is_one_line_naming_files_and_folder(tmp_path, cls, expected):
    dm = cls(data_dir=str(tmp_path / "empty"), download=False)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert "\n" not in message
    assert "download failed" not in message  # none was tried
    assert expected in message
    assert str(tmp_path / "empty") in message


def test_a_failed_download_does_not_advise_allowing_it(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    with pytest.raises(DataError) as err:
        Pendigits(data_dir=str(tmp_path), download=True).prepare_data()
    assert "download failed: OSError: network unreachable" in str(err.value)
    assert "allow the download" not in str(err.value)


def test_a_malformed_pendigits_file_is_named(tmp_path):
    (tmp_path / "pendigits").mkdir()
    for name in ("pendigits.tra", "pendigits.tes"):
        (tmp_path / "pendigits" / name).write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match=r"pendigits.tra has 3 columns, expected 16 features and a label"):
        Pendigits(data_dir=str(tmp_path), download=False).prepare_data()


def test_medmnist_test_split_is_checked():
    with pytest.raises(DataError, match="test_split must be 'test' or 'val\\+test', got 'valtest'"):
        MedMNIST(test_split="valtest")


def test_fit_on_all_holds_the_data_once(two_splits):
    dm = TwoSplits(*two_splits, fit_on="all")
    whole = dm.features("fit")  # builds the concatenation
    x_all = dm.train_dataloader().dataset.x
    for name, (x, y) in dm.splits.items():  # each split is a view of it, with its own values
        assert x.untyped_storage().data_ptr() == x_all.untyped_storage().data_ptr()
        assert torch.equal(x, two_splits[name == "test"][0])
        assert torch.equal(y, two_splits[name == "test"][1])
    assert len(whole) == 30


# -- the offline copies in ../shared/data ------------------------------------------------------


@pytest.mark.data
def test_mnist_from_shared_data(shared_data):
    dm = MNIST(data_dir=str(shared_data), download=False, fit_on="all")
    x, _ = dm.splits["train"]
    assert x.dtype == torch.uint8  # images stay uint8 in memory
    assert dm.n_train == 70000
    assert dm.n_of("eval") == 70000
    assert dm.input_shape == (1, 28, 28)
    assert dm.n_classes == 10
    assert MNIST(data_dir=str(shared_data), download=False, fit_on="train").n_train == 60000


@pytest.mark.data
def test_mnist_through_the_environment(shared_data, monkeypatch):
    monkeypatch.setenv("PROTOS_DATA_DIR", str(shared_data))
    assert MNIST(download=False, fit_on="train", flatten=True).input_shape == (784,)


@pytest.mark.data
def test_pneumoniamnist_from_shared_data(shared_data):
    dm = PneumoniaMNIST(data_dir=str(shared_data), download=False, fit_on="all")
    assert dm.n_train == 5856
    assert dm.input_shape == (1, 28, 28)
    assert dm.n_classes == 2
    on_train = PneumoniaMNIST(data_dir=str(shared_data), download=False, fit_on="train")
    assert on_train.n_of("eval") == 1148  # val + test, as in VAESim


@pytest.mark.data
def test_pneumoniamnist_present_is_read_without_a_download(shared_data, monkeypatch):
    # the offline copy is rebuilt (its checksum is not the official one): download=True must
    # not fetch it again, which fails offline
    import medmnist.dataset

    def no_network(self):
        raise RuntimeError("download attempted")

    monkeypatch.setattr(medmnist.dataset.MedMNIST, "download", no_network)
    assert PneumoniaMNIST(data_dir=str(shared_data), download=True, fit_on="all").n_train == 5856


@pytest.mark.data
def test_usps_from_shared_data(shared_data):
    dm = USPS(data_dir=str(shared_data), download=False)
    assert dm.n_train == 7291 + 2007
    assert dm.input_shape == (1, 16, 16)
    assert dm.n_classes == 10
    f = dm.features()
    assert float(f.min()) >= 0.0
    assert float(f.max()) <= 1.0


@pytest.mark.data
def test_pendigits_from_shared_data(shared_data):
    dm = Pendigits(data_dir=str(shared_data), download=False)
    assert dm.n_train == 7494 + 3498
    assert dm.input_shape == (16,)
    assert dm.n_classes == 10
    assert float(dm.features().max()) <= 1.0


@pytest.mark.data
def test_fit_on_all_concatenates_once_and_shares_the_tensors(shared_data):
    dm = Pendigits(fit_on="all", data_dir=str(shared_data), download=False)
    train, evaluation = dm.train_dataloader().dataset.x, dm.val_dataloader().dataset.x
    assert train.data_ptr() == evaluation.data_ptr()  # one copy of the 10,992 rows, not two
    assert dm.n_train == len(train) == 10992


def test_an_evaluation_split_smaller_than_the_processes_is_refused_in_one_line():
    """Under DDP each process evaluates its own shard; with fewer samples than processes one
    would have none, skip the loop and leave the others waiting in the evaluators' gathers."""
    from types import SimpleNamespace

    from lightning_protos.errors import ProtosError

    x = torch.zeros(3, 2)
    dm = TwoSplits((x, torch.tensor([0, 1, 0])), batch_size=2)
    dm.setup("fit")
    for world, refused in ((3, False), (4, True)):
        dm.trainer = SimpleNamespace(world_size=world, global_rank=0)
        if refused:
            with pytest.raises(ProtosError, match="the eval split has 3 samples, fewer than the 4 processes"):
                dm.val_dataloader()
        else:
            assert sum(len(b["x"]) for b in dm.val_dataloader()) == 1  # this rank's one sample
