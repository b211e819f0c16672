r"""What does probing cost? Time and peak memory of a probed training step relative to a plain one.

    python benchmarks/overhead.py [--quick] [--out benchmarks/results] [--workloads seed,mlp,cnn,transformer,...]
                                  [--repeats R] [--steps K] [--threads 2] [--device cpu|cuda]

A *step* is ``zero_grad`` + forward + loss + backward + either ``optimizer.step()`` (plain) or
``probe.step(batch)`` (probed). Every configuration (curvature backend × path, an ``every=4`` row, a row
whose timed steps are all left unprobed, the two hand-written Hessian-vector products a PyTorch user writes
instead of the probe, and Cockpit's ``Alpha`` when installed) gets its own copy of the model and optimizer,
built from the same seed, and trains on the same sequence of ``POOL`` batches, so all of them follow the same
trajectory (the probe never changes training) and share one process.

**Time.** Every configuration is warmed up, then timed as blocks of K consecutive steps. Each of the R
repeats runs the blocks interleaved with plain blocks, ``plain, c1, plain, c2, ..., plain, cN, plain``,
with the order of ``c1..cN`` rotated from repeat to repeat; a configuration's block is paired with the mean
of the two plain blocks around it, so slow drift (thermal, other tenants on a shared machine) hits both
sides of each ratio alike. The overhead of a repeat is ``(probed - plain) / plain``; the table gives the
median over the R paired ratios and their interquartile range (IQR), each ratio taken per step. K is a
multiple of 4 so that an ``every=4`` block always probes exactly K/4 steps. Cockpit, whose step can take a
hundred plain ones, runs shorter blocks of about ``BLOCK_SECONDS`` (its K is in overhead.csv).

**Memory.** Measured once per configuration, untimed. Peak = *resident* bytes (parameters, their grads,
the optimizer's state tensors, the buffers and the copy of θ_t a probe on every step keeps, each storage counted
once) + the largest rise of CPU
allocations during the step. The rise comes from ``torch.profiler`` with ``profile_memory=True``: the raw
``[memory]`` records (``prof.profiler.kineto_results.events()``, +bytes on allocation, -bytes on free) are
summed in time order and the running maximum is taken. Caveat found while writing this: the profiler only
reports the free of a block that was allocated *while it was recording*, so the grads that ``zero_grad``
releases (allocated by the previous step) would be missed and the peak overstated by one set of grads.
The profiler therefore records one extra step first and only the measured step's window (a
``record_function`` marker) is summed; over that window allocations and frees balance to zero in steady
state, which the script checks (it prints a warning otherwise). The ``every=4`` row is measured over a
window of 4 steps, one of them probed. With ``--device cuda`` the rise is ``max_memory_allocated`` after
``reset_peak_memory_stats`` minus the memory allocated before the step. The ratio is peak probed / peak
plain; allocator caching, Python objects and the probe's small records are not counted.

**Caveats.** CPU timings on a shared two-core machine are noisy; read the IQR. ``seed`` is so small that
Python overhead dominates its step, so its ratios say little about real models. The probed step includes
the probe's forward pre-hook (it saves the RNG state on every forward), i.e. what a user pays. Do not run
it next to other CPU-heavy jobs: with two intra-op threads on two busy cores, OpenMP threads wait on each
other and a 0.3 ms step can take 20 ms (the script warns when the load average is high; ``--threads 1``
is then the better measurement).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import itertools
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile, record_function

import alphalib
from alphalib import external
from alphalib.lab.models import CharTransformer, EncoderClassifier, ResNet, SmallCNN, mlp, sequence_cross_entropy

# ----------------------------------------------------------------------------------------------------------
# config: the defaults take ~13 min on 2 idle CPU cores (--quick: ~2 min); the command line overrides them
WORKLOADS = ("seed", "mlp", "gelu_mlp", "cnn", "transformer")  # the package's own models, every backend
#: models as other libraries build them (make bench runs them for "hessian" and "ggn" into results/external/)
EXTERNAL = ("resnet18", "vit", "gpt2", "nanogpt", "encoder", "lstm", "gru")
OPTIMIZERS = ("adam", "adam_fused")  # torch.optim.Adam(lr=1e-3), and the same with fused=True
CURVATURES = ("hessian", "ggn", "fd", "fd_onesided", "secant")  # combinations the library lacks become "n/a"
PATHS = ("fast", "generic")  # passed as AlphaProbe(..., path=p); "default" = the keyword is not passed
#: what a PyTorch user writes instead of the probe: after optimizer.step(), d = Δ/lr, and the slope and curvature
#: by one Hessian-vector product on a fresh forward at θ_t, as a double backward or as forward-over-reverse
HAND_WRITTEN = ("double_backward", "jvp_grad")
#: (curvature, path, every) rows: sampling should cost about 1/every; with every=UNPROBED no timed step is probed
#: (only the first, in the warm-up), so the row is what the probe costs the steps it leaves alone
UNPROBED = 10**9
SAMPLED = (("hessian", "default", 4), ("hessian", "default", UNPROBED))
LR = 1e-3
SEED = 0
CPU = torch.device("cpu")
THREADS = 2
REPEATS = 11  # R: paired, interleaved repeats per configuration (odd: the median is one of them)
BLOCK_SECONDS = 0.1  # with --steps unset, K is chosen so that a block of plain steps takes about this long
MAX_STEPS = 400  # ... but at most this many steps per block (the seed problem's step is ~0.3 ms)
WARMUP = 8  # steps per configuration before anything is timed
#: batches each configuration cycles through, each drawn afresh: a model trained on one batch soon fits it, and
#: a fitted float32 batch is measured in float64 (a regime no real run stays in)
POOL = 64
QUICK = dict(repeats=3, steps=4, warmup=2)
OUT = "benchmarks/results"
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batches: list[tuple[Tensor, ...]]  #: POOL batches, trained on in turn (one batch alone is soon fitted)

    @property
    def batch(self) -> tuple[Tensor, ...]:
        return self.batches[0]


@dataclass
class Config:
    """One column of the benchmark: a model/optimizer copy and the step that trains it."""

    backend: str  # "plain", a curvature backend, or "cockpit"
    path: str = "-"  # the path requested
    every: int = 1
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: Callable[[], object] | None = None  # one full training step; None when the combination is n/a
    probe: alphalib.AlphaProbe | None = None
    note: str = ""
    steps: int = 0  # steps per timed block; 0: the workload's K (a slow peer gets fewer)
    times: list[float] = field(default_factory=list)  # seconds per step, one per repeat (a block's mean)
    paired_plain: list[float] = field(default_factory=list)  # the plain time each block is compared with

    @property
    def label(self) -> str:
        if self.backend in ("plain", "cockpit", *HAND_WRITTEN):
            return self.backend
        return (
            self.backend
            + ("" if self.path == "default" else f" · {self.path}")
            + ("" if self.every == 1 else " · unprobed steps" if self.every == UNPROBED else f" · every={self.every}")
        )

    @property
    def path_ran(self) -> str:
        if self.probe is None or not self.probe.records:
            return "-"
        return getattr(self.probe.records[-1], "path", "generic")


class _Logits(nn.Module):
    """A causal LM as ``ids -> logits`` at every position: Hugging Face's ``.logits``; nanoGPT's forward given
    targets (without them it keeps the last position only)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        if isinstance(self.lm, external.GPT):
            return self.lm(ids, ids)[0]
        return self.lm(input_ids=ids, use_cache=False).logits


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=96, n_positions=64, n_embd=128, n_layer=2, n_head=4, attn_implementation="sdpa")
    return _Logits(GPT2LMHeadModel(config))


