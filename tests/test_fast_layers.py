"""The fast path (layer-wise tangent pass over the training step) against dense Hessians and the generic path."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Case, dense_hessian, flat, flat_loss, rel_err, residual_net
from torch import nn
from torch.nn import functional as F

import alphalib
from alphalib.fast import covers

ACTIVATIONS = {
    "relu": nn.ReLU(),
    "relu-inplace": nn.ReLU(inplace=True),
    "leaky_relu": nn.LeakyReLU(0.1),
    "gelu": nn.GELU(),
    "gelu-tanh": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(),
    "tanh": nn.Tanh(),
    "sigmoid": nn.Sigmoid(),
    "softplus": nn.Softplus(),
    "elu": nn.ELU(),
}


def _probe_steps(model, loss_fn, batch, *, curvature="hessian", path="fast", steps=3, lr=1e-2):
    """Yield (record, Δ, dense g, dense H) for a few Adam steps on one batch, the dense parts at θ_t."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    probe = alphalib.AlphaProbe(model, loss_fn, opt, curvature=curvature, path=path)
    case = Case(model, loss_fn, batch)
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        g, hess = dense_hessian(case)
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        rec = probe.step(batch)
        assert rec.path == path
        yield rec, flat([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]), g, hess


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_fast_path_exact_for_every_activation(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), ACTIVATIONS[name], nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    batch = (torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64))
    for rec, delta, g, hess in _probe_steps(model, F.mse_loss, batch):
        lr = rec.lr
        assert rel_err(rec.curvature, delta @ hess @ delta / lr**2) <= 1e-10
        assert rel_err(rec.slope, delta @ g / lr) <= 1e-10


def _conv_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(16, 3),
    )


def _conv1d_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(2, 3, 3),
        nn.GELU(),
        nn.MaxPool1d(2),
        nn.AvgPool1d(2),
        nn.Flatten(),
        nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5), nn.Tanh()),
        nn.Linear(4, 3),
    )


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("net", [_conv_net, _conv1d_net], ids=["conv2d-maxpool-dropout", "conv1d-nested"])
def test_fast_path_equals_generic_path_with_dropout_and_pooling(net, curvature):
    """With dropout, dense references see other masks; the generic path (itself tested dense) replays the step's."""
    shape = (6, 2, 8, 8) if net is _conv_net else (6, 2, 13)
    results = {}
    for path in ("fast", "generic"):
        torch.manual_seed(0)
        model = net().double()
        batch = (torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (6,)))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        probe = alphalib.AlphaProbe(model, F.cross_entropy, opt, curvature=curvature, path=path)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            probe.step(batch)
        results[path] = probe.to_frame()
    fast, generic = results["fast"], results["generic"]
    assert (fast["path"] == "fast").all() and (generic["path"] == "generic").all()
    for col in ("loss", "slope", "curvature", "ratio"):
        assert rel_err(torch.tensor(fast[col].values), torch.tensor(generic[col].values)) <= 1e-10, col


