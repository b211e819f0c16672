"""Optimizers by name, the learning-rate-free ones under the probe against dense float64 Hessians, their step sizes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import dense_hessian, flat, make_case, rel_err
from torch import nn
from torch.nn import functional as F

import alphalib
from alphalib import optim
from alphalib.lab import optimizers

#: each learning-rate-free optimizer with settings that exercise it: Prodigy's coupled weight decay writes into
#: .grad, Schedule-Free warms up over two steps and normalises .grad in place
LR_FREE = {
    "prodigy": dict(d0=1e-3, weight_decay=0.01, decouple=False, use_bias_correction=True),
    "dadapt_adam": dict(d0=1e-3),
    "dog": dict(reps_rel=1e-3),
    "schedulefree_adamw": dict(lr=0.02, warmup_steps=2),
}

pytestmark = pytest.mark.filterwarnings("ignore:.*lr parameter.*")


def _build(name, params, **changes):
    kwargs = LR_FREE[name] | changes
    lr = kwargs.pop("lr", None)
    opt = alphalib.make_optimizer(name, params, lr=lr, **kwargs)
    optim.train_mode(opt)
    return opt


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("problem", ["mlp-mse", "mlp-ce", "batchnorm-train"])
@pytest.mark.parametrize("name", list(LR_FREE))
def test_records_match_dense_hessian_for_learning_rate_free_optimizers(name, problem, path):
    """Three consecutive steps: slope and curvature along the realized step against a dense float64 Hessian."""
    case = make_case(problem)
    opt = _build(name, case.model.parameters())
    probe = alphalib.AlphaProbe(case.model, case.loss_fn, opt, path=path)
    x, y = case.batch
    for _ in range(3):
        before = [p.detach().clone() for p in case.model.parameters()]  # θ_t (Schedule-Free: y_t, the gradient point)
        g, hess = dense_hessian(case)
        opt.zero_grad()
        case.loss_fn(case.model(x), y).backward()
        rec = probe.step(case.batch)
        assert rec.path == path and rec.flag in ("ok", "negative_curvature", "ascent")
        delta = flat([p.detach() - b for p, b in zip(case.model.parameters(), before, strict=True)])
        s = rec.step_size
        assert s > 0 and s != rec.lr or name == "schedulefree_adamw"
        assert rel_err(rec.slope * s, delta @ g) <= 1e-10
        assert rel_err(rec.curvature * s**2, delta @ hess @ delta) <= 1e-10
        assert rel_err(rec.ratio, -(delta @ g) / (delta @ hess @ delta)) <= 1e-10
        assert rel_err(rec.alpha_star, rec.ratio * s) <= 1e-15


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _mlp_steps(name, steps=4, **changes):
    """Steps of a float64 MLP on one batch: (record, params before, gradients, params after) each, the optimizer."""
    case = make_case("mlp-mse")
    opt = _build(name, case.model.parameters(), **changes)
    probe = alphalib.AlphaProbe(case.model, case.loss_fn, opt)
    x, y = case.batch
    out = []
    for _ in range(steps):
        before = [p.detach().clone() for p in case.model.parameters()]
        opt.zero_grad()
        case.loss_fn(case.model(x), y).backward()
        grads = _grads(case.model)
        rec = probe.step((x, y))
        out.append((rec, before, grads, [p.detach().clone() for p in case.model.parameters()]))
        opt.estimates = [*getattr(opt, "estimates", []), opt.param_groups[0].get("d")]  # the d each step leaves
    return out, opt


def test_dog_step_size_is_distance_over_gradients():
    """η_t = max(r_ε, max_i ||x_i - x_0||) / sqrt(Σ ||g_i||² + ε), and the step is -η_t g_t."""
    steps, opt = _mlp_steps("dog")
    x0 = flat(steps[0][1])
    r, g2 = LR_FREE["dog"]["reps_rel"] * (1 + x0.norm().item()), 1e-8
    for rec, before, grads, after in steps:
        r = max(r, (flat(before) - x0).norm().item())
        g2 += flat(grads).square().sum().item()
        assert rel_err(rec.step_size, r / math.sqrt(g2)) <= 1e-12
        assert rel_err(flat(after) - flat(before), -rec.step_size * flat(grads)) <= 1e-12


def test_prodigy_step_size_is_d_lr_with_the_estimate_the_step_starts_from():
    """The first step is d0 · lr (bias-corrected); every step is -s · m / (sqrt(v) + d_new · eps)."""
    steps, opt = _mlp_steps("prodigy")
    beta1, beta2 = opt.param_groups[0]["betas"]
    assert rel_err(steps[0][0].step_size, 1e-3 * math.sqrt(1 - beta2) / (1 - beta1)) <= 1e-15
    rec, before, _, after = steps[-1]  # the last step's state is what it used
    group = opt.param_groups[0]
    params = list(opt.state)
    step = torch.cat(
        [
            (opt.state[p]["exp_avg"] / (opt.state[p]["exp_avg_sq"].sqrt() + group["d"] * group["eps"])).reshape(-1)
            for p in params
        ]
    )
    assert rel_err(flat(after) - flat(before), -rec.step_size * step) <= 1e-12  # coupled decay went into .grad
    assert len({r.step_size for r, *_ in steps}) > 1  # d moved


def test_dadapt_step_size_is_d_lr_of_the_estimate_before_the_step():
    """The first step uses d0 · lr; each next step the d the previous one left (here with lr 0.5)."""
    steps, opt = _mlp_steps("dadapt_adam", steps=6, d0=1e-6, lr=0.5)
    sizes = [r.step_size for r, *_ in steps]
    assert sizes[0] == 1e-6 * 0.5 and sizes[1:] == [d * 0.5 for d in opt.estimates[:-1]]
    assert sizes[-1] > 10 * sizes[0]  # the estimate grew, so the test tells old d from new


def test_schedulefree_step_size_is_its_warmed_up_lr():
    steps, _ = _mlp_steps("schedulefree_adamw")
    assert [r.step_size for r, *_ in steps] == [0.01, 0.02, 0.02, 0.02]
    assert all(r.lr == 0.02 for r, *_ in steps)


def test_torch_optimizers_step_size_is_their_lr():
    model = nn.Linear(3, 1).double()
    opt = alphalib.make_optimizer("sgd", model.parameters(), lr=0.05, momentum=0.9)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    F.mse_loss(model(x), y).backward()
    rec = probe.step((x, y))
    assert rec.step_size == rec.lr == 0.05 and rec.alpha_star == rec.ratio * 0.05


def _noisy_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or a != a and b != b


@pytest.mark.parametrize("name", list(LR_FREE))
def test_probe_is_a_pure_observer_of_learning_rate_free_training(name):
    """alphalib.train with and without the probe (validation switches Schedule-Free's modes every epoch): the
    model, .grad, the optimizer's state and groups (d, η, the averaging weights) and the RNG end bit-identical."""
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(5)]
    runs = []
    for probed in (False, True):
        torch.manual_seed(0)
        model = _noisy_net()
        opt = _build(name, model.parameters())
        optim.eval_mode(opt)  # train() must put it in train mode itself
        probe = alphalib.AlphaProbe(model, F.mse_loss, opt) if probed else None
        history = alphalib.train(model, F.mse_loss, opt, data, epochs=3, probe=probe, val=data[:2], progress=False)
        if probed:
            assert len(history.records) == 15 and (history.records.flag != "error").all()
            assert (history.records.step_size > 0).all() and history.records.step_size.nunique() > 1
            assert history.epochs.probe_seconds.is_monotonic_increasing and history.epochs.probe_seconds.iloc[-1] > 0
        runs.append((model, opt, torch.get_rng_state(), history.epochs.val_loss.tolist()))
    (m0, o0, rng0, v0), (m1, o1, rng1, v1) = runs
    assert _same(m0.state_dict(), m1.state_dict()) and _same(_grads(m0), _grads(m1))
    assert _same(o0.state_dict(), o1.state_dict()) and torch.equal(rng0, rng1) and v0 == v1
    assert not optim.in_eval_mode(o0) or name == "schedulefree_adamw"
    assert optim.in_eval_mode(o1) == (name == "schedulefree_adamw")  # training ends on the averaged iterate x


