"""The evidence: every row of its tables, on facts made by hand, gives its reason; clean facts give the fast path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from alphalib.probe import evidence
from alphalib.probe.recorder import Facts, Forward

X, Y = torch.arange(6.0).view(3, 2), torch.ones(3, 1)
W = torch.nn.Parameter(torch.ones(1, 2))


def _forward(**kw) -> Forward:
    out = X @ W.detach().T
    error = 2 * (out - Y) / out.numel()  # the error mse_loss sends back: scale 1
    return Forward(
        **{
            "inputs": X,
            "input_version": X._version,
            "versions": {id(W): W._version},
            "rng": torch.get_rng_state(),
            "autocast": None,
            "output": out,
            "error": error,
            "backwards": 1,
            **kw,
        }
    )


def _facts(**kw) -> Facts:
    return Facts(
        **{
            "forwards": [_forward()],
            "built": 1,
            "device": torch.device("cpu"),
            "parts": {W: [torch.full((1, 2), 3.0)]},
            **kw,
        }
    )


def _judge(facts: Facts, batches=((X, Y),), closure=False, loss_fn=F.mse_loss) -> evidence.Verdict:
    grad = (
        (lambda out, y: torch.autograd.functional.vjp(lambda o: F.mse_loss(o, y), out)[1])
        if loss_fn is not None
        else None
    )
    return evidence.judge(facts, [W], list(batches), loss_fn=loss_fn, output_grad=grad, closure=closure)


def test_clean_facts_give_the_fast_path_with_the_tapped_gradient():
    v = _judge(_facts())
    assert v.fast and not v.reasons and not v.mismatch
    assert v.scale == pytest.approx(1.0, rel=1e-12) and torch.equal(v.grad[0], torch.full((1, 2), 3.0))
    assert v.grad_norm == pytest.approx(torch.full((1, 2), 3.0).norm().item())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"closure": True}, "takes a closure"),
        ({"facts": {"forwards": []}}, "no forward pass of the model was seen"),
        ({"loss_fn": None}, "measures an objective"),
        ({"facts": {"forwards": [_forward(), _forward()]}}, "2 forward passes"),
        ({"facts": {"forwards": [_forward(backwards=2)]}}, "2 backward passes through the model's output"),
        ({"facts": {"built": 0}}, "no backward pass accumulated"),
        ({"facts": {"unwritten": True}}, "was not written by the backward pass"),
        ({"facts": {"bypassed": True}}, "did not come through the autograd graph"),
        ({"facts": {"forwards": [_forward(error=None)]}}, "error at the model's output was not seen"),
        ({"facts": {"forwards": [_forward(autocast=torch.bfloat16)]}}, "ran under autocast (bfloat16)"),
        ({"facts": {"forwards": [_forward(versions={id(W): W._version - 1})]}}, "parameters changed in place"),
        ({"facts": {"forwards": [_forward(input_version=X._version - 1)]}}, "inputs changed in place"),
        ({"facts": {"forwards": [_forward(error=torch.full((3, 1), float("nan")))]}}, "output is not finite"),
    ],
)
def test_each_row_gives_its_reason(change, reason):
    facts = dataclasses.replace(_facts(), **change.pop("facts", {}))
    v = _judge(facts, **change)
    assert not v.fast and any(reason in r for r in v.reasons), v.reasons


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"batches": [(X + 1, Y)]}, "were not the input of any forward pass"),
        ({"batches": [(X, 2 * Y)]}, "is not a multiple of loss_fn(output, targets)"),
        ({"facts": {"built": 2}}, ".grad was built by 2 backward passes but probe.step got 1 batch"),
    ],
)
def test_what_training_did_not_backpropagate_is_a_mismatch(change, flag):
    facts = dataclasses.replace(_facts(), **change.pop("facts", {}))
    v = _judge(facts, **change)
    assert not v.fast and any(flag in m for m in v.mismatch), v.mismatch


def test_micro_batches_are_weighted_as_training_scaled_them():
    half = _forward(error=_forward().error / 2)
    x2 = X.clone()
    other = _forward(inputs=x2, input_version=x2._version, error=_forward().error * 1.5)
    v = _judge(_facts(forwards=[half, other], built=2), batches=[(X, Y), (x2, Y)])
    assert v.weights == pytest.approx([0.25, 0.75]) and "2 micro-batches" in v.reasons