def test_fast_ggn_matches_dense_ggn_on_least_squares_and_on_a_deep_net():
    torch.manual_seed(0)
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 1, dtype=torch.float64)
    linear = nn.Sequential(nn.Linear(3, 1)).double()
    for rec, delta, _g, hess in _probe_steps(linear, F.mse_loss, (x, y), curvature="ggn"):
        assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-12  # GGN = H for linear models
    deep = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    opt = torch.optim.Adam(deep.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(deep, F.mse_loss, opt, curvature="ggn", path="fast")
    for _ in range(3):
        output, theta0 = flat_loss(Case(deep, lambda out, _: out, (x, y)))  # the model's output as a function of θ
        jac = torch.autograd.functional.jacobian(output, theta0).reshape(len(y), -1)  # J = ∂f/∂θ at θ_t, dense
        _, hess = dense_hessian(Case(deep, F.mse_loss, (x, y)))
        opt.zero_grad()
        F.mse_loss(deep(x), y).backward()
        rec = probe.step((x, y))
        delta = flat(deep.parameters()).detach() - theta0
        ggn = 2 / len(y) * (jac @ delta).square().sum()  # Δᵀ Jᵀ (2/N) I J Δ: the mean squared error's ∇²_f is 2/N
        assert rec.path == "fast" and rel_err(rec.curvature, ggn / rec.lr**2) <= 1e-10
        assert rel_err(ggn, delta @ hess @ delta) > 1e-6  # and it is not ΔᵀHΔ: the tanh's second derivative is left out


@pytest.mark.parametrize(("curvature", "tol"), [("fd", 1e-7), ("fd_onesided", 1e-4), ("secant", 2e-2)])
def test_backends_reusing_the_training_step_approximate_dense(curvature, tol):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    batch = (torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64))
    for rec, delta, g, hess in _probe_steps(model, F.mse_loss, batch, curvature=curvature, lr=1e-3):
        assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= tol
        assert rel_err(rec.slope, delta @ g / rec.lr) <= 1e-12


def _float32_mlp():
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 5))
    return model, F.cross_entropy, (torch.randn(32, 6), torch.randint(0, 5, (32,)))


def _float32_transformer():
    model = alphalib.models.CharTransformer(7, d_model=8, n_heads=2, n_layers=1, block=8)
    return model, alphalib.models.sequence_cross_entropy, (torch.randint(0, 7, (4, 8)), torch.randint(0, 7, (4, 8)))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("make", [_float32_mlp, _float32_transformer], ids=["mlp", "transformer"])
def test_fast_path_in_float32_within_stated_tolerance(make, curvature):
    """float32: the two-product identity cancels; stated tolerance 1e-3 relative against float64 dense."""
    torch.manual_seed(0)
    model, loss_fn, batch = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = alphalib.AlphaProbe(model, loss_fn, opt, curvature=curvature, path="fast")
    for _ in range(3):
        ref = make()[0].double()
        ref.load_state_dict(model.state_dict())  # θ_t in float64
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        rec = probe.step(batch)
        assert rec.path == "fast"
        delta = flat(
            [p.detach().double() - r.detach() for p, r in zip(model.parameters(), ref.parameters(), strict=True)]
        )
        inputs = batch[0].double() if batch[0].is_floating_point() else batch[0]
        g, hess = dense_hessian(Case(ref, loss_fn, (inputs, batch[1])))
        if curvature == "hessian":
            assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-3
        assert rel_err(rec.slope, delta @ g / rec.lr) <= 1e-3


def test_covers_names_what_it_does_not_cover():
    assert covers(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) is None
    assert covers(alphalib.models.CharTransformer(10, d_model=8, n_heads=2, n_layers=1, block=4)) is None
    assert "RMSNorm (1) has no rule" in covers(nn.Sequential(nn.Linear(2, 2), nn.RMSNorm(2)))
    assert "in-place" in covers(nn.Sequential(nn.Linear(2, 2), nn.ELU(inplace=True)))
    noisy = alphalib.models.CharTransformer(10, d_model=8, n_heads=2, block=4, dropout=0.1)
    assert "attention dropout" in covers(noisy)
    custom = nn.Sequential(nn.Linear(2, 2))
    custom.forward = lambda x: x
    assert "overrides forward" in covers(custom)

    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    assert "Residual overrides forward" in covers(Residual(nn.Linear(2, 2)))


class _Atan(nn.Module):
    def forward(self, x):
        return torch.atan(x)  # an operation the fast path has no rule for


