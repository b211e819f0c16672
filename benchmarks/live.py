r"""What does the live view cost? Training time with the view attached, relative to the same run without it.

    python benchmarks/live.py [--epochs 100,400] [--repeats 5] [--budget 0.05] [--out benchmarks/results]

The run is the reference experiment (SimpleNet 10→5→1, Gaussian data, Adam at lr 1e-3, batch 32, every step
probed with the exact Hessian) through ``alphalib.train``, for 100 epochs (its own length, about 7 s here) and
longer. The view is a :class:`alphalib.live.LiveView` at its
default refresh (a drawing as each epoch begins, within the budget) that renders every drawing to PNG as in
JupyterLab but sends it nowhere (the display message itself, a few hundred kB to the frontend, is not counted).
Each repeat runs the plain and the watched run back to back, alternating which goes first, from the same seed;
the table gives the median over repeats of watched / plain, the view's own drawing time as a share of the watched
run, the drawings per run and the median drawing, and the same with the final drawing (made when training ends,
whatever the budget) left out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import alphalib
from alphalib.lab.live import LiveView


def once(epochs: int, view: LiveView | None) -> tuple[float, float]:
    """Train the reference experiment for ``epochs``; return the wall time (the view's final drawing included) and
    the seconds of that final drawing."""
    torch.manual_seed(0)
    model = alphalib.SimpleNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = alphalib.AlphaProbe(model, torch.nn.MSELoss(), opt)
    if view is not None:
        probe.listeners.append(view.update)
    batches = alphalib.loader(alphalib.gaussian_regression(seed=0), 32, shuffle=True, seed=0)
    start = time.perf_counter()
    alphalib.train(model, torch.nn.MSELoss(), opt, batches, epochs=epochs, probe=probe, progress=False)
    final = 0.0
    if view is not None:
        before = view.seconds
        view.close()
        final = view.seconds - before
    return time.perf_counter() - start, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", default="100,400", help="comma-separated run lengths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    once(2, LiveView(show=False))  # warm-up: imports, fonts, the first drawing's caches
    lines = [
        f"# Live view overhead: the reference experiment (32 probed steps per epoch), {args.repeats} repeats, "
        f"{args.threads} threads, budget {args.budget:g}",
        "",
        "| epochs | plain run | watched / plain run | drawing's share of the watched run | share while training "
        "(final drawing left out) | drawings per run | one drawing |",
        "|---|---|---|---|---|---|---|",
    ]
    for epochs in map(int, args.epochs.split(",")):
        rows = []
        for repeat in range(args.repeats):
            view = LiveView(show=False, budget=args.budget)
            order = ("plain", "watched") if repeat % 2 == 0 else ("watched", "plain")
            runs = {name: once(epochs, view if name == "watched" else None) for name in order}
            times, final = {name: t for name, (t, _) in runs.items()}, runs["watched"][1]
            rows.append(
                dict(
                    ratio=times["watched"] / times["plain"],
                    share=view.seconds / times["watched"],
                    share_during=(view.seconds - final) / (times["watched"] - final),
                    draws=view.draws,
                    drawing=view.seconds / view.draws,
                    plain=times["plain"],
                )
            )
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        lines.append(
            f"| {epochs} | {med['plain']:.1f} s | {med['ratio']:.3f} | {med['share']:.1%} | "
            f"{med['share_during']:.1%} | {med['draws']:.0f} | {med['drawing'] * 1e3:.0f} ms |"
        )
        print(
            lines[-1],
            "  per repeat (ratio, share):",
            ", ".join(f"({r['ratio']:.3f}, {r['share']:.1%})" for r in rows),
            flush=True,
        )
    lines += [
        "",
        "Medians over repeats; each repeat runs the plain and the watched run back to back, in alternating order.",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "live.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
