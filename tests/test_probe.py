"""``AlphaProbe`` records against dense float64 Hessians, and the probe as a pure observer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import Case, dense_hessian, flat, rel_err, residual_net
from torch import nn
from torch.nn import functional as F

import alphalib


def _run(model, opt, batches, probe=None):
    records = []
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if probe is None:
            opt.step()
        else:
            records.append(probe.step((x, y)))
    return records


def _batches(n=6, d_in=4, d_out=1, size=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(size, d_in, generator=gen, dtype=dtype), torch.randn(size, d_out, generator=gen, dtype=dtype))
        for _ in range(n)
    ]


def _noisy_net() -> nn.Module:
    """Dropout everywhere, and BatchNorm (its running statistics must end as without the probe)."""
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(8, 1),
    )


@pytest.mark.parametrize("net", ["noisy", "residual"])
@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("backend", alphalib.BACKENDS)
def test_probe_is_a_pure_observer(backend, path, net):
    """Parameters, buffers, .grad, optimizer state and the RNG stream end bit-identical to an unprobed run."""
    runs = []
    for probed in (False, True):
        torch.manual_seed(0)
        model = _noisy_net() if net == "noisy" else residual_net().float()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        probe = alphalib.AlphaProbe(model, F.mse_loss, opt, curvature=backend, path=path) if probed else None
        shape = dict(d_in=4, d_out=1) if net == "noisy" else dict(d_in=3, d_out=2)
        records = _run(model, opt, _batches(**shape, dtype=torch.float32), probe)
        # (a float32 secant near rounding is measured again in float64, generic: after its fast attempt)
        assert not probed or all(
            (r.path == path or "secant's difference" in r.fallback) and r.flag != "error" for r in records
        )
        runs.append((model, opt, torch.get_rng_state()))
    (m0, o0, rng0), (m1, o1, rng1) = runs
    assert all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values(), strict=True))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(m0.parameters(), m1.parameters(), strict=True))
    s0, s1 = o0.state_dict()["state"], o1.state_dict()["state"]
    assert all(torch.equal(s0[i][k], s1[i][k]) for i in s0 for k in s0[i])
    assert torch.equal(rng0, rng1)


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("opt_name", ["Adam", "SGD"])
def test_records_match_dense_hessian_along_realized_step(case, opt_name, path):
    opt = {"Adam": lambda p: torch.optim.Adam(p, lr=1e-2), "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)}[
        opt_name
    ](case.model.parameters())
    if path == "fast" and alphalib.fast.covers(case.model) is not None:
        pytest.skip("the fast path does not cover this model")
    probe = alphalib.AlphaProbe(case.model, case.loss_fn, opt, path=path)
    x, y = case.batch
    for _ in range(4):
        before = [p.detach().clone() for p in case.model.parameters()]
        g, hess = dense_hessian(case)  # at theta_t, on buffers as the forward below sees them
        opt.zero_grad()
        case.loss_fn(case.model(x), y).backward()
        rec = probe.step(case.batch)
        assert rec.path == path
        delta = flat([p.detach() - b for p, b in zip(case.model.parameters(), before, strict=True)])
        lr = opt.param_groups[0]["lr"]
        assert rel_err(rec.slope, delta @ g / lr) <= 1e-10
        assert rel_err(rec.curvature, delta @ hess @ delta / lr**2) <= 1e-10
        assert rel_err(rec.ratio, -(delta @ g) / (delta @ hess @ delta)) <= 1e-10
        assert rel_err(rec.alpha_star, rec.ratio * lr) <= 1e-15
        assert rel_err(rec.step_norm, delta.norm()) <= 1e-12


def test_probe_uses_the_training_steps_dropout_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    for x, y in _batches():
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        g_train = flat([p.grad for p in model.parameters()])
        rec = probe.step((x, y))
        # SGD: delta = -lr * g_train, so the slope along d is -|g|^2 exactly when the same mask is used.
        assert rel_err(rec.slope, -(g_train @ g_train)) <= 1e-12


def test_every_k_probes_one_step_in_k():
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt, every=3)
    records = _run(model, opt, _batches(n=7), probe)
    assert [r is not None for r in records] == [True, False, False, True, False, False, True]
    assert list(probe.to_frame()["step"]) == [0, 3, 6]


@pytest.mark.parametrize("lr, kept", [(1e-2, True), (1e-3, False)])
def test_float32_secant_is_kept_only_where_rounding_cannot_reach_1e_3(lr, kept):
    """At lr 1e-2 the float32 difference of losses resolves the curvature: kept. At 1e-3 it is within 4e-4 of
    rounding: measured again in float64, saying so. Either way within 1e-3 of a float64 secant built by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt, curvature="secant")
    for x, y in _batches(n=5, size=64, dtype=torch.float32):
        wide = copy.deepcopy(model).double()
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        rec = probe.step((x, y))
        theta = [p.detach().double().requires_grad_(True) for p in wide.parameters()]
        delta = [p.detach().double() - t.detach() for p, t in zip(model.parameters(), theta, strict=True)]
        names = [n for n, _ in wide.named_parameters()]

        def loss(params, wide=wide, names=names, x=x, y=y):
            return F.mse_loss(
                torch.func.functional_call(wide, dict(zip(names, params, strict=True)), (x.double(),)), y.double()
            )

        value = loss(theta)
        slope = sum((g * d).sum() for g, d in zip(torch.autograd.grad(value, theta), delta, strict=True))
        with torch.no_grad():
            curvature = 2 * (loss([t + d for t, d in zip(theta, delta, strict=True)]) - value - slope)
        assert rel_err(rec.ratio, float(-slope / curvature)) < 1e-3
        assert (rec.path == "fast") == kept, rec.fallback
        assert kept or "secant's difference of losses" in rec.fallback


