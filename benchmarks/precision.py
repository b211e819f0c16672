r"""Why the difference backends measure float32 models in float64: their error in float32, side by side.

    python benchmarks/precision.py [--workloads mlp,cnn,transformer] [--lrs 1e-3,1e-4] [--steps 12] [--threads 2]

Three copies of each workload's float32 model train with Adam on the same fresh batch each step (the probe never
changes training, so they stay bit-identical). Their probes measure ``fd`` or ``secant`` three ways: all in
float64 (the reference), all in the model's float32 (every float64 rule off), and as the package does (``fd``
always in float64; ``secant`` in float32 unless :func:`alphalib.probe.router.cancelled` finds its difference of
losses too close to rounding). The table gives the relative difference of ``ratio`` = α*/lr from the reference,
median and largest over the steps, for float32; and for the package, how many steps it kept in float32 and the
largest error among them. The package states 1e-3 for float32 records.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics

import torch
from overhead import make_workload

import alphalib
from alphalib.probe import facade

WIDENED, CANCELLED = facade.WIDENED, facade.cancelled  # the rules that measure float32 steps in float64


def _batch(x0: torch.Tensor, y0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh batch shaped like the workload's: jittered inputs (random tokens) and random class targets."""
    x = (
        x0 + 0.1 * torch.randn(x0.shape, generator=g)
        if x0.is_floating_point()
        else torch.randint(0, int(x0.max()) + 1, x0.shape, generator=g)
    )
    y = y0 if y0.is_floating_point() else torch.randint(0, int(y0.max()) + 1, y0.shape, generator=g)
    return x, y


RULES = {  # how each of the three probes measures a float32 step
    "float64": (WIDENED + ("secant",), lambda *_: None),  # the reference: every difference backend in float64
    "float32": ((), lambda *_: None),  # every float64 rule off
    "package": (WIDENED, CANCELLED),  # what the probe does
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="mlp,cnn,transformer")
    parser.add_argument("--backends", default="fd,secant")
    parser.add_argument("--lrs", default="1e-3,1e-4")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| model | lr | backend | float32: median rel. error of α*/lr | largest | the package: steps kept in float32 "
        "| their largest error | α*/lr (last) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.workloads.split(","):
        w = make_workload(name, torch.device("cpu"))
        torch.manual_seed(0)
        model = w.make_model()
        for lr, backend in itertools.product(map(float, args.lrs.split(",")), args.backends.split(",")):
            models = [copy.deepcopy(model) for _ in RULES]
            opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in models]
            probes = [
                alphalib.AlphaProbe(m, w.loss_fn, o, curvature=backend) for m, o in zip(models, opts, strict=True)
            ]
            g, errors, kept = torch.Generator().manual_seed(1), [], []
            for _ in range(args.steps):
                x, y = _batch(*w.batch, g)
                recs = []
                for m, o, p, rule in zip(models, opts, probes, RULES.values(), strict=True):
                    facade.WIDENED, facade.cancelled = rule
                    o.zero_grad()
                    w.loss_fn(m(x), y).backward()
                    recs.append(p.step((x, y)))
                facade.WIDENED, facade.cancelled = WIDENED, CANCELLED
                ref, f32, ours = (r.ratio for r in recs)
                errors.append(abs(f32 - ref) / abs(ref))
                if backend not in WIDENED and "float64" not in recs[2].fallback:  # the package kept float32
                    kept.append(abs(ours - ref) / abs(ref))
            worst = f"{max(kept):.1e}" if kept else "-"
            print(
                f"| {name} | {lr:g} | {backend} | {statistics.median(errors):.1e} | {max(errors):.1e} "
                f"| {len(kept)}/{args.steps} | {worst} | {recs[0].ratio:.3g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
