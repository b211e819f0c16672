"""Offline datasets, deterministic given a seed, and the loader that batches them.

Nothing here touches the network. ``gaussian_regression`` needs only torch; ``digits`` uses the copy of the
UCI digits that ships inside scikit-learn, ``mnist1d`` runs the ``mnist1d`` package's own generator, and
``text`` reads the Python standard library's source files. The optional packages are imported inside the
functions (``pip install "alphalib[data]"``).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

PRINTABLE = "\n" + "".join(chr(c) for c in range(32, 127))
"""The characters :func:`text` keeps: newline and printable ASCII."""

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Split:
    """A train/validation pair of datasets with what a model needs to know about them.

    ``input_shape`` is the shape of one input (no batch dimension); ``vocab`` is the character table of
    :func:`text` (token id ``i`` is ``vocab[i]``) and empty for the other datasets.
    """

    train: TensorDataset
    val: TensorDataset
    n_classes: int
    input_shape: tuple[int, ...]
    vocab: str = ""

    def decode(self, ids: Tensor) -> str:
        """Return the text that a 1-D tensor of token ids spells (text datasets only)."""
        if not self.vocab:
            raise ValueError("decode needs a text split (one with a vocab).")
        return "".join(self.vocab[i] for i in ids.tolist())


def gaussian_regression(n: int = 1000, d_in: int = 10, d_out: int = 1, *, seed: int = 0) -> TensorDataset:
    r"""Return the seed experiment's data: inputs and targets drawn i.i.d. from :math:`\mathcal N(0, 1)`.

    The targets are independent of the inputs: there is nothing to learn beyond their mean.

    Args:
        n: The number of samples.
        d_in: The inputs' dimension.
        d_out: The targets' dimension.
        seed: Seeds the generator the inputs, then the targets, are drawn from.

    Returns:
        A ``TensorDataset`` of inputs ``(n, d_in)`` and targets ``(n, d_out)`` (torch's default dtype).

    Example:
        >>> x, y = gaussian_regression(n=8, d_in=3).tensors
        >>> x.shape, y.shape
        (torch.Size([8, 3]), torch.Size([8, 1]))
    """
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d_in, generator=gen), torch.randn(n, d_out, generator=gen))


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Return a loader over ``dataset`` in batches of ``batch_size``, reproducible in its order.

    Args:
        dataset: A map-style dataset (a ``TensorDataset``).
        batch_size: The size of each batch (the last one may be smaller).
        shuffle: Draw the samples in a new random order every epoch, instead of in order.
        seed: Seeds the shuffling's generator, so that the sequence of orders is reproducible.

    Returns:
        A ``DataLoader`` yielding the dataset's tensors batched, e.g. ``(inputs, targets)`` pairs.

    Example:
        >>> [x.shape[0] for x, y in loader(gaussian_regression(n=10), 4)]
        [4, 4, 2]
    """
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)


def digits(*, seed: int = 0, val_fraction: float = 0.2, flat: bool = True) -> Split:
    """Return scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), split at random.

    Inputs are float32 pixel intensities divided by 16, so in ``[0, 1]`` (not standardized); shape
    ``(N, 64)`` with ``flat=True``, ``(N, 1, 8, 8)`` for a CNN with ``flat=False``. Targets are int64 class
    ids. A permutation seeded by ``seed`` sends ``round(val_fraction * 1797)`` images to ``val``.

    Example:
        >>> s = digits(flat=False)
        >>> len(s.train), len(s.val), s.train.tensors[0].shape[1:], s.n_classes
        (1438, 359, torch.Size([1, 8, 8]), 10)
    """
    _check_fraction(val_fraction)
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise _missing("scikit-learn", "digits") from exc
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    shape = (64,) if flat else (1, 8, 8)
    x = x.reshape(-1, *shape)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, val = _split(x[perm], y[perm], val_fraction)
    return Split(train, val, n_classes=10, input_shape=shape)