def test_a_probe_resumes_from_its_state_dict_as_if_unbroken(tmp_path):
    """torch.save the probe's state with the model's and optimizer's; a new probe goes on: the same steps probed,
    the same records."""

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt, alphalib.AlphaProbe(model, F.mse_loss, opt, every=3)

    batches = _batches(n=8)
    model, opt, unbroken = setup()
    _run(model, opt, batches, unbroken)

    model, opt, first = setup()
    _run(model, opt, batches[:4], first)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "probe": first.state_dict()}, tmp_path / "c.pt")
    model, opt, resumed = setup()
    saved = torch.load(tmp_path / "c.pt")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["probe"])
    _run(model, opt, batches[4:], resumed)
    assert [r.step for r in resumed.records] == [r.step for r in unbroken.records] == [0, 3, 6]
    assert list(map(repr, resumed.records[:2])) == list(map(repr, unbroken.records[:2]))  # (NaN fields compare so)
    assert resumed.records[2].ratio == pytest.approx(unbroken.records[2].ratio, rel=1e-12)
    with pytest.raises(ValueError, match="step count"):
        resumed.load_state_dict({"steps": -1, "records": []})


def test_param_groups_with_different_lrs_keep_ratio_defined():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    opt = torch.optim.Adam(
        [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters(), "lr": 1e-3}]
    )
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    case = Case(model, F.mse_loss, _batches()[0])
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        g, hess = dense_hessian(case)
        rec = _run(model, opt, [case.batch], probe)[0]
        delta = flat([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
        assert rel_err(rec.ratio, -(delta @ g) / (delta @ hess @ delta)) <= 1e-10
        assert rec.lr == 1e-2 and rel_err(rec.alpha_star, rec.ratio * 1e-2) <= 1e-15


def _one_step(model, loss_fn, opt, batch, **probe_kw):
    probe = alphalib.AlphaProbe(model, loss_fn, opt, **probe_kw)
    opt.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()
    return probe.step(batch)


def test_flags_zero_step():
    model = nn.Linear(4, 1).double()
    rec = _one_step(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.0), _batches()[0])
    assert rec.flag == "zero_step" and math.isnan(rec.alpha_star) and math.isnan(rec.ratio)


def test_flags_negative_curvature_with_the_computed_value():
    model = nn.Linear(4, 1).double()
    concave = lambda out, y: -(out - y).square().mean()  # noqa: E731
    batch = _batches()[0]
    rec = _one_step(model, concave, torch.optim.SGD(model.parameters(), lr=0.1), batch)
    assert rec.flag == "negative_curvature"
    assert rec.curvature < 0 and rec.alpha_star < 0 and math.isfinite(rec.alpha_star)


def test_flags_ascent():
    model = nn.Linear(4, 1).double()
    rec = _one_step(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1, maximize=True), _batches()[0])
    assert rec.flag == "ascent" and rec.slope > 0 and rec.alpha_star < 0


