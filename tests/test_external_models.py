r"""Models as other libraries build them: torchvision's ResNet, timm's ViT, Hugging Face GPT-2, nanoGPT, torch's
``nn.TransformerEncoder``, ``nn.LSTM`` and ``nn.GRU``, in tiny float64 configurations built in code (no downloads).
GPT-2 is ``transformers``' own (the ``models`` extra); torchvision and timm have only CUDA builds at torch's pin,
so their ResNet and ViT, and nanoGPT (not a package), are the rebuilds in :mod:`alphalib.external`.

Each is checked for exact slope and curvature along the realized Adam step on the fast path, on ``path="auto"`` and,
for the models that return their loss, through an :func:`alphalib.objective`; the fast path against the generic one
on the same step (``"hessian"`` and ``"ggn"``); and the probe as a pure observer.

The reference is the training loss as a function of one flat float64 parameter vector (``conftest.flat_loss``:
``functional_call``, the step's dropout draws replayed), differentiated by autograd at θ_t: :math:`g^\top\Delta`, and
:math:`\Delta^\top H \Delta` as :math:`\Delta^\top \nabla(g^\top\Delta)`, the dense Hessian contracted with Δ
without forming it (forming it takes one double-backward pass per parameter: tens of seconds a step for these models
on two cores, a minute for the ResNet).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Case, flat, flat_loss, rel_err
from test_fast_ops import _Replay, _steps
from torch import nn
from torch.nn import functional as F

import alphalib
from alphalib import external


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one intra-op thread is as fast, and keeps the file fast on a busy two-core machine (two
    threads there spin against other processes: several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the models ---------------------------------------------------------------------------------------------


def tv_resnet() -> nn.Module:
    """torchvision's ``resnet18`` structure (7×7 stem, max pooling, four stages of two ``BasicBlock`` s, one in-place
    ReLU used twice, ``out += identity``) at widths 2, 2, 3, 3."""
    return external.ResNet18(3, widths=(2, 2, 3, 3))


def timm_vit() -> nn.Module:
    """timm's ``VisionTransformer`` on 3×8×8 images in 4×4 patches: width 8, one block, 2 heads, MLP width 8."""
    return external.VisionTransformer(8, 4, num_classes=3, embed_dim=8, depth=1, num_heads=2, mlp_ratio=1.0)


def hf_gpt2(attn: str = "sdpa", dropout: float = 0.0) -> nn.Module:
    """Hugging Face's ``GPT2LMHeadModel`` (its default ``gelu_new``, cache on): one layer, width 8, 2 heads, MLP width
    8, vocabulary 11, tied head. 632 parameters."""
    transformers = pytest.importorskip("transformers")  # the models extra
    GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=11,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_inner=8,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        attn_implementation=attn,
    )
    model = GPT2LMHeadModel(config).train()
    assert model.config._attn_implementation == attn
    return model


class Logits(nn.Module):
    """A Hugging Face causal LM as ``input_ids -> logits``, for a ``loss_fn(logits, targets)``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids).logits


def nanogpt() -> nn.Module:
    """nanoGPT at one layer, width 8, 2 heads, vocabulary 11, block 8, biases. 1040 parameters."""
    return external.GPT(external.GPTConfig())


class NanoLogits(nn.Module):
    """nanoGPT's logits at every position, as its forward computes them when it is given targets (given none, it
    keeps the last position only)."""

    def __init__(self, gpt: external.GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx):
        tr = self.gpt.transformer
        x = tr.drop(tr.wte(idx) + tr.wpe(torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)))
        for block in tr.h:
            x = block(x)
        return self.gpt.lm_head(tr.ln_f(x))


class NanoWithTargets(nn.Module):
    """nanoGPT's logits at every position from its own forward, given targets (it computes its loss too, unused)."""

    def __init__(self, gpt: external.GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx):
        return self.gpt(idx, idx)[0]