def test_schedulefree_in_eval_mode_is_refused_before_anything_changes():
    model = nn.Linear(3, 1)
    opt = alphalib.make_optimizer("schedulefree_adamw", model.parameters())  # built in eval mode
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    F.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"eval mode.*optimizer.train\(\)"):
        probe.step((x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)) and probe.steps == 0


def test_schedulefree_is_measured_at_the_gradient_point_not_the_average():
    """θ_t is y_t: the records' slope is Δ'∇L(y_t), not Δ'∇L(x_t)."""
    case = make_case("mlp-mse")
    opt = _build("schedulefree_adamw", case.model.parameters())
    probe = alphalib.AlphaProbe(case.model, case.loss_fn, opt)
    for _ in range(3):
        y_t = [p.detach().clone() for p in case.model.parameters()]
        optim.eval_mode(opt)
        x_t = [p.detach().clone() for p in case.model.parameters()]
        optim.train_mode(opt)
        opt.zero_grad()
        case.loss_fn(case.model(case.batch[0]), case.batch[1]).backward()
        rec = probe.step(case.batch)
        delta = flat(case.model.parameters()).detach() - flat(y_t)
        at_y, _ = dense_hessian(case, y_t)
        at_x, _ = dense_hessian(case, x_t)
        assert rel_err(rec.slope * rec.step_size, delta @ at_y) <= 1e-10
    assert rel_err(delta @ at_x, delta @ at_y) > 1e-6  # the two points differ, so the test can tell them apart