def _nanogpt() -> nn.Module:
    return _Logits(external.GPT(external.GPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=4, n_embd=128)))


class _CharRNN(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.embed, self.head = nn.Embedding(96, 128), nn.Linear(128, 96)
        self.rnn = cell(128, 128, num_layers=2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(x))[0])


def make_workload(name: str, device: torch.device) -> Workload:
    if name == "seed":  # SimpleNet 10→5→1, batch 32, MSE
        draw = functools.partial(_draw, x=(32, 10), y=(32, 1))
        make, loss = alphalib.SimpleNet, nn.MSELoss()
    elif name == "mlp":  # 784-512-512-10 ReLU, batch 128, cross-entropy
        draw = functools.partial(_draw, x=(128, 784), classes=10)
        make, loss = (lambda: mlp([784, 512, 512, 10], "relu")), nn.CrossEntropyLoss()
    elif name == "gelu_mlp":  # 256-512-512-10 GELU, batch 256, cross-entropy: smooth activations' own terms
        draw = functools.partial(_draw, x=(256, 256), classes=10)
        make, loss = (lambda: mlp([256, 512, 512, 10], "gelu")), nn.CrossEntropyLoss()
    elif name == "cnn":  # SmallCNN on 3x32x32, batch 64, 10 classes
        draw = functools.partial(_draw, x=(64, 3, 32, 32), classes=10)
        make, loss = (lambda: SmallCNN(in_channels=3, n_classes=10, input_size=32)), nn.CrossEntropyLoss()
    elif name == "transformer":  # 2 layers, d_model 128, 4 heads, sequence 64, batch 16, vocabulary 96
        draw = functools.partial(_next_tokens, shape=(16, 64))
        make = lambda: CharTransformer(vocab_size=96, d_model=128, n_heads=4, n_layers=2, block=64)  # noqa: E731
        loss = sequence_cross_entropy
    elif name == "resnet":  # torchvision-style ResNet-8 (widths 16, 32, 64) on 3x32x32, batch 16: recorded-ops path
        draw = functools.partial(_draw, x=(16, 3, 32, 32), classes=10)
        make, loss = ResNet, nn.CrossEntropyLoss()
    elif name == "encoder":  # nn.TransformerEncoder, 2 layers, d 128, 4 heads, sequence 64, batch 16: recorded ops
        draw = functools.partial(_draw, x=(16, 64), vocab=50, classes=10)
        make, loss = (lambda: EncoderClassifier(50, d_model=128, d_ff=512)), nn.CrossEntropyLoss()
    elif name == "resnet18":  # torchvision's resnet18 (alphalib.external's rebuild), 3x32x32, batch 16
        draw = functools.partial(_draw, x=(16, 3, 32, 32), classes=10)
        make, loss = (lambda: external.ResNet18(10)), nn.CrossEntropyLoss()
    elif name == "vit":  # timm's vit_tiny_patch16_224 shape (width 192, depth 12, 3 heads) at 32 px in 4 px patches
        draw = functools.partial(_draw, x=(16, 3, 32, 32), classes=10)
        make, loss = (lambda: external.vit_tiny(32, 4, 10)), nn.CrossEntropyLoss()
    elif name in ("gpt2", "nanogpt"):  # 2 layers, d 128, 4 heads, sequence 64, batch 16, vocabulary 96
        draw = functools.partial(_next_tokens, shape=(16, 64))
        make, loss = (_gpt2 if name == "gpt2" else _nanogpt), sequence_cross_entropy
    elif name in ("lstm", "gru"):  # embedding 128 -> two recurrent layers, hidden 128 -> head, sequence 64, batch 16
        draw = functools.partial(_next_tokens, shape=(16, 64))
        make, loss = (lambda: _CharRNN(nn.LSTM if name == "lstm" else nn.GRU)), sequence_cross_entropy
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS + EXTERNAL)}.")
    g = torch.Generator().manual_seed(SEED)
    batches = [tuple(t.to(device) for t in draw(g)) for _ in range(POOL)]
    return Workload(name, make, loss, batches)