def test_flags_zero_curvature():
    model = nn.Linear(4, 1).double()
    linear = lambda out, y: (out * y).mean()  # noqa: E731  # linear in theta: H = 0
    rec = _one_step(model, linear, torch.optim.SGD(model.parameters(), lr=0.1), _batches()[0])
    assert rec.flag == "zero_curvature" and math.isnan(rec.alpha_star)


@pytest.mark.parametrize("backend", alphalib.BACKENDS)
def test_flags_nonfinite_without_raising(backend):
    model = nn.Linear(4, 1).double()
    x, y = _batches()[0]
    y = y.clone()
    y[0] = math.nan
    rec = _one_step(model, F.mse_loss, torch.optim.Adam(model.parameters()), (x, y), curvature=backend)
    assert rec.flag == "nonfinite" and math.isnan(rec.alpha_star)


class _NoDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # as ops without a double backward do, e.g. fused attention on CPU
            raise RuntimeError("derivative for _NoDoubleBackward's backward is not implemented")
        (x,) = ctx.saved_tensors
        return grad * (1 - x.tanh().square())


def test_backend_failure_is_recorded_not_raised():
    torch.manual_seed(0)
    lin = nn.Linear(4, 1).double()
    model = nn.Sequential(lin)
    model.forward = lambda x: _NoDoubleBackward.apply(lin(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(lin.state_dict())
    with pytest.warns(RuntimeWarning, match="secant"):
        rec = _one_step(model, F.mse_loss, opt, _batches()[0], path="generic")
    assert rec.flag == "error" and math.isnan(rec.alpha_star)
    assert not torch.equal(before["weight"], lin.weight)  # the step itself was taken
    ok = _one_step(model, F.mse_loss, opt, _batches()[0], curvature="secant")
    assert ok.flag == "ok"


def test_bad_probe_arguments():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="every"):
        alphalib.AlphaProbe(model, F.mse_loss, opt, every=0)
    with pytest.raises(ValueError, match="unknown curvature backend"):
        alphalib.AlphaProbe(model, F.mse_loss, opt, curvature="newton")
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    with pytest.raises(ValueError, match="pair"):
        probe.step(torch.randn(3, 4))


def test_to_frame_has_the_documented_columns_and_tags():
    model = nn.Linear(4, 1).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt, tags={"optimizer": "Adam", "seed": 0})
    _run(model, opt, _batches(n=3), probe)
    frame = probe.to_frame()
    expected = {
        "step",
        "epoch",
        "loss",
        "lr",
        "slope",
        "curvature",
        "alpha_star",
        "ratio",
        "grad_norm",
        "step_norm",
        "flag",
        "backend",
        "optimizer",
        "seed",
    }
    assert expected <= set(frame.columns) and len(frame) == 3
    assert (frame["optimizer"] == "Adam").all()


# ---- a good citizen: errors before stepping, hooks that do not get in the way --------------------------------


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_bad_construction_is_refused_at_once():
    model, other = nn.Linear(4, 1), nn.Linear(4, 1)
    with pytest.raises(ValueError, match="every"):
        alphalib.AlphaProbe(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1), every=True)
    with pytest.raises(ValueError, match="none of the model's parameters"):
        alphalib.AlphaProbe(model, F.mse_loss, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="not parameters of the model"):
        alphalib.AlphaProbe(model, F.mse_loss, torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1))
    with pytest.raises(ValueError, match="ggn"):
        alphalib.AlphaProbe(
            model,
            alphalib.objective(lambda m, b: m(b).sum()),
            torch.optim.SGD(model.parameters(), lr=0.1),
            curvature="ggn",
        )


class _TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(x), x.sum()


