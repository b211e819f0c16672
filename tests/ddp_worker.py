"""One worker of ``tests/test_distributed.py``: DDP training on CPU (gloo, float64) with and without ``AlphaProbe``.

Launched by the test as ``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT``;
not a test module (pytest collects ``test_*.py`` only, and importing this file for doctests runs nothing). Each run
builds the same seeded MLP on every rank, wraps it in DDP and takes ``STEPS`` Adam steps, each rank on its shard of
each global batch of ``GLOBAL`` samples (see :func:`global_batches`, which the test rebuilds). Rank 0 gathers every
rank's records and writes them, with the parameters after each step and the final parameters, ``.grad`` and Adam
state, to ``OUT/runs.pt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

STEPS, GLOBAL, D_IN, D_OUT, LR = 4, 16, 4, 2, 1e-2

#: name -> (probe's path, or None for no probe; each rank's shard size; micro-batches a rank accumulates)
RUNS: dict[str, tuple[str | None, tuple[int, int], int]] = {
    "plain": (None, (8, 8), 1),  # DDP without the probe: the parameters the probed runs must end with
    "fast": ("fast", (8, 8), 1),
    "generic": ("generic", (8, 8), 1),
    "accumulate": ("auto", (8, 8), 2),  # two micro-batches under no_sync: the generic path, which recomputes ∇L_r
    "unequal": ("auto", (10, 6), 1),  # the average of the ranks' mean losses, not the concatenated mean
    "error": ("generic", (8, 8), 1),  # rank 1's measurement fails: every rank records flag="error", none hangs
}


def make_model() -> nn.Module:
    """The seeded float64 MLP every rank (and the test's single process) starts from."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D_OUT)).double()


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``STEPS`` global batches of ``GLOBAL`` samples (rank ``r`` takes its slice of each, in rank order)."""
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL, D_IN, generator=gen, dtype=torch.float64),
            torch.randn(GLOBAL, D_OUT, generator=gen, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def _shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int, sizes: tuple[int, ...]) -> tuple:
    start = sum(sizes[:rank])
    return tuple(t[start : start + sizes[rank]] for t in batch)


def _fail(*args: object, **kwargs: object) -> None:
    raise RuntimeError("injected failure on rank 1")


def train(name: str, rank: int) -> dict:
    """Run ``RUNS[name]`` on this rank; return what rank 0 writes (records of every rank, gathered)."""
    import alphalib

    path, sizes, micro = RUNS[name]
    model = DistributedDataParallel(make_model())
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = None if path is None else alphalib.AlphaProbe(model, F.mse_loss, opt, path=path)
    if name == "error" and rank == 1:
        probe._measure = _fail  # a backend failure after the optimizer stepped, on one rank only
    thetas = [torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()]
    records = []
    for batch in global_batches():
        x, y = _shard(batch, rank, sizes)
        parts = list(zip(x.chunk(micro), y.chunk(micro), strict=True))
        opt.zero_grad()
        for i, (xi, yi) in enumerate(parts):
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last else model.no_sync():  # DDP averages at the last
                (F.mse_loss(model(xi), yi) / micro).backward()
        if probe is None:
            opt.step()
        else:
            rec = probe.step(parts if micro > 1 else (x, y))
            records.append(dataclasses.asdict(rec))
        thetas.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    return {
        "records": everyone,
        "thetas": thetas,
        "params": [p.detach().clone() for p in model.module.parameters()],
        "grads": [p.grad.clone() for p in model.module.parameters()],
        "state": opt.state_dict()["state"],
    }


def main(out: Path) -> None:
    from alphalib.distributed import is_main_process

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        runs = {name: train(name, dist.get_rank()) for name in RUNS}
        if is_main_process():  # every rank holds the same records: one writes them
            torch.save(runs, out / "runs.pt")
        dist.barrier()  # tear down together: a rank that leaves first can abort the other's gloo threads
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