def test_auto_path_falls_back_to_generic_and_names_the_op_and_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Atan(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    F.mse_loss(model(x), y).backward()
    rec = probe.step((x, y))
    assert rec.path == "generic" and "aten.atan.default, which has no tangent rule" in rec.fallback
    line = _Atan.forward.__code__.co_firstlineno + 1
    assert f"{__file__}, line {line})" in rec.fallback


@pytest.mark.parametrize(
    ("loss_fn", "targets"),
    [
        (nn.MSELoss(), lambda: torch.randn(8, 3, dtype=torch.float64)),  # closed form
        (nn.CrossEntropyLoss(), lambda: torch.randint(0, 3, (8,))),  # closed form
        (nn.HuberLoss(delta=0.5), lambda: torch.randn(8, 3, dtype=torch.float64)),  # autograd on the output
        (nn.CrossEntropyLoss(label_smoothing=0.1), lambda: torch.randint(0, 3, (8,))),  # autograd on the output
    ],
    ids=["mse", "cross_entropy", "huber", "smoothed-ce"],
)
def test_fast_path_output_terms_for_any_loss(loss_fn, targets):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batch = (torch.randn(8, 4, dtype=torch.float64), targets())
    for rec, delta, g, hess in _probe_steps(model, loss_fn, batch):
        assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-10
        assert rel_err(rec.slope, delta @ g / rec.lr) <= 1e-10


def test_cross_entropy_output_terms_keep_float32_precision_near_one_hot():
    """On a fitted batch (p_y = 1 - 3e-7) the closed form takes no difference of nearly equal numbers: float32 terms
    agree with float64 autograd on the same logits (the uncentred forms gave a slope of exactly 0 here)."""
    from alphalib.fast.output import output_terms

    torch.manual_seed(0)
    targets = torch.randint(0, 5, (16,))
    logits = torch.randn(16, 5) + 17 * F.one_hot(targets, 5)  # every sample fitted: loss ~ 3e-7
    t = torch.randn(16, 5)
    _, slope, curvature = output_terms(F.cross_entropy, logits, targets, t)
    out = logits.double().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(out, targets), out, create_graph=True)
    (hv,) = torch.autograd.grad((g * t.double()).sum(), out)
    assert rel_err(slope.item(), (g * t.double()).sum().item()) <= 1e-5
    assert rel_err(curvature.item(), (hv * t.double()).sum().item()) <= 1e-5


def _transformer_case():
    torch.manual_seed(0)
    model = alphalib.models.CharTransformer(5, d_model=4, n_heads=2, n_layers=2, block=4).double()
    batch = (torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4)))
    return model, batch


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_fast_path_exact_on_the_transformer(curvature):
    """Two blocks: LayerNorm, residual connections, causal attention and embeddings against the dense Hessian."""
    model, batch = _transformer_case()
    loss_fn = alphalib.models.sequence_cross_entropy
    for rec, delta, g, hess in _probe_steps(model, loss_fn, batch, curvature=curvature):
        assert rel_err(rec.slope, delta @ g / rec.lr) <= 1e-10
        if curvature == "hessian":
            assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-10


@pytest.mark.parametrize(
    "norm",
    [nn.LayerNorm(6), nn.LayerNorm(6, elementwise_affine=False), nn.LayerNorm(6, bias=False), nn.LayerNorm([2, 3])],
    ids=["affine", "plain", "no-bias", "2d"],
)
def test_fast_path_exact_through_layer_norm(norm):
    torch.manual_seed(0)
    tail = [nn.Unflatten(1, (2, 3)), norm, nn.Flatten()] if len(norm.normalized_shape) == 2 else [norm]
    model = nn.Sequential(nn.Linear(3, 6), *tail, nn.GELU(), nn.Linear(6, 2)).double()
    batch = (torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64))
    for rec, delta, g, hess in _probe_steps(model, F.mse_loss, batch):
        assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-10
        assert rel_err(rec.slope, delta @ g / rec.lr) <= 1e-10


