"""The offline datasets: deterministic per seed, the documented shapes, dtypes, ranges and splits."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch

from alphalib import data
from alphalib.lab.data import Split


def tensors(split: Split) -> list[torch.Tensor]:
    return [*split.train.tensors, *split.val.tensors]


def same(a: Split, b: Split) -> bool:
    return all(torch.equal(s, t) for s, t in zip(tensors(a), tensors(b), strict=True))


# --- digits -----------------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_range_and_split():
    s = data.digits()
    (x, y), (xv, yv) = s.train.tensors, s.val.tensors
    assert (len(s.train), len(s.val)) == (1797 - 359, 359)
    assert x.shape == (1438, 64) and xv.shape == (359, 64) and s.input_shape == (64,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert s.n_classes == 10 and s.vocab == ""
    allx, ally = torch.cat([x, xv]), torch.cat([y, yv])
    assert allx.min() == 0.0 and allx.max() == 1.0
    assert set(ally.tolist()) == set(range(10))


def test_digits_seeded_and_image_layout():
    a, b, c = data.digits(seed=0), data.digits(seed=0), data.digits(seed=1)
    assert same(a, b)
    assert not torch.equal(a.train.tensors[1], c.train.tensors[1])
    img = data.digits(seed=0, flat=False, val_fraction=0.5)
    assert img.input_shape == (1, 8, 8) and img.train.tensors[0].shape[1:] == (1, 8, 8)
    assert len(img.train) + len(img.val) == 1797 and len(img.val) == round(0.5 * 1797)
    # the same seed permutes the same way, whatever the layout: the images are the flat rows reshaped
    flat = data.digits(seed=0, val_fraction=0.5)
    assert torch.equal(img.train.tensors[0].reshape(-1, 64), flat.train.tensors[0])


# --- mnist1d ----------------------------------------------------------------------------------------------


def test_mnist1d_default_shapes_and_dtypes():
    s = data.mnist1d()
    (x, y), (xv, yv) = s.train.tensors, s.val.tensors
    assert (len(s.train), len(s.val)) == (3200, 800)
    assert x.shape == (3200, 40) and xv.shape == (800, 40) and s.input_shape == (40,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert s.n_classes == 10 and set(torch.cat([y, yv]).tolist()) == set(range(10))
    allx = torch.cat([x, xv]).double()
    assert abs(allx.mean().item()) < 1e-4 and abs(allx.std().item() - 1) < 1e-3  # standardized


def test_mnist1d_seeded_and_sizes():
    a, b, c = data.mnist1d(n=300), data.mnist1d(n=300), data.mnist1d(n=300, seed=1)
    assert same(a, b)
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert len(a.train) + len(a.val) == 300 and len(a.val) == 60
    odd = data.mnist1d(n=305, val_fraction=0.1)  # n // 10 per class
    assert len(odd.train) + len(odd.val) == 300 and len(odd.val) == 30


def test_mnist1d_leaves_global_random_state_alone():
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    data.mnist1d(n=50)
    assert (np.random.rand(), random.random()) == expected


# --- text -------------------------------------------------------------------------------------------------


def test_text_shapes_shift_and_vocab():
    s = data.text()
    (x, y), (xv, yv) = s.train.tensors, s.val.tensors
    assert x.shape[1:] == (64,) and y.shape == x.shape and xv.shape[1:] == (64,) and s.input_shape == (64,)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    n = len(s.train) + len(s.val)
    assert (200_000 - 64) // 64 <= n <= (200_000 - 1) // 64  # non-overlapping windows from one offset
    assert len(s.val) == round(0.1 * n)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(xv[:, 1:], yv[:, :-1])
    assert list(s.vocab) == sorted(set(s.vocab)) and set(s.vocab) <= set(data.PRINTABLE)
    assert s.n_classes == len(s.vocab) and int(torch.cat([x, xv]).max()) < len(s.vocab)
    decoded = "".join(s.decode(w) for w in torch.cat([x, xv]))
    assert "def " in decoded and "import" in decoded and "\n" in decoded
    # validation windows are one contiguous stretch: each one starts where the previous one's target ends
    assert torch.equal(xv[1:, 0], yv[:-1, -1])


def test_text_seeded():
    a, b, c = data.text(n_chars=20_000), data.text(n_chars=20_000), data.text(n_chars=20_000, seed=1)
    assert same(a, b) and a.vocab == b.vocab
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_text_windows_are_stdlib_source():
    s = data.text(n_chars=20_000, block=32, val_fraction=0.25)
    corpus = data._stdlib_text(20_000)
    assert len(corpus) == 20_000
    with open(data.os.__file__.replace("os.py", "__future__.py"), encoding="utf-8") as f:
        assert corpus.startswith(f.read(200).replace("\t", "    "))
    for x, y in [*s.train, *s.val]:
        assert s.decode(x) + s.decode(y[-1:]) in corpus


# --- common -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module, function", [("sklearn.datasets", "digits"), ("mnist1d.data", "mnist1d")])
def test_missing_optional_package_names_it(monkeypatch, module, function):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=r"alphalib\[data\]") as info:
        getattr(data, function)()
    assert ("scikit-learn" if function == "digits" else "mnist1d") in str(info.value)


@pytest.mark.parametrize("function", [data.digits, data.mnist1d, data.text])
def test_bad_val_fraction_raises(function):
    with pytest.raises(ValueError, match="val_fraction"):
        function(val_fraction=1.0)


def test_split_is_frozen_and_decode_needs_vocab():
    s = Split(data.gaussian_regression(4), data.gaussian_regression(2), n_classes=0, input_shape=(10,))
    with pytest.raises(AttributeError):
        s.n_classes = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="vocab"):
        s.decode(torch.tensor([0]))
