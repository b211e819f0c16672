"""The reference problems: disjoint data, drawn from the seed, models that fit it."""

from __future__ import annotations

import pytest
import torch

import alphalib
from alphalib import data


def _rows(dataset) -> set[bytes]:
    return {row.numpy().tobytes() for row in dataset.tensors[0]}


@pytest.mark.parametrize("name", alphalib.PROBLEMS)
def test_problems_have_disjoint_sets_a_model_that_fits_and_a_seed(name):
    p = alphalib.problem(name, seed=1)
    train, alpha, val = (_rows(s) for s in (p.train, p.alpha, p.val))
    assert train and alpha and val and not train & alpha and not train & val and not alpha & val
    x, y = p.val.tensors[0][:4], p.val.tensors[1][:4]
    assert torch.isfinite(p.loss_fn(p.model()(x), y))
    again, other = alphalib.problem(name, seed=1), alphalib.problem(name, seed=2)
    assert torch.equal(again.train.tensors[0], p.train.tensors[0])
    assert not torch.equal(other.train.tensors[0], p.train.tensors[0])


def test_held_out_halves_cover_the_split():
    split, p = data.digits(seed=0), alphalib.problem("digits MLP", seed=0)
    assert torch.equal(torch.cat([p.alpha.tensors[0], p.val.tensors[0]]), split.val.tensors[0])
    with pytest.raises(ValueError, match="unknown problem 'digits'.*digits MLP"):
        alphalib.problem("digits")