def test_reused_module_falls_back_to_generic_for_the_step():
    torch.manual_seed(0)
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 1)).double()
    batch = (torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    g, hess = dense_hessian(Case(model, F.mse_loss, batch))
    before = flat([p.detach().clone() for p in model.parameters()])
    F.mse_loss(model(batch[0]), batch[1]).backward()
    rec = probe.step(batch)
    delta = flat([p.detach() for p in model.parameters()]) - before
    assert rec.path == "generic"
    assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-10


def test_registered_rule_with_a_residual_around_a_layer_is_exact():
    """A layer whose input feeds other consumers too still gets the error through itself alone."""
    torch.manual_seed(0)
    model = residual_net().double()
    batch = (torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64))
    for rec, delta, g, hess in _probe_steps(model, F.mse_loss, batch):
        assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-10
        assert rel_err(rec.slope, delta @ g / rec.lr) <= 1e-10


@pytest.mark.parametrize("mode", ["train", "eval", "no-running-stats"])
def test_fast_path_exact_through_batch_norm(mode):
    """Batch statistics couple the samples (train), running statistics make the layer affine (eval)."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(5, track_running_stats=mode != "no-running-stats")
    model = nn.Sequential(nn.Linear(3, 5), norm, nn.GELU(), nn.Linear(5, 2)).double()
    if mode == "eval":
        with torch.no_grad():
            norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2.0)
        model.eval()
    batch = (torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64))
    for rec, delta, g, hess in _probe_steps(model, F.mse_loss, batch):
        assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-10
        assert rel_err(rec.slope, delta @ g / rec.lr) <= 1e-10


@pytest.mark.parametrize("case", ["affine-2d", "plain-1d", "one-group", "per-channel", "ggn"])
def test_fast_path_exact_through_group_norm(case):
    """GroupNorm couples the channels of a group and the spatial axes, sample by sample; with a grouped conv."""
    torch.manual_seed(0)
    groups, affine = {"one-group": (1, True), "per-channel": (4, True), "plain-1d": (2, False)}.get(case, (2, True))
    if case == "plain-1d":
        model = nn.Sequential(
            nn.Conv1d(2, 4, 3), nn.GroupNorm(groups, 4, affine=affine), nn.SiLU(), nn.Flatten(), nn.Linear(12, 2)
        )
        x = torch.randn(5, 2, 5, dtype=torch.float64)
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, groups=2),
            nn.GroupNorm(groups, 4, affine=affine),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        )
        x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    model = model.double()
    batch = (x, torch.randn(5, 2, dtype=torch.float64))
    curvature = "ggn" if case == "ggn" else "hessian"
    for rec, delta, g, hess in _probe_steps(model, F.mse_loss, batch, curvature=curvature):
        if curvature == "hessian":
            assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-10
        assert rel_err(rec.slope, delta @ g / rec.lr) <= 1e-10
    twin = copy.deepcopy(model)  # the same step on both paths: fast equals generic (checked on dense GGNs elsewhere)
    fast = next(_probe_steps(model, F.mse_loss, batch, curvature=curvature, steps=1))[0]
    generic = next(_probe_steps(twin, F.mse_loss, batch, curvature=curvature, path="generic", steps=1))[0]
    assert rel_err(fast.curvature, generic.curvature) <= 1e-10


class _KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.fc(input=x))  # hooks see no positional input


@alphalib.fast.register(_KeywordCall)
def _keyword_call_tangent(sweep, m, t):  # a wrong rule too: it forgets the tanh
    return sweep(m.fc, t)


def test_a_step_the_rules_cannot_follow_is_measured_generically():
    """A layer called by keyword leaves nothing for its rule: that step goes generic, exact, and says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _KeywordCall(), nn.Linear(4, 1)).double()
    batch = (torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    assert probe.path == "fast"  # every module has a rule
    for _ in range(2):
        before = flat([p.detach().clone() for p in model.parameters()])
        g, hess = dense_hessian(Case(model, F.mse_loss, batch))
        opt.zero_grad()
        F.mse_loss(model(batch[0]), batch[1]).backward()
        rec = probe.step(batch)
        delta = flat([p.detach() for p in model.parameters()]) - before
        assert rec.path == "generic" and rec.flag == "ok"
        assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-10
