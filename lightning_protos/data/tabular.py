"""Tabular data: UCI Pendigits, and users' own arrays, CSV files and image folders."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .base import ArrayDataModule, DataError, channels_first, class_indices, from_numpy

# header names that usually hold labels: read as features unless label_column says so, with a warning
LABEL_NAMES = ("label", "labels", "y", "target", "class")
# a CSV's missing values: a first line holding them and numbers is data, not a header
MISSING = ("", "na", "nan", "n/a", "null", "none", "?")
# the name pandas and R give the row-number column they write by default
INDEX_NAMES = ("", "unnamed: 0")

PENDIGITS_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/pendigits/"


class Pendigits(ArrayDataModule):
    """UCI Pen-Based Recognition of Handwritten Digits: 16 features scaled to [0, 1].

    7,494 train + 3,498 test rows; features divided by 100 as in the AE-CM code.
    """

    name = "pendigits"

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        folder = self.root / "pendigits"
        files = {"train": folder / "pendigits.tra", "test": folder / "pendigits.tes"}
        if self.download and not all(f.exists() for f in files.values()):
            from torchvision.datasets.utils import download_url

            try:
                for f in files.values():
                    download_url(PENDIGITS_URL + f.name, str(folder))
            except Exception as err:
                raise self.missing_files([f"pendigits/{f.name}" for f in files.values()], err) from None
        out = {}
        for split, f in files.items():
            if not f.exists():
                raise self.missing_files([f"pendigits/{g.name}" for g in files.values()])
            a = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
            if a.shape[1] != 17:
                raise DataError(f"pendigits: {f} has {a.shape[1]} columns, expected 16 features and a label")
            out[split] = (torch.as_tensor(a[:, :16] / 100.0, dtype=torch.float32), torch.as_tensor(a[:, 16]))
        return out


class ArrayFile(ArrayDataModule):
    """A user's data from one file, read once into memory; a config needs only the path.

    * ``.npz``: array ``X`` (any shape ``(N, ...)``) and optional labels ``y``; images
      ``(N, H, W)`` and channels-last ``(N, H, W, C)`` are read as ``(N, C, H, W)``;
    * ``.npy``: the array ``X`` alone;
    * ``.csv``: one row per sample of numeric features; ``label_column`` names an optional
      label column; a header line is detected (or set by ``header``); a first column named
      ``""`` or ``Unnamed: 0`` (the row numbers pandas and R write) is dropped, with a warning.

    Labels that are not 0..C-1 (say 1..10) are mapped to them in sorted order, and
    ``class_names`` keeps their values (``predict`` writes them as ``label_name``).

    Args:
        path: the file.
        label_column: CSV column holding labels: its header name, or its 0-based index.
        header: whether the CSV's first line names its columns; ``None``: a first line that is
            not all numbers does (a header of numbers, as pandas writes ``0,1,2``, needs ``true``).
        **kwargs: see :class:`ArrayDataModule`.
    """

    def __init__(self, path: str, label_column: str | int | None = None, header: bool | None = None, **kwargs) -> None:
        kwargs.setdefault("download", False)
        super().__init__(**kwargs)
        self.path, self.label_column, self.header = Path(path).expanduser(), label_column, header
        self.name = self.path.stem

    def load(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise DataError(f"{self.path} is a folder: name a .npz, .npy or .csv file, or read images with ImageFolder")
        suffix = self.path.suffix.lower()
        if suffix == ".npz":
            d = np.load(self.path)
            if "X" not in d:
                raise DataError(f"{self.path}: expected an array named 'X' (and optionally 'y'), found {list(d)}")
            other = [k for k in d if k != "X"]
            if "y" not in d and other:  # 'Y', 'labels': refused, not silently read as unlabelled
                raise DataError(f"{self.path}: labels must be named 'y' (found {', '.join(other)} beside 'X')")
            x, y = d["X"], d.get("y")
        elif suffix == ".npy":
            x, y = np.load(self.path), None
        elif suffix == ".csv":
            x, y = self._read_csv()
        else:
            raise DataError(f"{self.path}: unsupported file type {suffix!r}; use .npz, .npy or .csv")
        if x.dtype.byteorder == ">":  # big-endian, as some instruments write: torch reads native order only
            x = x.astype(x.dtype.newbyteorder("="))
        if x.ndim == 1:  # one feature per sample
            x = x[:, None]
        xt = channels_first(from_numpy(x))
        if y is not None:
            y = np.asarray(y).reshape(-1)
            if y.dtype.kind not in "iubf":
                raise DataError(f"{self.path}: labels must be whole numbers (class indices), found {y.dtype} values")
            if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):  # NaN fails too
                raise DataError(
                    f"{self.path}: labels must be whole numbers (class indices), found {y[y != np.round(y)][0]}"
                )
        yt = None if y is None else torch.as_tensor(y, dtype=torch.long)
        if yt is not None and len(yt) != len(xt):
            raise DataError(f"{self.path}: {len(xt)} samples but {len(yt)} labels")
        if yt is not None and len(yt) and int(yt.min()) < 0:
            raise DataError(f"{self.path}: labels must be >= 0, found {int(yt.min())}; leave y out if unlabelled")
        if yt is not None:
            index, self.class_names = class_indices(yt.numpy())
            yt = torch.as_tensor(index, dtype=torch.long)
        return {"train": (xt, yt)}

    def _read_csv(self) -> tuple[np.ndarray, np.ndarray | None]:
        with open(self.path, encoding="utf-8-sig", newline="") as f:  # -sig: a spreadsheet's byte-order mark
            first = [v.strip() for v in next(csv.reader(f), [])]  # the csv reader unquotes "a","b"
        names = self.header
        if names is None:  # a header names a column: a field neither a number nor a missing value
            names = any(v.lower() not in MISSING and not _is_number(v) for v in first)
        header = first if names else None
        try:
            a = np.loadtxt(
                self.path, delimiter=",", skiprows=1 if names else 0, dtype=np.float64, ndmin=2, encoding="utf-8-sig"
            )
        except ValueError as err:  # NumPy's reason, without its advice on its own arguments
            reason = str(err).splitlines()[0].split("; use `usecols`")[0]
            raise DataError(f"{self.path}: expected numbers only, as many in every row (NumPy: {reason})") from None
        # label_column counts the file's columns, the row numbers' included
        col = None if self.label_column is None else self._label_index(header, a.shape[1])
        y = None if col is None else a[:, col]
        drop = [] if col is None else [col]
        if header and len(header) == a.shape[1] > 1 and header[0].lower() in INDEX_NAMES and col != 0:
            rank_zero_warn(f"{self.path}: its first column, named {header[0]!r}, is read as row numbers and dropped")
            drop.append(0)
        if col is None:
            kept = [h for i, h in enumerate(header or []) if i not in drop]
            labels_like = [h for h in kept if h.lower() in LABEL_NAMES]
            if labels_like:
                rank_zero_warn(
                    f"{self.path}: column {labels_like[0]!r} is read as a feature; if it holds labels, "
                    f"set label_column: {labels_like[0]}"
                )
        return np.delete(a, drop, axis=1).astype(np.float32), y

    def _label_index(self, header: list[str] | None, n_columns: int) -> int:
        """The position of ``label_column``: its name in the header, else a 0-based index."""
        if header and len(header) != n_columns:
            raise DataError(f"{self.path}: the header names {len(header)} columns, the rows hold {n_columns}")
        if header and str(self.label_column) in header:  # a YAML index is an int, a header name a str
            return header.index(str(self.label_column))
        try:
            col = int(self.label_column)
        except ValueError:
            found = f"the header names {', '.join(header)}" if header else "the file has no header"
            raise DataError(f"{self.path}: no column {self.label_column!r} for label_column ({found})") from None
        if not -n_columns <= col < n_columns:
            raise DataError(f"{self.path}: label_column {col} is outside the file's {n_columns} columns")
        return col % n_columns


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def hidden(name: str) -> bool:
    """A file or folder that holds no user images: ``.ipynb_checkpoints``, macOS's
    ``__MACOSX`` and ``._x.png`` copies."""
    return name.startswith(".") or name == "__MACOSX"


class ImageFolder(ArrayDataModule):
    """A folder of images (optionally in class sub-folders), decoded once into ``uint8``.

    Args:
        path: the folder; ``path/<class>/<image>`` gives labels in sorted class order
            (case-sensitive: ``Pneumonia`` = 0 before ``normal`` = 1; ``class_names`` lists
            them and ``predict`` writes each image's as ``label_name``). Hidden files and
            folders (``.x``, ``__MACOSX``) are skipped.
        image_size: resize every image to this square size (required if sizes differ).
        grayscale: convert to one channel.
        **kwargs: see :class:`ArrayDataModule`.
    """

    EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif")  # what torchvision's decode_image reads

    def __init__(self, path: str, image_size: int | None = None, grayscale: bool = False, **kwargs) -> None:
        kwargs.setdefault("download", False)
        super().__init__(**kwargs)
        if image_size is not None and image_size < 1:
            raise DataError(f"image_size must be >= 1 (or unset: no resizing), got {image_size}")
        self.path, self.image_size, self.grayscale = Path(path).expanduser(), image_size, grayscale
        self.name = self.path.name
        self._names: list[str] = []

    def load(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2.functional import resize, rgb_to_grayscale, to_dtype

        if not self.path.is_dir():
            raise DataError(f"{self.path}: no such folder")
        found = sorted(
            p
            for p in self.path.rglob("*")
            if p.is_file() and not any(hidden(part) for part in p.relative_to(self.path).parts)
        )
        files = [p for p in found if p.suffix.lower() in self.EXTENSIONS]
        if not files:
            raise DataError(f"{self.path}: no images ({', '.join(self.EXTENSIONS)}) found")
        if skipped := [p for p in found if p.suffix.lower() not in self.EXTENSIONS]:  # .tif, .bmp, .dcm, notes
            rank_zero_warn(
                f"{self.path}: {len(skipped)} files are not {', '.join(self.EXTENSIONS)} images and are left out "
                f"(e.g. {skipped[0].relative_to(self.path).as_posix()}): convert any images among them"
            )
        # the class is the top folder (cat/2020/x.png is a cat), so patients' sub-folders may stay
        top = [p.relative_to(self.path).parts for p in files]
        classes = sorted({parts[0] for parts in top if len(parts) > 1})
        if classes and any(len(parts) == 1 for parts in top):
            loose = next(parts[0] for parts in top if len(parts) == 1)
            where = "both in class sub-folders and at the top"
            raise DataError(f"{self.path}: images {where} ({loose}): put every image in a class folder")
        mode = ImageReadMode.GRAY if self.grayscale else ImageReadMode.RGB
        images = []
        for p in files:
            try:
                # WebP and GIF decode in colour whatever the mode (converted below)
                img = decode_image(str(p), mode=ImageReadMode.RGB if p.suffix.lower() in (".webp", ".gif") else mode)
            except (RuntimeError, OSError) as err:
                # torchvision's C++ errors start "function, source-file:line, ": the message follows
                cause = re.sub(r"^\w+, \S+:\d+, ", "", (str(err).splitlines() or [""])[0])
                raise DataError(f"{p}: cannot decode this image ({cause}); remove or convert it") from None
            if img.dtype != torch.uint8:  # 16-bit PNGs (X-rays often are): scaled to 0-255
                img = to_dtype(img, torch.uint8, scale=True)
            if img.ndim == 4:  # an animated GIF: its first frame
                img = img[0]
            img = img[:3]  # an alpha channel dropped
            if self.grayscale and len(img) == 3:
                img = rgb_to_grayscale(img)
            elif not self.grayscale and len(img) == 1:
                img = img.expand(3, -1, -1)
            if self.image_size:
                img = resize(img, [self.image_size, self.image_size], antialias=True)
            images.append(img)
        if len({tuple(i.shape) for i in images}) > 1:
            raise DataError(f"{self.path}: images differ in size; set image_size")
        y = torch.tensor([classes.index(parts[0]) for parts in top]) if classes else None
        self._names = [p.relative_to(self.path).as_posix() for p in files]
        self.class_names = classes or None
        return {"train": (torch.stack(images), y)}

    def sample_names(self, stage: str = "eval") -> list[str]:
        """Each image's path relative to the folder, in sample order (one split: any stage)."""
        self.splits  # noqa: B018
        return self._names
