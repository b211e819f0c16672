r"""Where the fast path's time goes, per model: the training step's phases with and without the probe.

    python benchmarks/breakdown.py [--workloads resnet18,vit,...] [--steps 20] [--threads 2]

For each workload (those of ``overhead.py``) one plain and one probed copy (``curvature="hessian"``, ``path="fast"``)
train side by side from the same seed, alternating step by step. Each phase is timed per step and its median
taken: the forward pass, the backward pass and the optimizer step (plain) or ``probe.step`` (probed), which is
split into the sweep along the step (:func:`alphalib.fast.measure`) and the rest (the proof, the copies of
:math:`\theta_t` and :math:`\Delta`, the optimizer's own step). All are printed as multiples of the plain step,
with the operations that take most of the sweep. CPU timings on a shared machine are noisy: read ratios, not times.
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time

import torch
from overhead import EXTERNAL, make_workload

import alphalib
from alphalib import fast
from alphalib.fast import ops as oprules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(EXTERNAL))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sweep_time, by_op = [0.0], collections.defaultdict(float)
    measure, run = fast.measure, oprules.OpSweep.run

    def timed_measure(*a, **k):  # the sweep, timed
        t0 = time.perf_counter()
        try:
            return measure(*a, **k)
        finally:
            sweep_time[0] += time.perf_counter() - t0

    def timed_run(self, op):  # each recorded op's rule, timed
        t0 = time.perf_counter()
        run(self, op)
        by_op[str(op.func.overloadpacket).removeprefix("aten.")] += time.perf_counter() - t0

    alphalib.fast.measure, oprules.OpSweep.run = timed_measure, timed_run
    print(
        "| model | plain fwd / bwd / step | probed fwd / bwd | probe.step: sweep / rest | overhead | path | "
        "the sweep's largest shares |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.workloads.split(","):
        w = make_workload(name, torch.device("cpu"))
        torch.manual_seed(0)
        model = w.make_model()
        models = {"plain": model, "probed": copy.deepcopy(model)}
        opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
        probe = alphalib.AlphaProbe(models["probed"], w.loss_fn, opts["probed"], path="fast")
        x, y = w.batch
        phases = collections.defaultdict(list)
        for i in range(args.steps + 3):
            for kind, m in models.items():
                opt = opts[kind]
                opt.zero_grad()
                t0 = time.perf_counter()
                loss = w.loss_fn(m(x), y)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                sweep_time[0] = 0.0
                probe.step((x, y)) if kind == "probed" else opt.step()
                t3 = time.perf_counter()
                if i >= 3:
                    phases[kind, "fwd"].append(t1 - t0)
                    phases[kind, "bwd"].append(t2 - t1)
                    phases[kind, "step"].append(t3 - t2)
                    if kind == "probed":
                        phases[kind, "sweep"].append(sweep_time[0])
                        phases[kind, "rest"].append(t3 - t2 - sweep_time[0])
                if i == 2:
                    by_op.clear()
        med = {k: statistics.median(v) for k, v in phases.items()}
        plain = med["plain", "fwd"] + med["plain", "bwd"] + med["plain", "step"]
        probed = med["probed", "fwd"] + med["probed", "bwd"] + med["probed", "step"]
        total = sum(by_op.values()) or 1.0
        top = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:4])

        def r(v: float) -> str:  # called in this iteration only
            return f"{v / plain:.2f}"  # noqa: B023

        print(
            f"| {name} | {r(med['plain', 'fwd'])} / {r(med['plain', 'bwd'])} / {r(med['plain', 'step'])} "
            f"({plain * 1e3:.1f} ms) | {r(med['probed', 'fwd'])} / {r(med['probed', 'bwd'])} | "
            f"{r(med['probed', 'sweep'])} / {r(med['probed', 'rest'])} | **{probed / plain - 1:.2f}** | "
            f"{probe.records[-1].path} | {top or '(generic path)'} |",
            flush=True,
        )
        probe.remove()
        by_op.clear()


if __name__ == "__main__":
    main()
