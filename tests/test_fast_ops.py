"""The fast path over recorded operations: exact against dense float64 Hessians on models the module rules miss."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Case, dense_hessian, flat, rel_err
from torch import nn
from torch.nn import functional as F

import alphalib
from alphalib import fast, models
from alphalib.fast import covers


class Residual(nn.Module):
    """A residual MLP written as people write it: functional calls, one activation module used twice."""

    def __init__(self, act: str = "tanh"):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.Tanh() if act == "tanh" else nn.GELU()

    def forward(self, x):
        h = self.act(self.fc1(x))
        h = h + self.act(self.fc2(h))  # the same module twice, around a residual connection
        return self.head(F.relu(h) * torch.sigmoid(h))  # a functional gate: a product of two tangents


class Gated(nn.Module):
    """Dropout by function, a concatenation, a batched product and a mean: what the module rules cannot follow."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(10, 2)

    def forward(self, x):
        u, v = F.silu(self.a(x)), F.dropout(self.b(x), 0.3, self.training)
        w = torch.bmm(u.unsqueeze(2), v.unsqueeze(1)).mean(2)  # (B, 5, 5) -> (B, 5)
        return self.out(torch.cat([w, v], 1))


def tiny_resnet() -> nn.Module:
    return models.ResNet((3, 4), in_channels=2, n_classes=3)


def tiny_encoder() -> nn.Module:
    return models.EncoderClassifier(7, d_model=4, n_heads=2, n_layers=2, d_ff=6, n_classes=3)


class GroupNormNet(nn.Module):
    """A GroupNorm CNN with a grouped convolution, written with functional calls."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.conv2, self.norm2 = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.GroupNorm(1, 4, affine=False)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        h = F.gelu(self.norm1(self.conv1(x)))
        h = h + F.silu(self.norm2(self.conv2(h)))
        return self.fc(F.max_pool2d(h, 2).mean((2, 3)))


def _resnet_eval() -> nn.Module:  # BatchNorm on its running statistics
    model = tiny_resnet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    return model.eval()


class Products(nn.Module):
    """Matrix-vector and dot products with parameters on both sides (as spectral normalisation's sigma = u'Wv)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.v, self.w = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        scale = torch.dot(self.v, self.w) + torch.vdot(self.w, self.w)
        return torch.stack([torch.mv(h, self.v) * scale, torch.mv(h, self.w)], -1)


class Columns(nn.Module):
    """Weights on the left, as in the column-vector convention: :math:`y = W h`, each product ``mm(W, h)``."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(6, 4) / 2), nn.Parameter(torch.randn(3, 6) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(self.w2, torch.tanh(torch.mm(self.w1, x.T))).T


MODELS = {
    "residual-tanh": lambda: Residual("tanh"),
    "residual-gelu": lambda: Residual("gelu"),
    "gated": Gated,
    "resnet": tiny_resnet,
    "resnet-eval": _resnet_eval,
    "encoder": tiny_encoder,
    "groupnorm": GroupNormNet,
    "products": Products,
    "columns": Columns,
}
OUTPUTS = {"gated": 2, "products": 2}
INPUTS = {
    "resnet": lambda: torch.randn(6, 2, 8, 8, dtype=torch.float64),
    "resnet-eval": lambda: torch.randn(6, 2, 8, 8, dtype=torch.float64),
    "groupnorm": lambda: torch.randn(5, 2, 4, 4, dtype=torch.float64),
    "encoder": lambda: torch.randint(0, 7, (6, 5)),
}


def _batch(name: str, loss: str = "mse"):
    x = INPUTS.get(name, lambda: torch.randn(8, 4, dtype=torch.float64))()
    k = OUTPUTS.get(name, 3)
    y = torch.randn(len(x), k, dtype=torch.float64) if loss == "mse" else torch.randint(0, k, (len(x),))
    return x, y


def _steps(model, loss_fn, batch, *, curvature="hessian", path="fast", steps=3, lr=1e-2, dense=True):
    """Yield (record, Δ, dense g, dense H at θ_t) for a few Adam steps, replaying each step's dropout mask."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    probe = alphalib.AlphaProbe(model, loss_fn, opt, curvature=curvature, path=path)
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        rng = torch.get_rng_state()
        g = hess = None
        if dense:
            g, hess = dense_hessian(Case(_Replay(model, rng), loss_fn, batch))
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        rec = probe.step(batch)
        yield rec, flat([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]), g, hess


