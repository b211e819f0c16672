r"""Why the difference backends measure float32 models in float64: their error in float32, side by side.

    python benchmarks/precision.py [--workloads mlp,cnn,transformer] [--steps 12] [--threads 2]

Two copies of each workload's float32 model train with Adam (lr 1e-3) on the same fresh batch each step (the
probe never changes training, so they stay bit-identical); one probe measures as the package does (``fd``,
``secant`` evaluated in float64), the other in the model's float32 (the rule switched off). The table gives the
relative difference of ``ratio`` = α*/lr between the two, median and largest over the steps: what measuring in
float32 would report wrongly, against the package's float64 number of the same step. The package states 1e-3
for float32 records.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from overhead import make_workload

import alphalib
from alphalib.probe import facade

FLOAT64 = facade.DIFFERENCES  # the backends the probe evaluates in float64 below float64


def _batch(x0: torch.Tensor, y0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh batch shaped like the workload's: jittered inputs (random tokens) and random class targets."""
    x = x0 + 0.1 * torch.randn(x0.shape, generator=g) if x0.is_floating_point() else \
        torch.randint(0, int(x0.max()) + 1, x0.shape, generator=g)
    y = y0 if y0.is_floating_point() else torch.randint(0, int(y0.max()) + 1, y0.shape, generator=g)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="mlp,cnn,transformer")
    parser.add_argument("--backends", default="fd,secant")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | backend | median rel. error of α*/lr in float32 | largest | α*/lr (last) |")
    print("|---|---|---|---|---|")
    for name in args.workloads.split(","):
        w = make_workload(name, torch.device("cpu"))
        torch.manual_seed(0)
        model = w.make_model()
        for backend in args.backends.split(","):
            models = [copy.deepcopy(model) for _ in range(2)]
            opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
            probes = [alphalib.AlphaProbe(m, w.loss_fn, o, curvature=backend) for m, o in zip(models, opts)]
            g, errors = torch.Generator().manual_seed(1), []
            for _ in range(args.steps):
                x, y = _batch(*w.batch, g)
                recs = []
                for m, o, p, rule in zip(models, opts, probes, (FLOAT64, ())):
                    facade.DIFFERENCES = rule
                    o.zero_grad()
                    w.loss_fn(m(x), y).backward()
                    recs.append(p.step((x, y)))
                facade.DIFFERENCES = FLOAT64
                errors.append(abs(recs[1].ratio - recs[0].ratio) / abs(recs[0].ratio))
            print(f"| {name} | {backend} | {statistics.median(errors):.1e} | {max(errors):.1e} | {recs[0].ratio:.3g} |",
                  flush=True)


if __name__ == "__main__":
    main()