@pytest.mark.parametrize("what", ["tuple-output", "non-scalar-loss"])
def test_unmeasurable_loss_raises_before_the_step(what):
    torch.manual_seed(0)
    model = _TupleNet().double() if what == "tuple-output" else nn.Linear(4, 1).double()
    loss_fn = F.mse_loss if what == "tuple-output" else (lambda out, y: (out - y).square())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = alphalib.AlphaProbe(model, loss_fn, opt)
    x, y = _batches()[0]
    opt.zero_grad()
    out = model(x)
    F.mse_loss(out[0] if isinstance(out, tuple) else out, y).backward()
    before = _params(model)
    with pytest.raises(ValueError, match="objective" if what == "tuple-output" else "scalar"):
        probe.step((x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # nothing was stepped
    assert probe.steps == 0 and not probe.records


def test_a_model_returning_a_tuple_is_measured_through_an_objective():
    torch.manual_seed(0)
    model = _TupleNet().double()
    loss = alphalib.objective(lambda m, b: F.mse_loss(m(b[0])[0], b[1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = alphalib.AlphaProbe(model, loss, opt)
    x, y = _batches()[0]
    case = Case(nn.Sequential(model.lin), F.mse_loss, (x, y))
    g, hess = dense_hessian(case)
    before = flat(_params(model))
    opt.zero_grad()
    loss(model, (x, y)).backward()
    rec = probe.step((x, y))
    delta = flat(model.parameters()).detach() - before
    assert rec.path == "generic" and "objective" in rec.fallback and rec.flag == "ok"
    assert rel_err(rec.ratio, -(delta @ g) / (delta @ hess @ delta)) <= 1e-10


def test_hooks_survive_deepcopy_and_torch_save_and_are_removed():
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with alphalib.AlphaProbe(model, F.mse_loss, opt) as probe:
        _run(model, opt, _batches(n=2, dtype=torch.float32), probe)
        twin = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        x = torch.randn(3, 4)
        for m in (twin, loaded):  # the copies' hooks do nothing
            m.eval()
            assert torch.equal(m(x), model.eval()(x))
            model.train()
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(
        not p._backward_hooks and not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters()
    )
    assert len(probe.records) == 2


def test_a_probe_the_user_drops_is_freed_at_once():
    """Nothing of the model holds the probe strongly (hooks reach it weakly): dropped, its memory (the kept copy of
    θ_t, the captured tensors) goes with it, not at the next cyclic garbage collection."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    _run(model, opt, _batches(n=2, dtype=torch.float32), probe)
    ref = weakref.ref(probe)
    gc.disable()
    try:
        del probe
        assert ref() is None
    finally:
        gc.enable()


def test_parameters_are_read_at_every_step():
    """Unfreezing a layer mid-run: its step is measured, on both paths, against the dense Hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    model[0].requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    case = Case(model, F.mse_loss, _batches()[0])
    for step in range(3):
        if step == 1:
            model[0].requires_grad_(True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        before = _params(model)
        full_g, full_h = dense_hessian(case)
        rec = _run(model, opt, [case.batch], probe)[0]
        delta = flat(model.parameters()).detach() - flat(before)
        assert names and rel_err(rec.ratio, -(delta @ full_g) / (delta @ full_h @ delta)) <= 1e-10


def test_a_private_op_that_disagrees_after_an_upgrade_sends_the_step_generic(monkeypatch):
    """The fast path's private kernels are checked against autograd; a wrong one costs speed, not the value."""
    from alphalib import _ops

    monkeypatch.setattr(_ops, "_verdicts", {})
    monkeypatch.setattr(_ops, "_gelu_backward_impl", lambda grad, z: 2 * grad)  # as if torch changed its meaning
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 1)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    case = Case(model, F.mse_loss, _batches()[0])
    before = flat(_params(model))
    g, hess = dense_hessian(case)
    rec = _run(model, opt, [case.batch], probe)[0]
    delta = flat(model.parameters()).detach() - before
    assert rec.path == "generic" and "gelu_backward disagrees" in rec.fallback and rec.flag == "ok"
    assert rel_err(rec.ratio, -(delta @ g) / (delta @ hess @ delta)) <= 1e-10