def _draw(
    g: torch.Generator, x: tuple[int, ...], *, vocab: int = 0, classes: int = 0, y: tuple[int, ...] = ()
) -> tuple[Tensor, Tensor]:
    """Gaussian inputs (token ids below ``vocab``) and class targets (Gaussian of shape ``y``)."""
    inputs = torch.randint(vocab, x, generator=g) if vocab else torch.randn(x, generator=g)
    return inputs, torch.randint(classes, x[:1], generator=g) if classes else torch.randn(y, generator=g)


def _next_tokens(g: torch.Generator, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Random token ids from a vocabulary of 96 and the same shifted by one: inputs and next-token targets."""
    tokens = torch.randint(96, (shape[0], shape[1] + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def make_optimizer(model: nn.Module, variant: str) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LR, fused=True if variant == "adam_fused" else None)


def why(exc: Exception) -> str:
    """The note of an unavailable row: "n/a: " and the first line of the error."""
    return "n/a: " + (str(exc).splitlines() or [type(exc).__name__])[0]


def make_config(
    w: Workload, variant: str, backend: str, path: str = "-", every: int = 1, device: torch.device = CPU
) -> Config:
    """Build a fresh, seeded model + optimizer and the training step of one configuration."""
    torch.manual_seed(SEED)
    model = w.make_model().to(device)
    optimizer = make_optimizer(model, variant)
    cfg = Config(backend, path, every, model, optimizer)
    batches = itertools.cycle(w.batches)  # every configuration sees the same sequence of batches
    if backend == "plain":
        finish: Callable[[tuple[Tensor, ...]], object] = lambda _: optimizer.step()  # noqa: E731
    elif backend == "cockpit":
        return cockpit_config(cfg, w)
    elif backend in HAND_WRITTEN:
        finish = hand_written(model, w.loss_fn, optimizer, backend)
    else:
        kwargs = {"curvature": backend, "every": every} | ({} if path == "default" else {"path": path})
        try:
            cfg.probe = probe = alphalib.AlphaProbe(model, w.loss_fn, optimizer, **kwargs)
        except (TypeError, ValueError) as exc:
            cfg.note = why(exc)
            return cfg
        finish = probe.step

    def step() -> object:
        x, y = batch = next(batches)
        optimizer.zero_grad()
        w.loss_fn(model(x), y).backward()
        return finish(batch)

    cfg.step = step
    if backend in HAND_WRITTEN:
        try:
            step()  # fail here, not in the timing loop (jvp has no rule for some kernels)
        except Exception as exc:  # a hand-written peer that cannot run this model is n/a, never the run
            cfg.note, cfg.step = why(exc), None
    return cfg


def hand_written(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], optimizer: torch.optim.Optimizer, mode: str
) -> Callable[[tuple[Tensor, ...]], float]:
    """The finish of a training step as a user writes it by hand: step, then α* by one Hessian-vector product."""
    names, params = zip(*((n, p) for n, p in model.named_parameters() if p.requires_grad), strict=True)

    def loss_at(theta: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(torch.func.functional_call(model, dict(zip(names, theta, strict=True)), (x,)), y)

    def finish(batch: tuple[Tensor, ...]) -> float:
        lr = optimizer.param_groups[0]["lr"]
        before = tuple(p.detach().clone() for p in params)
        optimizer.step()
        d = tuple((p.detach() - b) / lr for p, b in zip(params, before, strict=True))
        with sdpa_kernel(SDPBackend.MATH):  # CPU's fused attention kernels have no second derivatives
            if mode == "double_backward":
                theta = tuple(b.requires_grad_() for b in before)
                g = torch.autograd.grad(loss_at(theta, *batch), theta, create_graph=True)
                slope = sum((gi * di).sum() for gi, di in zip(g, d, strict=True))
                hd = torch.autograd.grad(slope, theta)
            else:
                g, hd = torch.func.jvp(torch.func.grad(lambda t: loss_at(t, *batch)), (before,), (d,))
                slope = sum((gi * di).sum() for gi, di in zip(g, d, strict=True))
        curvature = sum((hi * di).sum() for hi, di in zip(hd, d, strict=True))
        return (-slope / curvature).item()

    return finish


def cockpit_config(cfg: Config, w: Workload) -> Config:
    """Cockpit's ``Alpha`` (a noisy quadratic fit from two consecutive steps) as a peer; n/a when it fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cockpit imports pkg_resources, deprecated
            from backpack import extend
            from cockpit import Cockpit, quantities

        if not isinstance(w.loss_fn, (nn.MSELoss, nn.CrossEntropyLoss)):
            raise ValueError("Cockpit needs a BackPACK-extendable loss module (MSELoss or CrossEntropyLoss)")
        model, optimizer, batches = extend(cfg.model), cfg.optimizer, itertools.cycle(w.batches)
        loss_fn, individual = extend(type(w.loss_fn)(reduction="mean")), type(w.loss_fn)(reduction="none")
        cockpit = Cockpit(model.parameters(), quantities=[quantities.Alpha(lambda t: t >= 0)])  # every step
        counter = [0]

        def step() -> object:
            x, y = next(batches)
            optimizer.zero_grad()
            out = model(x)
            loss, losses = loss_fn(out, y), individual(out, y).detach()
            info = {"batch_size": x.shape[0], "individual_losses": losses, "loss": loss, "optimizer": optimizer}
            with cockpit(counter[0], info=info), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about create_graph=True, which Cockpit needs
                loss.backward(create_graph=cockpit.create_graph(counter[0]))
            optimizer.step()
            counter[0] += 1

        step()  # fail here, not in the timing loop
        cfg.step = step
    except Exception as exc:  # a third-party peer: any failure makes the row n/a, never the run
        cfg.note = why(exc)
    return cfg


def run_steps(step: Callable[[], object], k: int, device: torch.device) -> float:
    """Return the wall time of ``k`` consecutive training steps (the one timing loop for every config)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(k):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, probe: alphalib.AlphaProbe | None) -> int:
    """Bytes held between steps: parameters, grads, optimizer state and buffers, each storage once, and the copy of
    θ_t a probe on every step keeps for the next (its private ``_stash``)."""
    tensors = [*model.parameters(), *model.buffers(), *getattr(probe, "_stash", [])]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def step_rise_bytes(cfg: Config, device: torch.device) -> int:
    """The largest rise of allocated memory above its level at the start of ``cfg.every`` steps (one unprobed)."""
    assert cfg.step is not None
    window = 1 if cfg.every == UNPROBED else cfg.every
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(window):
            cfg.step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        cfg.step()  # lets the profiler see the allocations that the measured step frees
        with record_function("measured"):
            for _ in range(window):
                cfg.step()
    events = list(prof.profiler.kineto_results.events())
    mark = next(e for e in events if e.name() == "measured")
    deltas = [
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and mark.start_ns() <= e.start_ns() <= mark.end_ns()
    ]
    level = peak = 0
    for _, nbytes in sorted(deltas):
        level += nbytes
        peak = max(peak, level)
    if level != 0:
        warnings.warn(f"{cfg.label}: allocations and frees do not balance over the step ({level} bytes)", stacklevel=2)
    return peak


def peak_bytes(cfg: Config, device: torch.device) -> int:
    rise = step_rise_bytes(cfg, device)
    assert cfg.model is not None and cfg.optimizer is not None
    return resident_bytes(cfg.model, cfg.optimizer, cfg.probe) + rise


def calibrate_steps(plain: Config, device: torch.device) -> int:
    """K: a multiple of 4 such that a block of K plain steps takes about ``BLOCK_SECONDS``."""
    assert plain.step is not None
    per_step = run_steps(plain.step, 5, device) / 5
    k = min(MAX_STEPS, max(4, round(BLOCK_SECONDS / per_step)))
    return 4 * math.ceil(k / 4)


def time_interleaved(plain: Config, configs: list[Config], repeats: int, k: int, device: torch.device) -> None:
    """Fill ``times`` and ``paired_plain``: ``plain, c1, plain, c2, ..., cN, plain``, order rotated per repeat."""
    assert plain.step is not None
    for r in range(repeats):
        gc.collect()
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        before = run_steps(plain.step, k, device) / k
        plain.times.append(before)
        for cfg in order:
            assert cfg.step is not None
            steps = cfg.steps or k
            cfg.times.append(run_steps(cfg.step, steps, device) / steps)
            after = run_steps(plain.step, k, device) / k
            plain.times.append(after)
            cfg.paired_plain.append((before + after) / 2)
            before = after


def benchmark(w: Workload, variant: str, args: argparse.Namespace, have_cockpit: bool) -> list[dict]:
    """Time and measure every configuration of one workload and optimizer variant; one row per config."""
    device = torch.device(args.device)
    specs = [("plain", "-", 1)] + [(c, p, 1) for c in args.curvatures for p in PATHS]
    specs += [s for s in SAMPLED if s[0] in args.curvatures and not args.no_sampled]
    specs += [] if args.no_hand else [(h, "-", 1) for h in HAND_WRITTEN]
    specs += [("cockpit", "-", 1)] if have_cockpit else []
    configs = [make_config(w, variant, *spec, device=device) for spec in specs]
    live = [c for c in configs if c.step is not None]
    for cfg in live:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a failing backend warns once and flags "error"; reported below
            for _ in range(args.warmup):
                cfg.step()
        flag = cfg.probe.records[-1].flag if cfg.probe is not None and cfg.probe.records else "ok"
        if "error" in flag:
            cfg.note = "the backend failed: records flagged 'error'"
    plain, probed = live[0], live[1:]
    k = args.steps or calibrate_steps(plain, device)
    for cfg in probed:
        if cfg.backend == "cockpit":  # about BLOCK_SECONDS per block: Cockpit's step can take 100x a plain one
            cfg.steps = min(k, max(1, round(BLOCK_SECONDS / run_steps(cfg.step, 1, device))))
    if probed:
        time_interleaved(plain, probed, args.repeats, k, device)
    plain_peak = peak_bytes(plain, device)
    rows = []
    for cfg in configs:
        row = dict(
            workload=w.name,
            optimizer=variant,
            config=cfg.label,
            backend=cfg.backend,
            path=cfg.path,
            path_ran=cfg.path_ran,
            every=cfg.every,
            steps=cfg.steps or k,
            repeats=args.repeats,
        )
        if cfg.step is None:
            rows.append(row | dict(note=cfg.note))
            continue
        if cfg is plain:
            ratios = np.zeros(1)
        else:
            ratios = np.array(cfg.times) / np.array(cfg.paired_plain) - 1
        row["ms_per_step"] = 1e3 * float(np.median(cfg.times))
        row["time_ratio"] = float(np.median(ratios))
        row["iqr_lo"], row["iqr_hi"] = (float(q) for q in np.percentile(ratios, [25, 75]))
        row["peak_mb"] = (plain_peak if cfg is plain else peak_bytes(cfg, device)) / 2**20
        row["mem_ratio"] = row["peak_mb"] * 2**20 / plain_peak
        row["note"] = cfg.note
        rows.append(row | {"_ratios": ratios.tolist()})
        if cfg.probe is not None:
            cfg.probe.remove()
    return rows


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        names = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {datetime.date.today().isoformat()}"
    )


def fmt_ratio(row: pd.Series) -> str:
    if pd.isna(row.get("time_ratio")):
        return "n/a"
    if row["backend"] == "plain":
        return "0 (reference)"
    return f"{row['time_ratio']:+.2f} [{row['iqr_lo']:+.2f}, {row['iqr_hi']:+.2f}]"


def display(df: pd.DataFrame) -> pd.DataFrame:
    """The human-readable table: one formatted string column per quantity."""
    return pd.DataFrame(
        {
            "workload": df["workload"],
            "optimizer": df["optimizer"],
            "backend": df["backend"],
            "path (asked → ran)": [
                f"{a} → {b}" if b != "-" else a for a, b in zip(df["path"], df["path_ran"], strict=True)
            ],
            "every": ["unprobed" if e == UNPROBED else e for e in df["every"]],
            "ms/step": [f"{v:.2f}" if pd.notna(v) else "" for v in df.get("ms_per_step", np.nan)],
            "time overhead [IQR]": df.apply(fmt_ratio, axis=1),
            "peak memory": [f"{v:.2f}×" if pd.notna(v) else "" for v in df.get("mem_ratio", np.nan)],
            "note": [short(v) for v in df["note"].fillna("")],
        }
    )


def short(note: str, width: int = 90) -> str:
    """The first sentence of a note, cut to ``width`` characters."""
    note = note.split(". ")[0]
    return note if len(note) <= width else note[: width - 1] + "…"


def write_markdown(df: pd.DataFrame, path: Path, header: str, repeats: int) -> None:
    table = display(df)
    lines = [
        f"Machine: {header}. Time overhead = (probed − plain) / plain step time, the median of {repeats} "
        "paired, interleaved repeats of K steps (K per workload in overhead.csv) [IQR]; peak memory = peak of "
        "a probed step / peak of a plain step.",
        "",
        "| " + " | ".join(table.columns) + " |",
        "|" + "|".join("---" for _ in table.columns) + "|",
    ]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    path.write_text("\n".join(lines) + "\n")


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per workload and optimizer: the probe's exact and GGN overheads on the fast path, both hand-written
    HVPs, the probe over the cheaper of them, the steps ``every=k`` leaves unprobed, and the probed peak memory."""

    def pick(g: pd.DataFrame, config: str, column: str = "time_ratio") -> float:
        hit = g.loc[g["config"].eq(config), column]
        return float(hit.iloc[0]) if len(hit) else math.nan

    rows = []
    for (name, variant), g in df.groupby(["workload", "optimizer"], sort=False):
        probe, jvp = pick(g, "hessian · fast"), pick(g, "jvp_grad")
        hand = np.nanmin([pick(g, "double_backward"), jvp, math.inf])
        ran = g.loc[g["config"].eq("hessian · fast"), "path_ran"]
        rows.append(
            {
                "model": name,
                "optimizer": variant,
                "exact (hessian, fast)": f"{probe:.2f}" + ("" if ran.empty or ran.iloc[0] == "fast" else " (generic)"),
                "GGN, fast": f"{pick(g, 'ggn · fast'):.2f}",
                "double backward": f"{pick(g, 'double_backward'):.2f}",
                "jvp(grad)": f"{jvp:.2f}" if pd.notna(jvp) else "fails" if g["config"].eq("jvp_grad").any() else "–",
                "exact / cheaper hand-written": f"{probe / hand:.2f}" if math.isfinite(hand) else "n/a",
                "unprobed steps (every=k)": f"{pick(g, 'hessian · unprobed steps'):+.3f}",
                "peak memory, exact": f"{pick(g, 'hessian · fast', 'mem_ratio'):.2f}×",
            }
        )
    return pd.DataFrame(rows)


def write_summary(df: pd.DataFrame, path: Path, header: str) -> str:
    """Write :func:`summary` as markdown under a line saying what the numbers are; return the text."""
    table = summary(df)
    lines = [
        f"Machine: {header}. Overheads in plain steps, (probed − plain) / plain, medians of paired, interleaved "
        "repeats (overhead.md has their IQRs and every row); hand-written: after `optimizer.step()`, the slope and "
        "curvature along the step by one Hessian-vector product on a fresh forward at θ_t; peak memory: a probed "
        "step's over a plain step's.",
        "",
        "| " + " | ".join(table.columns) + " |",
        "|" + "|".join("---" for _ in table.columns) + "|",
    ]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(df: pd.DataFrame, path: Path, header: str, labels: list[str]) -> None:
    """Bars of each configuration's median overhead with its IQR, and of its peak memory, per workload: from the
    columns of overhead.csv alone, so ``--replot`` redraws a saved run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib import ticker

    probed = df[df["backend"].ne("plain") & df["time_ratio"].notna()]
    hue_order = [lab for lab in labels if lab in set(probed["config"])]
    pairs = iter(sns.color_palette("Paired", 12))  # light = fast, dark = generic, one hue per backend
    fixed = {"cockpit": "0.15", "double_backward": "#8c564b", "jvp_grad": "#e377c2"}
    sampled = {"every": "0.45", "unprobed": "0.75"}  # two greys: every=k, and the steps it leaves unprobed
    colors = {
        lab: fixed.get(lab) or next((c for k, c in sampled.items() if k in lab), None) or next(pairs)
        for lab in labels[1:]
    }
    workloads = list(dict.fromkeys(df["workload"]))
    variants = list(dict.fromkeys(df["optimizer"]))
    sns.set_theme(style="whitegrid", context="notebook")
    width = max(6.5, 0.9 * len(workloads))
    fig, axes = plt.subplots(2, len(variants), figsize=(width * len(variants), 8), sharey="row", squeeze=False)
    bar = 0.8 / len(hue_order)
    for j, variant in enumerate(variants):
        rows = probed[probed["optimizer"] == variant].set_index(["workload", "config"])
        for k, lab in enumerate(hue_order):
            at = [(i, rows.loc[(w, lab)]) for i, w in enumerate(workloads) if (w, lab) in rows.index]
            if not at:
                continue
            x = np.array([i for i, _ in at]) + (k - (len(hue_order) - 1) / 2) * bar
            med = np.array([r["time_ratio"] for _, r in at])
            iqr = np.array(
                [[r["time_ratio"] - r["iqr_lo"] for _, r in at], [r["iqr_hi"] - r["time_ratio"] for _, r in at]]
            )
            axes[0, j].bar(x, med, bar, color=colors[lab], label=lab)
            axes[0, j].errorbar(x, med, yerr=np.clip(iqr, 0, None), fmt="none", ecolor="0.2", elinewidth=1, capsize=1.5)
            axes[1, j].bar(x, [r["mem_ratio"] for _, r in at], bar, color=colors[lab], label=lab)
        ax = axes[0, j]
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("symlog", linthresh=1.0)  # linear up to 1, then logarithmic: Cockpit's row is ~100x
        ax.yaxis.set_major_locator(ticker.FixedLocator([0, 0.25, 0.5, 0.75, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500]))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.set(
            title={"adam": "Adam", "adam_fused": "Adam, fused=True"}.get(variant, variant),
            ylabel="time overhead, (probed − plain) / plain\n(symlog axis: linear to 1, log above)",
        )
        ax = axes[1, j]
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.FixedLocator([1, 1.5, 2, 3, 5, 10, 20, 50, 100]))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g×"))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.set(xlabel="workload", ylabel="peak memory, probed / plain")
        for ax in axes[:, j]:
            ax.set_xticks(range(len(workloads)), workloads, rotation=30, ha="right")
            ax.set_xlim(-0.5, len(workloads) - 0.5)
    # once every panel is drawn (the row shares its y axis; unprobed steps sit near zero)
    axes[0, 0].set_ylim(bottom=min(-0.1, float(probed["iqr_lo"].min()) - 0.05))
    handles, names = axes[0, 0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="black", linestyle="--", linewidth=1))
    names.append("1.0: time of one extra\nplain step / no extra memory")
    fig.legend(handles, names, title="curvature · path", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"Cost of AlphaProbe: median of paired interleaved repeats, IQR bars\n{header}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"tiny run (about a minute): {QUICK}")
    parser.add_argument("--out", default=OUT, help="folder for overhead.csv, overhead.md, overhead.png")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    parser.add_argument("--curvatures", default=",".join(CURVATURES), help="comma-separated subset of backends")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of Adam variants")
    parser.add_argument("--no-sampled", action="store_true", help="leave out the every=4 and unprobed rows")
    parser.add_argument("--no-peer", action="store_true", help="leave out Cockpit")
    parser.add_argument("--no-hand", action="store_true", help="leave out the hand-written HVPs")
    parser.add_argument("--repeats", type=int, default=None, help=f"R (default {REPEATS})")
    parser.add_argument("--steps", type=int, default=None, help=f"K (default: a ~{BLOCK_SECONDS}s plain block)")
    parser.add_argument("--warmup", type=int, default=None, help=f"warm-up steps per config (default {WARMUP})")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--replot", metavar="CSV", help="redraw overhead.png and summary.md from a saved overhead.csv")
    args = parser.parse_args()
    if args.replot:
        saved = pd.read_csv(args.replot)
        where = Path(args.replot).parent
        header = (where / "overhead.md").read_text().split(". Time overhead")[0].removeprefix("Machine: ")
        plot(saved, where / "overhead.png", header, list(dict.fromkeys(saved["config"])))
        print(write_summary(saved, where / "summary.md", header))
        return
    args.curvatures = [c.strip() for c in args.curvatures.split(",")]
    quick = QUICK if args.quick else {}
    args.repeats = args.repeats or quick.get("repeats", REPEATS)
    args.steps = args.steps or quick.get("steps")
    args.warmup = args.warmup or quick.get("warmup", WARMUP)
    if args.steps:
        args.steps = 4 * math.ceil(args.steps / 4)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    header = machine()
    print(f"# overhead benchmark: {header}")
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) - 0.5:
        print(
            f"# WARNING: load average {load:.1f} on {os.cpu_count()} cores: other processes compete, timings are "
            "unreliable (oversubscribed intra-op threads can slow small steps many-fold; try --threads 1)"
        )
    print(
        f"# R={args.repeats} repeats, K={args.steps or 'auto'} steps per block, warm-up {args.warmup}, "
        f"device {args.device}"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cockpit imports pkg_resources, deprecated
            import cockpit  # noqa: F401

        have_cockpit = not args.no_peer
    except ImportError:
        have_cockpit = False
        print("# cockpit (cockpit-for-pytorch) is not installed: no Cockpit peer row")

    start, rows = time.perf_counter(), []
    for name in args.workloads.split(","):
        w = make_workload(name.strip(), torch.device(args.device))
        for variant in args.optimizers.split(","):
            t0 = time.perf_counter()
            rows += benchmark(w, variant, args, have_cockpit)
            print(f"  {name} / {variant}: {time.perf_counter() - t0:.1f} s", flush=True)
    df = pd.DataFrame(rows)
    labels = list(dict.fromkeys(df["config"]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with pd.option_context("display.width", 250, "display.max_colwidth", 60, "display.max_rows", 500):
        print(display(df).to_string(index=False))
    df.drop(columns="_ratios").to_csv(out / "overhead.csv", index=False)
    write_markdown(df, out / "overhead.md", header, args.repeats)
    print(write_summary(df, out / "summary.md", header))
    plot(df, out / "overhead.png", header, labels)
    print(f"# wrote {out}/overhead.csv, overhead.md, summary.md, overhead.png in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
