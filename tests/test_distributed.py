"""``AlphaProbe`` under DistributedDataParallel: two gloo ranks on CPU against one process on the concatenated batch.

``tests/ddp_worker.py`` trains under ``torchrun`` (two ranks, float64, one launch for every run); the single process
here repeats the training on the concatenated batches with a plain probe, and an autograd reference (no alphalib)
evaluates slope and curvature at the parameters the DDP run went through. The helpers are tested without a process
group, and the probe's construction and failure handling in a world of one rank.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ddp_worker import LR, RUNS, global_batches, make_model
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import alphalib
from alphalib import distributed

WORKER = Path(__file__).with_name("ddp_worker.py")
TOL = 1e-10
FIELDS = ("loss", "slope", "curvature", "alpha_star", "grad_norm")


def _skip_reason() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this build of torch"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this build of torch"
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Launch the two-rank DDP worker once; return what rank 0 wrote."""
    if (reason := _skip_reason()) is not None:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("ddp")
    root = str(WORKER.parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=root)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the DDP worker did not finish in {exc.timeout} s (a rank waiting in a collective?)")
    assert done.returncode == 0, f"the DDP worker failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return torch.load(out / "runs.pt")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _same(a: object, b: object) -> bool:
    return a == b or isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


def _one_process(path: str) -> list[alphalib.Record]:
    """Train on the concatenated global batches in one process with a plain probe."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt, path=path)
    records = []
    for x, y in global_batches():
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        records.append(probe.step((x, y)))
    return records


def _autograd(thetas: list[torch.Tensor], sizes: tuple[int, ...]) -> list[dict[str, float]]:
    r"""Loss, slope, curvature (in lr units) and gradient norm of :math:`\frac1R\sum_r L_r` along each step the DDP
    run took, by plain autograd on the flat parameters (``L_r``: the mean loss of shard ``r``)."""
    model = make_model()
    names, shapes = zip(*((n, p.shape) for n, p in model.named_parameters()), strict=True)

    def loss(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        state = {
            n: t.view(s) for n, t, s in zip(names, theta.split([math.prod(s) for s in shapes]), shapes, strict=True)
        }
        out = functional_call(model, state, (x,))
        shards = zip(out.split(list(sizes)), y.split(list(sizes)), strict=True)
        return sum(((o - t) ** 2).mean() for o, t in shards) / len(sizes)

    rows = []
    for t, (x, y) in enumerate(global_batches()):
        theta, delta = thetas[t], thetas[t + 1] - thetas[t]
        value, hd = torch.autograd.functional.hvp(lambda th, x=x, y=y: loss(th, x, y), theta, delta)
        leaf = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(leaf, x, y), leaf)
        slope, curvature = (g @ delta).item() / LR, (delta @ hd).item() / LR**2
        rows.append(
            dict(
                loss=value.item(),
                slope=slope,
                curvature=curvature,
                alpha_star=-slope / curvature,
                grad_norm=g.norm().item(),
            )
        )
    return rows


def _close(records: list[dict], reference: list, what: str) -> None:
    for t, (rec, ref) in enumerate(zip(records, reference, strict=True)):
        ref = ref if isinstance(ref, dict) else {k: getattr(ref, k) for k in FIELDS}
        for k in FIELDS:
            assert _rel(rec[k], ref[k]) <= TOL, f"{what}, step {t}: {k} {rec[k]!r} against {ref[k]!r}"


# ---- two ranks under torchrun -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, (path, _, _) in RUNS.items() if path is not None])
def test_every_rank_records_the_same(runs, name):
    """The reduction hands every rank the same numbers, flags and path."""
    rank0, rank1 = runs[name]["records"]
    assert len(rank0) == len(rank1) == 4
    for a, b in zip(rank0, rank1, strict=True):
        assert all(_same(a[k], b[k]) for k in a if k != "fallback"), (a, b)


@pytest.mark.parametrize(("name", "path"), [("fast", "fast"), ("generic", "generic"), ("accumulate", "generic")])
def test_ddp_is_one_process_on_the_concatenated_batch(runs, name, path):
    """Equal shards of a mean loss: each step's record is one process's on the concatenated batch, to 1e-10; and
    slope, curvature and gradient norm are those of plain autograd at the parameters the DDP run went through.
    ``accumulate`` (two micro-batches a rank, under ``no_sync``) takes the generic path, as ``auto`` does there."""
    records = runs[name]["records"][0]
    assert [r["path"] for r in records] == [path] * 4 and all(r["flag"] == "ok" for r in records)
    if name == "fast":
        assert all(r["fallback"] == "" for r in records)
    _close(records, _one_process(path), f"{name} against one process")
    _close(records, _autograd(runs[name]["thetas"], RUNS[name][1]), f"{name} against autograd")


def test_unequal_shards_average_the_ranks_mean_losses(runs):
    """Shards of 10 and 6 samples: the record is of (L_0 + L_1)/2, the loss whose gradient DDP averaged, and says so;
    the concatenated batch's mean (a different function here) is not what it measured."""
    records, thetas = runs["unequal"]["records"][0], runs["unequal"]["thetas"]
    assert all(r["path"] == "fast" and r["flag"] == "ok" for r in records)
    assert all("shards of unequal sizes (10, 6 samples on the ranks)" in r["fallback"] for r in records)
    _close(records, _autograd(thetas, (10, 6)), "unequal shards against autograd")
    concatenated = _autograd(thetas, (16,))
    assert all(_rel(r["slope"], c["slope"]) > 1e-3 for r, c in zip(records, concatenated, strict=True))