def mnist1d(*, seed: int = 0, n: int = 4000, val_fraction: float = 0.2) -> Split:
    """Return ``n`` MNIST-1D sequences made by the ``mnist1d`` package's generator (never its download).

    Inputs are float32 of shape ``(N, 40)``, standardized by the generator over the whole dataset (mean 0,
    standard deviation 1); targets are int64 class ids in ``0..9``. The generator makes ``n // 10`` samples
    per class (so ``N = 10 * (n // 10)``) in an order shuffled by ``seed``; the last
    ``round(val_fraction * N)`` of them form ``val``. The generator seeds Python's and NumPy's global
    random generators; their states are restored afterwards.

    Example:
        >>> s = mnist1d(n=100)
        >>> len(s.train), len(s.val), s.input_shape
        (80, 20, (40,))
    """
    _check_fraction(val_fraction)
    if n < 10:
        raise ValueError(f"mnist1d makes n // 10 samples per class; n must be at least 10, got {n}.")
    try:
        import numpy as np
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise _missing("mnist1d", "mnist1d") from exc
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = n, seed, 1.0
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = torch.as_tensor(data["x"], dtype=torch.float32)
    y = torch.as_tensor(data["y"], dtype=torch.int64)
    train, val = _split(x, y, val_fraction)
    return Split(train, val, n_classes=10, input_shape=(x.shape[1],))


def text(*, seed: int = 0, block: int = 64, n_chars: int = 200_000, val_fraction: float = 0.1) -> Split:
    """Return next-character prediction on the Python standard library's own source code.

    Reads the ``.py`` files under the standard library's directory in sorted order (skipping
    ``site-packages`` and test directories), turns tabs into four spaces, drops every character that is not
    printable ASCII or a newline, and keeps the first ``n_chars`` characters. ``vocab`` is the sorted set of
    characters seen; token id ``i`` stands for ``vocab[i]``. The text is cut into non-overlapping windows of
    ``block + 1`` ids (consecutive windows share one id) starting at an offset in ``[0, block)`` drawn from
    ``seed``: inputs ``(N, block)`` int64 are a window's first ``block`` ids, targets ``(N, block)`` int64 its
    last ``block`` (the next character at every position). The last ``round(val_fraction * N)`` windows, a
    contiguous stretch at the end of the text, form ``val``; the training windows come in an order shuffled
    by ``seed``. Deterministic for a given Python version and ``seed``.

    Example:
        >>> s = text(n_chars=10_000, block=32)
        >>> x, y = s.train[0]
        >>> x.shape, y.shape, s.decode(x[1:]) == s.decode(y[:-1])
        (torch.Size([32]), torch.Size([32]), True)
    """
    _check_fraction(val_fraction)
    if block < 1:
        raise ValueError(f"block must be a positive integer, got {block}.")
    corpus = _stdlib_text(n_chars)
    if len(corpus) < 2 * block + 1:
        raise ValueError(f"found only {len(corpus)} characters of source, too few for block={block}.")
    vocab = "".join(sorted(set(corpus)))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in corpus], dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(block, (1,), generator=gen))
    n = (len(ids) - 1 - offset) // block
    starts = offset + block * torch.arange(n)
    windows = ids[starts[:, None] + torch.arange(block + 1)]
    x, y = windows[:, :-1], windows[:, 1:]
    n_val = round(val_fraction * n)
    perm = torch.randperm(n - n_val, generator=gen)
    train = TensorDataset(x[: n - n_val][perm], y[: n - n_val][perm])
    val = TensorDataset(x[n - n_val :], y[n - n_val :])
    return Split(train, val, n_classes=len(vocab), input_shape=(block,), vocab=vocab)


def _stdlib_text(n_chars: int) -> str:
    """Return the first ``n_chars`` cleaned characters of the standard library's ``.py`` files."""
    keep = set(PRINTABLE)
    pieces: list[str] = []
    total = 0
    for path in _stdlib_files(Path(os.path.dirname(os.__file__))):
        raw = path.read_text(encoding="utf-8", errors="ignore")
        clean = "".join(c for c in raw.replace("\r\n", "\n").replace("\t", "    ") if c in keep)
        pieces.append(clean[: n_chars - total])
        total += len(pieces[-1])
        if total >= n_chars:
            break
    return "".join(pieces)


def _stdlib_files(root: Path):
    """Yield the ``.py`` files under ``root``, top-down, each directory's files before its subdirectories."""
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(here) / name


def _split(x: Tensor, y: Tensor, val_fraction: float) -> tuple[TensorDataset, TensorDataset]:
    """Return the first ``N - round(val_fraction * N)`` pairs as train, the rest as validation."""
    n_train = len(y) - round(val_fraction * len(y))
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}.")


def _missing(package: str, function: str) -> ImportError:
    return ImportError(
        f"alphalib.data.{function}() needs the optional package {package!r}; "
        f'install it with: pip install "alphalib[data]"  (or: pip install {package})'
    )
