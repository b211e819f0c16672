"""The reference models: structure, shapes, causality, the sequence loss, and probing the transformer."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import alphalib
from alphalib.lab.models import ACTIVATIONS, CharTransformer, SmallCNN, mlp, sequence_cross_entropy


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_mlp_structure_and_shape(name):
    model = mlp([5, 7, 6, 3], name)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Linear, ACTIVATIONS[name], nn.Linear, ACTIVATIONS[name], nn.Linear]
    assert [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)] == [(5, 7), (7, 6), (6, 3)]
    assert model(torch.randn(4, 5)).shape == (4, 3)


def test_mlp_single_layer_has_no_activation():
    model = mlp([4, 2])
    assert [type(m) for m in model] == [nn.Linear]


def test_mlp_rejects_unknown_activation_and_short_sizes():
    with pytest.raises(ValueError, match="swish") as info:
        mlp([3, 3], "swish")
    assert all(name in str(info.value) for name in ACTIVATIONS)
    with pytest.raises(ValueError, match="sizes"):
        mlp([3])


@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32)])
def test_small_cnn_shapes(channels, size):
    model = SmallCNN(in_channels=channels, n_classes=7, width=4, input_size=size)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_small_cnn_fits_digits_layout():
    x = alphalib.data.digits(flat=False).val.tensors[0][:5]
    assert SmallCNN()(x).shape == (5, 10)


def small_transformer(**kw) -> CharTransformer:
    torch.manual_seed(0)
    return CharTransformer(vocab_size=11, **{"d_model": 16, "n_heads": 2, "n_layers": 2, "block": 12, **kw})


def test_char_transformer_shape_and_block_limit():
    model = small_transformer()
    assert model(torch.randint(0, 11, (3, 12))).shape == (3, 12, 11)
    assert model(torch.randint(0, 11, (3, 5))).shape == (3, 5, 11)
    with pytest.raises(ValueError, match="block"):
        model(torch.randint(0, 11, (1, 13)))
    with pytest.raises(ValueError, match="divisible"):
        CharTransformer(11, d_model=10, n_heads=3)


def test_char_transformer_is_causal():
    model = small_transformer().eval()
    x = torch.randint(0, 11, (2, 12))
    x2 = x.clone()
    x2[:, 7] = (x[:, 7] + 1) % 11
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().amax(-1).min() > 1e-4  # every later position sees the change


def test_char_transformer_dropout_only_in_train_mode():
    model = small_transformer(dropout=0.2)
    x = torch.randint(0, 11, (2, 12))
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_sequence_cross_entropy_is_mean_over_positions():
    logits, targets = torch.randn(3, 5, 7, dtype=torch.float64), torch.randint(0, 7, (3, 5))
    per_position = [F.cross_entropy(logits[b, t][None], targets[b, t][None]) for b in range(3) for t in range(5)]
    loss = sequence_cross_entropy(logits, targets)
    assert loss.shape == ()
    torch.testing.assert_close(loss, torch.stack(per_position).mean())


def probe_one_step(curvature: str) -> alphalib.Record:
    """One Adam step of a float64 CharTransformer on a fixed batch, probed with ``curvature``."""
    model = small_transformer().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 11, (4, 12), generator=gen), torch.randint(0, 11, (4, 12), generator=gen)
    probe = alphalib.AlphaProbe(model, sequence_cross_entropy, opt, curvature=curvature)
    opt.zero_grad()
    sequence_cross_entropy(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failing backend warns: turn it into a test failure
        return probe.step((x, y))


def test_probe_secant_on_char_transformer():
    rec = probe_one_step("secant")
    assert rec.flag == "ok"
    assert math.isfinite(rec.ratio) and rec.ratio > 0 and rec.curvature > 0


def test_probe_hessian_on_char_transformer_matches_fd():
    """The training step keeps the fused attention kernel; the probe's double backward must still work."""
    hess, fd = probe_one_step("hessian"), probe_one_step("fd")
    assert hess.flag == "ok"
    assert hess.curvature == pytest.approx(fd.curvature, rel=1e-6)
    assert hess.slope == pytest.approx(fd.slope, rel=1e-9)
