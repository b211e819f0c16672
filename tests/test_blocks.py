"""alpha* per group of parameters against an independent dense float64 Hessian; odd curvature and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import alphalib
from alphalib.lab.models import CharTransformer, sequence_cross_entropy


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    groups = {"first": ["0"], "norm": ["2.weight", "2.bias"], "last": ["3"]}
    return model, F.mse_loss, (x, y), groups


def _transformer():
    torch.manual_seed(0)
    model = CharTransformer(vocab_size=5, d_model=4, n_heads=2, n_layers=1, block=4).double()
    x, y = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4))
    groups = {
        "embeddings": ["tok", "pos"],
        "attention": ["blocks.0.ln1", "blocks.0.attn"],
        "mlp": ["blocks.0.ln2", "blocks.0.mlp"],
        "head": ["ln", "head"],
    }
    return model, sequence_cross_entropy, (x, y), groups


SETUPS = {"mlp": _mlp, "transformer": _transformer}


def _dense(model, loss_fn, batch):
    """The gradient and the dense Hessian of the mean batch loss over the flattened parameters, by autograd."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vec):
        pieces = torch.split(vec, [math.prod(s) for s in shapes])
        params = {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes, strict=True)}
        return loss_fn(functional_call(model, params, (batch[0],)), batch[1])

    with sdpa_kernel(SDPBackend.MATH):  # (the fused CPU attention kernels have no double backward)
        return torch.func.grad(loss)(flat), torch.autograd.functional.hessian(loss, flat), names, shapes


def _direction(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]


@pytest.mark.parametrize("setup", SETUPS)
def test_each_group_matches_its_diagonal_block_of_the_dense_hessian(setup):
    model, loss_fn, batch, groups = SETUPS[setup]()
    d = _direction(model)
    g, hessian, names, shapes = _dense(model, loss_fn, batch)
    d_flat = torch.cat([v.reshape(-1) for v in d])
    ends = torch.tensor([math.prod(s) for s in shapes]).cumsum(0).tolist()
    span = {n: (end - math.prod(s), end) for n, s, end in zip(names, shapes, ends, strict=True)}
    found = alphalib.block_alpha(model, loss_fn, batch, groups, d=d, lr=0.01)
    assert list(found) == list(groups)
    for name, res in found.items():
        rows = torch.cat([torch.arange(*span[n]) for n in res.names])
        d_l, g_l, h_ll = d_flat[rows], g[rows], hessian[rows][:, rows]
        slope, curvature = (d_l @ g_l).item(), (d_l @ h_ll @ d_l).item()
        assert res.slope == pytest.approx(slope, rel=1e-9, abs=1e-12), name
        assert res.curvature == pytest.approx(curvature, rel=1e-9, abs=1e-12), name
        assert res.alpha_star == pytest.approx(-slope / curvature, rel=1e-8), name
        assert res.ratio == pytest.approx(res.alpha_star / 0.01, rel=1e-12), name
        assert res.lr_over_alpha == pytest.approx(0.01 / res.alpha_star, rel=1e-8), name
        assert res.size == len(rows) and res.step_norm == pytest.approx(d_l.norm().item(), rel=1e-12)
    # the groups above cover every parameter: their slopes add up to the whole step's, their curvatures do not
    assert sum(r.slope for r in found.values()) == pytest.approx((d_flat @ g).item(), rel=1e-9)
    whole = (d_flat @ hessian @ d_flat).item()
    assert sum(r.curvature for r in found.values()) != pytest.approx(whole, rel=1e-6)  # the cross terms H_lm


@pytest.mark.parametrize("setup", SETUPS)
def test_one_group_of_every_parameter_is_the_whole_step(setup):
    model, loss_fn, batch, _ = SETUPS[setup]()
    d = _direction(model, seed=2)
    g, hessian, _, _ = _dense(model, loss_fn, batch)
    d_flat = torch.cat([v.reshape(-1) for v in d])
    whole = alphalib.alpha_star(model, loss_fn, batch, d)
    for everything in ([""], [n for n, _ in model.named_parameters()]):  # the root module, or every name
        (res,) = alphalib.block_alpha(model, loss_fn, batch, {"all": everything}, d=d).values()
        assert res.curvature == pytest.approx((d_flat @ hessian @ d_flat).item(), rel=1e-9)
        assert res.slope == pytest.approx((d_flat @ g).item(), rel=1e-9)
        assert res.alpha_star == pytest.approx(whole.alpha_star, rel=1e-9)
        assert math.isnan(res.ratio) and math.isnan(res.lr_over_alpha)  # no lr: no lr units