@pytest.mark.parametrize("name", ["fast", "generic"])
def test_probe_is_a_pure_observer_under_ddp(runs, name):
    """Parameters, .grad and Adam's state end bit-identical to the DDP run without the probe."""
    probed, plain = runs[name], runs["plain"]
    assert all(torch.equal(a, b) for a, b in zip(probed["params"], plain["params"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(probed["grads"], plain["grads"], strict=True))
    assert all(
        torch.equal(probed["state"][i][k], plain["state"][i][k]) for i in plain["state"] for k in plain["state"][i]
    )
    assert all(torch.equal(a, b) for a, b in zip(probed["thetas"], plain["thetas"], strict=True))


def test_a_failure_on_one_rank_is_recorded_on_every_rank(runs):
    """Rank 1's measurement fails after the step: both ranks record flag='error' (no rank hangs), each saying how many
    ranks failed; only rank 1 names the exception."""
    rank0, rank1 = runs["error"]["records"]
    assert all(r["flag"] == "error" and math.isnan(r["alpha_star"]) for r in rank0 + rank1)
    assert all("the measurement failed on 1 of 2 ranks" in r["fallback"] for r in rank0 + rank1)
    assert all("injected failure on rank 1" in r["fallback"] for r in rank1)
    assert not any("injected" in r["fallback"] for r in rank0)


# ---- the helpers, without a process group -------------------------------------------------------------------------


def test_helpers_without_a_process_group():
    assert not distributed.initialized()
    net = nn.Linear(3, 2)
    assert distributed.unwrap(net) is net and not distributed.is_ddp(net)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main_process()
    assert distributed.all_reduce_sum([1.0, -2.5, math.inf]) == [1.0, -2.5, math.inf]
    assert distributed.all_reduce_mean([3, 4]) == [3.0, 4.0]
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([2.0])
    assert distributed.norm_of_mean([a, b]) == 3.0  # sqrt(1 + 4 + 4)
    assert torch.equal(a, torch.tensor([[1.0, 2.0]]))
    assert distributed.for_probe(net, scopes=True, sharpness=True) is None


def test_local_gradient_is_autograds():
    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    w, b = net.weight.detach(), net.bias.detach()
    residual = x @ w.T + b - y  # d mean((xW' + b - y)^2) = 2 r / numel
    expected = [2 * residual.T @ x / residual.numel(), 2 * residual.sum(0) / residual.numel()]
    fn = alphalib._function.BatchLoss(net, F.mse_loss, (x, y))
    got = distributed.local_gradient(fn, [w, b])
    assert all(torch.allclose(g, e, rtol=1e-13, atol=0) for g, e in zip(got, expected, strict=True))


# ---- the probe in a world of one rank (in this process) -------------------------------------------------------------


@pytest.fixture
def one_rank():
    """A gloo process group of one rank in this process, destroyed afterwards."""
    if (reason := _skip_reason()) is not None:
        pytest.skip(reason)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel:
    return nn.parallel.DistributedDataParallel(model)


def test_ddp_refuses_what_it_does_not_distribute(one_rank):
    data = [(torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
    for kwargs, what in (
        (dict(full_data=data), "full_data/held_out"),
        (dict(held_out=data[0]), "full_data/held_out"),
        (dict(sharpness_every=2), "sharpness_every"),
    ):
        model = _ddp(make_model())
        with pytest.raises(ValueError, match=f"{what} would measure only each rank's own data"):
            alphalib.AlphaProbe(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=LR), **kwargs)
    synced = _ddp(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double())
    synced.module[1] = nn.SyncBatchNorm(3).double()  # DDP itself takes SyncBatchNorm on GPU modules only
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        alphalib.AlphaProbe(synced, F.mse_loss, torch.optim.SGD(synced.parameters(), lr=LR))


@pytest.mark.parametrize(
    "options",
    [{}, dict(find_unused_parameters=True), dict(static_graph=True), dict(gradient_as_bucket_view=True)],
    ids=lambda o: next(iter(o), "default"),
)
def test_one_rank_records_what_a_plain_probe_records(one_rank, options):
    """In a world of one the reduction changes nothing: the DDP probe (on the wrapped module; the fast path's proof
    holds whatever DDP hooks into the backward pass) and a plain probe on an identical model record the same."""
    models = [nn.parallel.DistributedDataParallel(make_model(), **options), make_model()]
    opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in models]
    probes = [alphalib.AlphaProbe(m, F.mse_loss, o) for m, o in zip(models, opts, strict=True)]
    assert probes[0].model is models[0].module
    records: list[list[alphalib.Record]] = [[], []]
    for x, y in global_batches():
        for model, opt, probe, out in zip(models, opts, probes, records, strict=True):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            out.append(probe.step((x, y)))
    for ddp, plain in zip(*records, strict=True):
        assert ddp.path == plain.path == "fast" and ddp.flag == plain.flag == "ok" and ddp.fallback == ""
        for k in FIELDS:
            assert _rel(getattr(ddp, k), getattr(plain, k)) <= 1e-13, k


def test_a_process_group_gone_is_an_error_record(one_rank):
    """A probe whose process group was destroyed records flag='error' (and warns) rather than pass off this rank's
    numbers as the global batch's."""
    model = _ddp(make_model())
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    dist.destroy_process_group()
    x, y = global_batches()[0]
    F.mse_loss(model.module(x), y).backward()  # DDP's own forward needs its group; the module does not
    with pytest.warns(RuntimeWarning, match="all-reduce"):
        rec = probe.step((x, y))
    assert rec.flag == "error" and "the all-reduce over the ranks failed" in rec.fallback