class _Replay(nn.Module):
    """``model`` with the global RNG set to ``state`` at every call: the training step's dropout mask each time."""

    def __init__(self, model, state):
        super().__init__()
        self.m, self.state = model, state

    def forward(self, x):
        with torch.random.fork_rng():
            torch.set_rng_state(self.state)
            return self.m(x)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("name", list(MODELS))
def test_recorded_ops_give_the_exact_curvature(name, loss):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    assert covers(model) is not None  # the module rules do not cover it: the recorded operations are followed
    loss_fn = F.mse_loss if loss == "mse" else F.cross_entropy
    for rec, delta, g, hess in _steps(model, loss_fn, _batch(name, loss)):
        assert rec.path == "fast" and rec.fallback == "" and rec.flag in ("ok", "ascent", "negative_curvature")
        assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-10
        assert rel_err(rec.slope, delta @ g / rec.lr) <= 1e-10


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_recorded_ops_equal_the_generic_path_on_the_same_step(name, curvature):
    torch.manual_seed(1)
    model = MODELS[name]().double()
    twin = copy.deepcopy(model)
    batch = _batch(name)
    state = torch.get_rng_state()
    fast = [r for r, *_ in _steps(model, F.mse_loss, batch, curvature=curvature, steps=2, dense=False)]
    torch.set_rng_state(state)
    generic = [
        r for r, *_ in _steps(twin, F.mse_loss, batch, curvature=curvature, path="generic", steps=2, dense=False)
    ]
    for a, b in zip(fast, generic, strict=True):
        assert a.path == "fast" and b.path == "generic"
        assert rel_err(a.curvature, b.curvature) <= 1e-10 and rel_err(a.slope, b.slope) <= 1e-10


def test_auto_follows_module_rules_where_they_cover_and_recorded_ops_elsewhere():
    covered, missed = nn.Sequential(nn.Linear(3, 2), nn.Tanh()), tiny_resnet()
    for model, kind in ((covered, fast.Capture), (missed, fast.OpCapture)):
        probe = alphalib.AlphaProbe(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1))
        assert probe.path == "fast" and type(probe._capture) is kind


def test_an_op_without_a_rule_goes_generic_and_names_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.RMSNorm(4), nn.Linear(4, 1)).double()
    batch = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64))
    for rec, delta, _g, hess in _steps(model, F.mse_loss, batch, steps=1):
        assert rec.path == "generic" and "no tangent rule" in rec.fallback and "aten." in rec.fallback
        assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-10


@pytest.mark.parametrize("name", ["gated", "resnet", "encoder"])
def test_recording_changes_no_bit_of_training(name):
    """Parameters, buffers (BatchNorm's statistics), optimizer state and the RNG stream (dropout) end as without."""

    def run(probed):
        torch.manual_seed(3)
        model = MODELS[name]().double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        probe = alphalib.AlphaProbe(model, F.mse_loss, opt, path="fast") if probed else None
        x, y = _batch(name)
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            probe.step((x, y)) if probed else opt.step()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return state, copy.deepcopy(opt.state_dict()), torch.get_rng_state(), probe

    plain, probed = run(False), run(True)
    assert plain[0].keys() == probed[0].keys() and all(torch.equal(plain[0][k], probed[0][k]) for k in plain[0])
    assert all(
        torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        for a, b in zip(plain[1]["state"].values(), probed[1]["state"].values(), strict=True)
    )
    assert torch.equal(plain[2], probed[2]) and all(r.path == "fast" for r in probed[3].records)


