r"""Two runs of ``overhead.py`` side by side: how much slower or faster each probed row became.

    python benchmarks/compare.py OLD/overhead.csv NEW/overhead.csv [--labels before,after]

Run both at once, one per tree (``PYTHONPATH=<tree> python benchmarks/overhead.py --out <dir> --threads 1``),
so that the machine's load hits them alike. For each row both runs have, the change is that of the probed
step's time in plain steps, :math:`(1 + r_\mathrm{new}) / (1 + r_\mathrm{old}) - 1` for overheads :math:`r`
(each already a median of paired, interleaved repeats): +10% means the probed step costs 10% more plain steps.
"""

from __future__ import annotations

import argparse

import pandas as pd

KEYS = ["workload", "optimizer", "config"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--labels", default="before,after")
    args = parser.parse_args()
    before, after = args.labels.split(",")
    old, new = (pd.read_csv(p) for p in (args.old, args.new))
    both = old.merge(new, on=KEYS, suffixes=("_old", "_new"))
    both = both[both["backend_old"].ne("plain") & both["time_ratio_old"].notna() & both["time_ratio_new"].notna()]
    both["change"] = (1 + both["time_ratio_new"]) / (1 + both["time_ratio_old"]) - 1
    print(
        f"| workload | optimizer | configuration | overhead {before} | overhead {after} | change of the probed "
        f"step | path {before} → {after} |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in both.itertuples(index=False):
        print(
            f"| {r.workload} | {r.optimizer} | {r.config} | {r.time_ratio_old:+.2f} | {r.time_ratio_new:+.2f} "
            f"| {r.change:+.0%} | {r.path_ran_old} → {r.path_ran_new} |"
        )
    slower = both[both["change"] > 0.10]
    print(
        f"\n{len(both)} rows; median change {both['change'].median():+.1%}; {len(slower)} more than 10% slower:",
        ", ".join(f"{r.workload}/{r.optimizer}/{r.config}" for r in slower.itertuples(index=False)) or "none",
    )


if __name__ == "__main__":
    main()