def test_after_a_step_theta_and_lr_give_the_realized_step_and_nothing_changes():
    model, loss_fn, batch, groups = _transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    for _ in range(2):  # an Adam state that is not the first step's
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
    after = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    found = alphalib.block_alpha(model, loss_fn, batch, groups, theta=before, lr=3e-3)
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), after, strict=True))  # parameters untouched
    assert all(torch.equal(p.grad, gr) for p, gr in zip(model.parameters(), grads, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    d = [(a - b) / 3e-3 for a, b in zip(after, before, strict=True)]
    named = dict(zip([n for n, _ in model.named_parameters()], before, strict=True))
    by_hand = alphalib.block_alpha(model, loss_fn, batch, groups, theta=named, d=d, lr=3e-3)
    for name in groups:
        assert found[name].curvature == pytest.approx(by_hand[name].curvature, rel=1e-12)
        assert found[name].slope == pytest.approx(by_hand[name].slope, rel=1e-12)
    # at theta_t = the model's parameters (theta left out), with the same direction: the same numbers
    with torch.no_grad():
        for p, b in zip(model.parameters(), before, strict=True):
            p.copy_(b)
    at_model = alphalib.block_alpha(model, loss_fn, batch, groups, d=d, lr=3e-3)
    assert {k: v.alpha_star for k, v in at_model.items()} == pytest.approx({k: v.alpha_star for k, v in found.items()})


def test_odd_curvature_is_returned_and_flagged_never_raised():
    model = nn.Linear(2, 1).double()
    x = torch.randn(4, 2, dtype=torch.float64)

    @alphalib.objective
    def odd(m, batch):  # concave in the weight, linear in the bias
        return -(m.weight**2).sum() + m.bias.sum() + 0 * m(batch).sum()

    groups = {"weight": ["weight"], "bias": ["bias"]}
    d = [torch.ones(1, 2, dtype=torch.float64), -torch.ones(1, dtype=torch.float64)]
    found = alphalib.block_alpha(model, odd, x, groups, d=d, lr=0.1)
    assert found["weight"].curvature == pytest.approx(-4.0) and found["weight"].flag.startswith("negative_curvature")
    assert found["bias"].curvature == 0.0 and found["bias"].flag == "zero_curvature"
    assert math.isnan(found["bias"].alpha_star) and math.isnan(found["bias"].ratio)
    ascent = alphalib.block_alpha(model, odd, x, groups, d=[torch.zeros(1, 2, dtype=torch.float64), -d[1]])
    assert ascent["bias"].flag == "zero_curvature|ascent" and ascent["weight"].flag == "zero_step"
    nonfinite = alphalib.block_alpha(
        model, F.mse_loss, (torch.full((4, 2), math.inf, dtype=torch.float64), torch.zeros(4, 1).double()), groups, d=d
    )
    assert {r.flag for r in nonfinite.values()} == {"nonfinite"}
    assert all(math.isnan(r.alpha_star) for r in nonfinite.values())


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"a": ["0.weight"], "b": ["0"]}, "groups 'a' and 'b' both hold the parameter '0.weight'.*overlap"),
        ({"a": []}, "group 'a' is empty"),
        ({"a": ["0.wieght"]}, "group 'a' names '0.wieght', which is neither a parameter nor a module"),
        ({"a": ["5"]}, "neither a parameter nor a module.*named_parameters"),
        ({"a": "0"}, "group 'a' is the string '0'; give a list of names"),
        ({"a": ["1"]}, "group 'a' holds no trainable parameter"),  # the Tanh
        ({"frozen": ["2"]}, "group 'frozen' holds no trainable parameter"),
        ({}, "groups must be a non-empty dict"),
    ],
)
def test_bad_groups_say_what_is_wrong_and_what_to_do(groups, message):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[2].requires_grad_(False)
    batch = (torch.randn(5, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match=message):
        alphalib.block_alpha(model, F.mse_loss, batch, groups, d=_direction(model)[:2])


def test_missing_or_bad_step_information_is_a_clear_error():
    model, loss_fn, batch, groups = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="needs the step: pass d=.*or theta=.*and lr="):
        alphalib.block_alpha(model, loss_fn, batch, groups, theta=before)
    with pytest.raises(ValueError, match="needs the step"):
        alphalib.block_alpha(model, loss_fn, batch, groups, lr=0.1)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        alphalib.block_alpha(model, loss_fn, batch, groups, theta=before, lr=0.0)
    with pytest.raises(ValueError, match="theta has 5 tensors but the model has 6"):
        alphalib.block_alpha(model, loss_fn, batch, groups, theta=before[:-1], lr=0.1)
    with pytest.raises(ValueError, match=r"d\[0\] has shape \(3, 4\), expected \(4, 3\)"):
        alphalib.block_alpha(model, loss_fn, batch, groups, d=[torch.zeros(3, 4)] + before[1:])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