class TinyGPT(nn.Module):
    """nanoGPT's block structure: fused qkv, scaled_dot_product_attention (causal), GELU MLP, tied embeddings."""

    def __init__(self, vocab: int = 7, d: int = 4, heads: int = 2, block: int = 5):
        super().__init__()
        self.wte, self.wpe, self.heads = nn.Embedding(vocab, d), nn.Embedding(block, d), heads
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # weight tying

    def forward(self, idx):
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        q, k, v = self.c_attn(self.ln1(x)).split(x.shape[-1], dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(b, t, -1)
        x = x + self.c_proj(y)
        x = x + self.proj(F.gelu(self.fc(self.ln2(x))))
        return self.head(self.ln_f(x))


def _sequence_ce(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_a_nanogpt_style_model_runs_fast_through_the_fused_attention_kernel(curvature):
    torch.manual_seed(0)
    model = TinyGPT().double()
    tokens = torch.randint(0, 7, (3, 6))
    batch = tokens[:, :-1], tokens[:, 1:]
    twin = copy.deepcopy(model)
    for rec, delta, g, hess in _steps(model, _sequence_ce, batch, curvature=curvature):
        assert rec.path == "fast", rec.fallback
        if curvature == "hessian":
            assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-10
        assert rel_err(rec.slope, delta @ g / rec.lr) <= 1e-10
    generic = next(_steps(twin, _sequence_ce, batch, curvature=curvature, path="generic", steps=1, dense=False))[0]
    assert generic.path == "generic"


class _Clock:
    """A fake clock for the probe, moved on by the test: a training iteration takes ``fast`` or ``generic`` seconds,
    by the path the probe is about to take, and the loop between iterations ``outside`` seconds before a recorded
    one (an evaluation, say, that happens to fall there)."""

    def __init__(self, probe, fast: float, generic: float, outside: float = 0.0):
        self.probe, self.cost, self.outside, self.now = probe, {"fast": fast, "generic": generic}, outside, 0.0

    def _next(self) -> str:
        p = self.probe
        return "generic" if p._capture is None or p._trials is not None and p._trials.generic_next() else "fast"

    def between(self) -> None:
        self.now += self.outside if self._next() == "fast" else 0.0

    def tick(self) -> None:
        self.now += self.cost[self._next()]

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("fast_s", "generic_s", "outside_s", "kept"),
    [(1.0, 2.0, 0.0, "fast"), (2.0, 1.0, 0.0, "generic"), (1.0, 2.0, 10.0, "fast")],
)
def test_auto_times_both_paths_in_the_users_loop_and_keeps_the_faster(fast_s, generic_s, outside_s, kept):
    torch.manual_seed(0)
    model = tiny_resnet().double()
    x, y = _batch("resnet")
    probe = alphalib.AlphaProbe(model, F.mse_loss, torch.optim.Adam(model.parameters(), lr=1e-2))
    clock = probe._clock = _Clock(probe, fast_s, generic_s, outside_s)
    twin = copy.deepcopy(model)
    reference = alphalib.AlphaProbe(twin, F.mse_loss, torch.optim.Adam(twin.parameters(), lr=1e-2), path="generic")
    for _ in range(8):
        clock.between()  # time the loop spends outside the iteration is not the path's
        for m, p in ((model, probe), (twin, reference)):
            p.optimizer.zero_grad()
            F.mse_loss(m(x), y).backward()
            if p is probe:
                clock.tick()  # the iteration's own time, from its forward pass to the end of probe.step
            p.step((x, y))
    paths = [r.path for r in probe.records]
    assert paths[:5] == ["fast", "generic", "fast", "generic", "fast"]  # warm-up, then the trials
    assert "timing the generic path" in probe.records[1].fallback
    assert set(paths[5:]) == {kept} and probe.path == kept
    if kept == "generic":
        assert probe._capture is None and "measured the generic path faster" in probe.records[-1].fallback
    for a, b in zip(probe.records, reference.records, strict=True):  # the same numbers whichever path measured them
        assert rel_err(a.curvature, b.curvature) <= 1e-10 and rel_err(a.slope, b.slope) <= 1e-10


class _DictOut(nn.Module):
    """A model that returns a dict, as Hugging Face models return a ModelOutput."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": torch.tanh(self.fc(x))}


def test_a_model_that_returns_no_tensor_is_measured_on_the_generic_path_and_says_so():
    torch.manual_seed(0)
    model = _DictOut().double()
    loss_fn = lambda out, y: F.mse_loss(out["logits"], y)  # noqa: E731
    x, y = _batch("residual-tanh")
    for rec, delta, _g, hess in _steps(model, loss_fn, (x, y), steps=2):
        assert rec.path == "generic" and "output" in rec.fallback  # (the proof of capture needs a tensor output)
        assert rel_err(rec.curvature, delta @ hess @ delta / rec.lr**2) <= 1e-10