class EncoderNet(nn.Module):
    """Embedding → torch's ``nn.TransformerEncoder`` (2 layers, batch first) → mean over positions → linear head.
    1011 parameters."""

    def __init__(self, norm_first: bool, dropout: float = 0.0, vocab: int = 7, d: int = 8, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(
            d, 2, dim_feedforward=8, dropout=dropout, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class CharRNN(nn.Module):
    """A character model: embedding → one-layer ``nn.LSTM`` or ``nn.GRU`` (hidden 4, batch first) → linear head per
    position. 223 parameters (LSTM), 183 (GRU)."""

    def __init__(self, cell: type[nn.RNNBase], vocab: int = 7, width: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = cell(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, x):
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


def sequence_ce(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ---- the problems -------------------------------------------------------------------------------------------


def _tokens(vocab: int, batch: int = 4, length: int = 6) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


def _next_token(vocab: int):
    t = _tokens(vocab)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _images(channels: int = 3, size: int = 8, batch: int = 4, classes: int = 3):
    return torch.randn(batch, channels, size, size, dtype=torch.float64), torch.randint(0, classes, (batch,))


#: name -> (model, batch, loss_fn), each built from the seed set just before
MODELS = {
    "tv-resnet": (tv_resnet, _images, F.cross_entropy),
    "timm-vit": (timm_vit, _images, F.cross_entropy),
    "gpt2-sdpa": (lambda: Logits(hf_gpt2("sdpa")), lambda: _next_token(11), sequence_ce),
    "gpt2-eager": (lambda: Logits(hf_gpt2("eager")), lambda: _next_token(11), sequence_ce),
    "nanogpt": (lambda: NanoLogits(nanogpt()), lambda: _next_token(11), sequence_ce),
    "nanogpt-targets": (lambda: NanoWithTargets(nanogpt()), lambda: _next_token(11), sequence_ce),
    "encoder-postnorm": (
        lambda: EncoderNet(False),
        lambda: (_tokens(7, 6, 5), torch.randint(0, 3, (6,))),
        F.cross_entropy,
    ),
    "encoder-prenorm": (
        lambda: EncoderNet(True),
        lambda: (_tokens(7, 6, 5), torch.randint(0, 3, (6,))),
        F.cross_entropy,
    ),
    "lstm": (lambda: CharRNN(nn.LSTM), lambda: _next_token(7), sequence_ce),
    "gru": (lambda: CharRNN(nn.GRU), lambda: _next_token(7), sequence_ce),
}


def _problem(name: str, seed: int = 0):
    torch.manual_seed(seed)
    build, batch, loss_fn = MODELS[name]
    return build().double().train(), batch(), loss_fn


#: name -> (model, objective fn(model, batch), batch): models that compute their own loss
OBJECTIVES = {
    "gpt2-sdpa": (
        lambda: hf_gpt2("sdpa"),
        lambda m, b: m(**b).loss,
        lambda: (lambda t: {"input_ids": t, "labels": t})(_tokens(11)),
    ),
    "gpt2-eager": (
        lambda: hf_gpt2("eager"),
        lambda m, b: m(**b).loss,
        lambda: (lambda t: {"input_ids": t, "labels": t})(_tokens(11)),
    ),
    "nanogpt": (nanogpt, lambda m, b: m(*b)[1], lambda: _next_token(11)),
}


class _Objective(nn.Module):
    """``fn(model, batch)`` as a module of the batch, so that the reference can swap the parameters."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.model, batch)


def _reference(case: Case):
    """Freeze the loss at θ_t (parameters, buffers, RNG) now; return ``Δ -> (gᵀΔ, ΔᵀHΔ)``, to call after the step."""
    f, theta0 = flat_loss(case)

    def along(delta):
        theta = theta0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(theta), theta, create_graph=True)
        (h_delta,) = torch.autograd.grad(g @ delta, theta)
        return (g.detach() @ delta).item(), (delta @ h_delta).item()

    return along


def _exact_steps(model, loss_fn, batch, *, path, steps=3):
    """Yield (record, gᵀΔ, ΔᵀHΔ at θ_t) for a few Adam steps of ``test_graph._steps``."""
    run = _steps(model, loss_fn, batch, path=path, steps=steps, dense=False)
    for _ in range(steps):
        along = _reference(Case(_Replay(model, torch.get_rng_state()), loss_fn, batch))
        rec, delta, _, _ = next(run)
        yield rec, *along(delta)


def _objective_steps(model, fn, batch, *, path, steps=3, lr=1e-2):
    """Yield (record, gᵀΔ, ΔᵀHΔ at θ_t) for a few Adam steps on ``fn(model, batch)``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    probe = alphalib.AlphaProbe(model, alphalib.objective(fn), opt, curvature="hessian", path=path)
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        along = _reference(
            Case(_Replay(_Objective(model, fn), torch.get_rng_state()), lambda loss, _: loss, (batch, None))
        )
        opt.zero_grad()
        fn(model, batch).backward()
        rec = probe.step(batch)
        yield rec, *along(flat([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]))


def _exact(rec, slope, curvature) -> None:
    assert rel_err(rec.curvature, curvature / rec.lr**2) <= 1e-10
    assert rel_err(rec.slope, slope / rec.lr) <= 1e-10


# ---- exact against the float64 reference -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_path_is_exact(name):
    model, batch, loss_fn = _problem(name)
    for rec, *ref in _exact_steps(model, loss_fn, batch, path="fast"):
        assert rec.path == "fast" and rec.fallback == "", rec.fallback
        _exact(rec, *ref)


@pytest.mark.parametrize("name", list(MODELS))
def test_auto_takes_the_fast_path_and_is_exact(name):
    model, batch, loss_fn = _problem(name)
    for rec, *ref in _exact_steps(model, loss_fn, batch, path="auto"):
        assert rec.path == "fast" or "timing the generic path" in rec.fallback, rec.fallback  # (its 2nd step)
        _exact(rec, *ref)


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.parametrize("path", ["auto", "generic"])
def test_objective_is_exact(name, path):
    """Models that return their loss plug in as they are, through an objective (measured on the generic path)."""
    torch.manual_seed(0)
    build, fn, batch = OBJECTIVES[name]
    model = build().double().train()
    for rec, *ref in _objective_steps(model, fn, batch(), path=path):
        assert rec.path == "generic" and rec.flag != "error"
        _exact(rec, *ref)


@pytest.mark.parametrize("name", [n for n in MODELS if n != "lstm"])  # (float32 LSTMs run one fused oneDNN op)
def test_fast_path_in_float32_within_stated_tolerance(name):
    """float32 training, probed on the fast path: within 1e-3 relative of the float64 reference at the same θ_t."""
    torch.manual_seed(0)
    build, make_batch, loss_fn = MODELS[name]
    model = build().float().train()
    x, y = make_batch()
    x = x.float() if x.is_floating_point() else x
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = alphalib.AlphaProbe(model, loss_fn, opt, path="fast")
    for _ in range(2):
        twin = copy.deepcopy(model).double()  # θ_t in float64
        along = _reference(Case(twin, loss_fn, (x.double() if x.is_floating_point() else x, y)))
        before = [p.detach().double() for p in model.parameters()]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        rec = probe.step((x, y))
        assert rec.path == "fast", rec.fallback
        slope, curvature = along(
            flat([p.detach().double() - b for p, b in zip(model.parameters(), before, strict=True)])
        )
        assert rel_err(rec.curvature, curvature / rec.lr**2) <= 1e-3
        assert rel_err(rec.slope, slope / rec.lr) <= 1e-3


# ---- the fast path against the generic path on the same step ------------------------------------------------


def _fast_and_generic(model, loss_fn, batch, curvature, steps=2):
    twin = copy.deepcopy(model)
    state = torch.get_rng_state()
    fast = [r for r, *_ in _steps(model, loss_fn, batch, curvature=curvature, steps=steps, dense=False)]
    torch.set_rng_state(state)
    generic = [
        r for r, *_ in _steps(twin, loss_fn, batch, curvature=curvature, path="generic", steps=steps, dense=False)
    ]
    for a, b in zip(fast, generic, strict=True):
        assert b.path == "generic"
        assert a.path == "fast" and a.fallback == "", a.fallback
        assert rel_err(a.curvature, b.curvature) <= 1e-10 and rel_err(a.slope, b.slope) <= 1e-10


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_fast_equals_generic_on_the_same_step(name, curvature):
    model, batch, loss_fn = _problem(name, seed=1)
    _fast_and_generic(model, loss_fn, batch, curvature)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_encoder_with_dropout_fast_equals_generic(norm_first, curvature):
    """Dropout in train mode (on the attention weights inside the attention kernel, and after it): same step."""
    torch.manual_seed(2)
    model = EncoderNet(norm_first, dropout=0.2).double().train()
    _fast_and_generic(model, F.cross_entropy, (_tokens(7, 6, 5), torch.randint(0, 3, (6,))), curvature)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_full_resnet18_fast_equals_generic(curvature):
    """resnet18 at torchvision's widths (11M parameters), one step on two 3×32×32 images, float64."""
    torch.manual_seed(0)
    model = external.ResNet18(3).double().train()
    batch = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 2])
    _fast_and_generic(model, F.cross_entropy, batch, curvature, steps=1)


# ---- a pure observer ----------------------------------------------------------------------------------------

OBSERVED = {
    "tv-resnet": (tv_resnet, _images, F.cross_entropy),  # BatchNorm's running statistics
    "gpt2-dropout": (lambda: Logits(hf_gpt2("sdpa", dropout=0.1)), lambda: _next_token(11), sequence_ce),  # the RNG
    "lstm": (lambda: CharRNN(nn.LSTM), lambda: _next_token(7), sequence_ce),
}


@pytest.mark.parametrize("name", list(OBSERVED))
def test_probing_changes_no_bit_of_training(name):
    """Parameters, buffers, optimizer state and the RNG stream end as without the probe (path='fast')."""
    build, make_batch, loss_fn = OBSERVED[name]

    def run(probed):
        torch.manual_seed(3)
        model = build().double().train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        probe = alphalib.AlphaProbe(model, loss_fn, opt, path="fast") if probed else None
        x, y = make_batch()
        for _ in range(3):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            probe.step((x, y)) if probed else opt.step()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return state, copy.deepcopy(opt.state_dict()), torch.get_rng_state(), probe

    plain, probed = run(False), run(True)
    _same_training(plain, probed)
    assert all(r.path == "fast" and r.fallback == "" for r in probed[3].records), probed[3].records[-1].fallback


def test_probing_an_objective_changes_no_bit_of_training():
    """The same for GPT-2 with dropout through ``objective(lambda m, b: m(**b).loss)`` (path='auto')."""
    fn = lambda m, b: m(**b).loss  # noqa: E731

    def run(probed):
        torch.manual_seed(3)
        model = hf_gpt2("sdpa", dropout=0.1).double().train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        probe = alphalib.AlphaProbe(model, alphalib.objective(fn), opt) if probed else None
        t = _tokens(11)
        batch = {"input_ids": t, "labels": t}
        for _ in range(3):
            opt.zero_grad()
            fn(model, batch).backward()
            probe.step(batch) if probed else opt.step()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return state, copy.deepcopy(opt.state_dict()), torch.get_rng_state(), probe

    plain, probed = run(False), run(True)
    _same_training(plain, probed)
    assert all(r.flag != "error" for r in probed[3].records), probed[3].records[-1].fallback


def _same_training(plain, probed) -> None:
    assert plain[0].keys() == probed[0].keys()
    assert all(torch.equal(plain[0][k], probed[0][k]) for k in plain[0])
    for a, b in zip(plain[1]["state"].values(), probed[1]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert torch.equal(plain[2], probed[2])