def test_names_kwargs_and_errors():
    model = nn.Linear(3, 1)
    assert type(alphalib.make_optimizer("Adam", model.parameters())).__name__ == "Adam"
    assert alphalib.make_optimizer("prodigy", model.parameters()).param_groups[0]["lr"] == 1.0  # its own default
    assert {"adam", "sgd", "prodigy", "dadapt_adam", "dog", "schedulefree_adamw", "alpha_scaled"} <= set(
        alphalib.OPTIMIZERS
    )
    with pytest.raises(ValueError, match="unknown optimizer 'prodigi'.*prodigy"):
        alphalib.make_optimizer("prodigi", model.parameters())
    with pytest.raises(ValueError, match="model= and loss_fn="):
        alphalib.make_optimizer("alpha_scaled", model.parameters())
    with pytest.raises(TypeError, match="needs the step direction before the step"):
        alphalib.make_optimizer("alpha_scaled", model.parameters(), model=model, loss_fn=F.mse_loss, base="prodigy")


def test_a_missing_package_names_the_extra(monkeypatch):
    def missing(module):
        raise ModuleNotFoundError(f"No module named {module!r}")

    monkeypatch.setattr(optimizers.importlib, "import_module", missing)  # every import_module, while the test runs
    with pytest.raises(ImportError, match=r"'dog-optimizer'.*alphalib\[lrfree\]"):
        optimizers.make_optimizer("dog", nn.Linear(2, 1).parameters())


def test_run_builds_every_optimizer_by_name():
    data = alphalib.gaussian_regression(n=64, seed=0)
    for name in ("prodigy", "dadapt_adam", "dog", "schedulefree_adamw"):
        history = alphalib.run(
            alphalib.SimpleNet, F.mse_loss, data, optimizer=name, epochs=2, progress=False, val_set=data
        )
        recs = history.records
        assert len(recs) == 4 and (recs.optimizer == name).all() and (recs.flag != "error").all()
        assert (history.epochs.lr0 == recs.lr.iloc[0]).all() and recs.step_size.notna().all()


def test_step_size_looks_through_a_wrapper_that_holds_the_optimizer():
    """accelerate's AcceleratedOptimizer (what the Hugging Face Trainer steps) holds the optimizer as .optimizer."""

    class Wrapper(torch.optim.Optimizer):
        def __init__(self, inner):  # like accelerate's: no Optimizer.__init__, the inner one's groups
            self.optimizer, self.param_groups, self.state = inner, inner.param_groups, inner.state

        def step(self, closure=None):
            return self.optimizer.step(closure)

    steps, opt = _mlp_steps("prodigy", steps=2)
    read = alphalib.step_size(Wrapper(opt))
    assert (
        read() == opt.param_groups[0]["d"] * 1.0 * math.sqrt(1 - 0.999**3) / (1 - 0.9**3) != opt.param_groups[0]["lr"]
    )
