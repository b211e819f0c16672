"""The findings table, against medians and bootstrap intervals computed here by hand from synthetic records."""

import math

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

import alphalib
from alphalib.lab.findings import FILES, findings, main, number

BEYOND = "beyond any ratio (most steps had α* ≤ 0)"


def _rows(seed, epoch, values, **tags):
    """One record per value of lr/α* (NaN: a step without a slope), with the ratio and the flag that go with it."""
    return [
        {
            "step": i,
            "epoch": epoch,
            "seed": seed,
            "lr_over_alpha": v,
            "ratio": 1 / v if v else math.nan,
            "flag": "ok" if v > 0 else "negative_curvature",
            **tags,
        }
        for i, v in enumerate(values)
    ]


def _write(folder, key, rows):
    alphalib.write_records(pd.DataFrame(rows), folder / FILES[key])


def _cells(markdown, *labels):
    """The cells of the table row whose first cells are ``labels``."""
    for line in markdown.splitlines():
        cells = line.strip("| ").split(" | ")
        if line.startswith("| ") and tuple(cells[: len(labels)]) == labels:
            return cells[len(labels) :]
    raise AssertionError(f"no row {labels} in\n{markdown}")


def _expected(per_seed_values):
    """The α*/lr cell, computed by hand: each seed's median lr/α* (NaN dropped), their median, the BCa interval."""
    medians = np.array([np.median(v[~np.isnan(v)]) for v in per_seed_values])
    middle = np.median(medians)
    head = number(1 / middle) if middle > 0 else BEYOND
    if len(medians) == 1:
        return f"{head} (1 seed: no interval)"
    ci = scipy_stats.bootstrap(
        (medians,), np.median, confidence_level=0.95, method="BCa", n_resamples=9999,
        random_state=np.random.default_rng(0), vectorized=True,
    ).confidence_interval  # fmt: skip
    lo, hi = ci.low, ci.high
    if hi <= 0:
        bounds = "[both ends beyond any ratio]"
    else:
        bounds = f"[{number(1 / hi)}, {number(1 / lo) if lo > 0 else 'beyond any ratio'}]"
    return f"{head} {bounds} (95% BCa, over {len(medians)} seeds)"


def _share(values):
    values = np.concatenate(values)
    defined = values[~np.isnan(values)]
    odd = int((defined <= 0).sum())
    return f"{number(100 * odd / len(defined))}% ({odd} of {len(defined)})"


# The seed problem: 5 seeds, 3 epochs. Each seed's batch steps are scale * [-3, -1, 1, 2, 4] (a NaN step more in the
# first epoch): median scale; without the two steps with α* ≤ 0 it would be 2 * scale.
SCALES = [0.01, 0.02, 0.03, 0.05, 0.08]
BATCH = np.array([-3.0, -1.0, 1.0, 2.0, 4.0])
FULL = np.array([-1.0, 2.0, 3.0])  # full data: every other step
HELDOUT = {0: np.array([1.0, 2.0, 3.0]), 1: np.array([-1.0, -2.0, 3.0]), 2: np.array([-1.0, -2.0, -3.0])}


def _seed_problem_rows():
    rows = []
    for seed, scale in enumerate(SCALES):
        for epoch in range(3):
            batch = scale * (epoch + 1) * BATCH
            batch = np.append(batch, math.nan) if epoch == 0 else batch
            steps = _rows(seed, epoch, batch, lr=1e-3, lr0=1e-3, optimizer="Adam", problem="seed problem")
            for step in steps:
                step["full_ratio"] = step["heldout_ratio"] = math.nan
            for i, (full, held) in enumerate(zip(FULL, HELDOUT[epoch], strict=True)):
                steps[2 * i]["full_ratio"] = 1 / (scale * (seed + 1) * full)
                steps[2 * i]["heldout_ratio"] = 1 / (scale * (epoch + 1) * held)
            rows += steps
    return rows


def _by_hand(rows, epochs, column):
    """Per seed, the values of lr/α* in ``epochs`` for a scope (``column``: lr_over_alpha, or a ratio inverted)."""
    frame = pd.DataFrame(rows)
    values = frame[column] if column == "lr_over_alpha" else 1 / frame[column]
    picked = frame["epoch"].isin(epochs)
    return [values[picked & (frame["seed"] == s)].to_numpy(float) for s in sorted(frame["seed"].unique())]


def test_number_rounds_to_three_significant_digits_without_an_exponent():
    cases = {1234.5: "1230", 117.6: "118", 8.804: "8.8", 0.012345: "0.0123", 2.0: "2", -0.5: "-0.5", 0.0: "0"}
    assert {x: number(x) for x in cases} == cases
    assert number(math.nan) == number(math.inf) == "n/a"


def test_the_seed_problem_section_matches_medians_and_intervals_computed_by_hand(tmp_path):
    rows = _seed_problem_rows()
    _write(tmp_path, "01", rows)
    text = findings(tmp_path)
    phases = {"epoch 1 (first)": [0], "epoch 3 (last)": [2], "epochs 2–3 (second half)": [1, 2]}
    phases["epochs 1–3 (all)"] = [0, 1, 2]
    scopes = {"mini-batch": "lr_over_alpha", "full training data": "full_ratio", "held-out data": "heldout_ratio"}
    for phase, epochs in phases.items():
        for scope, column in scopes.items():
            values = _by_hand(rows, epochs, column)
            assert _cells(text, phase, scope) == [_expected(values), _share(values)], (phase, scope)
    # the held-out data's lr/α* is mostly ≤ 0 in epoch 3 in every seed: beyond any ratio, interval and all
    assert _cells(text, "epoch 3 (last)", "held-out data") == [
        f"{BEYOND} [both ends beyond any ratio] (95% BCa, over 5 seeds)",
        "100% (15 of 15)",
    ]
    assert "| `01_adam_alpha_star.csv.gz` | 5 | 80 | 1–3 |" in text
    assert "problem: seed problem; optimizer: Adam; lr: 1e-3." in text


def test_steps_with_alpha_star_at_most_zero_are_counted(tmp_path):
    rows = _seed_problem_rows()
    _write(tmp_path, "01", rows)
    cell = _cells(findings(tmp_path), "epoch 3 (last)", "mini-batch")[0]
    every_step = np.median([s * 3 * np.median(BATCH) for s in SCALES])
    positive_only = np.median([s * 3 * np.median(BATCH[BATCH > 0]) for s in SCALES])
    assert number(1 / every_step) != number(1 / positive_only)
    assert cell.startswith(f"{number(1 / every_step)} [")
    assert _cells(findings(tmp_path), "epoch 3 (last)", "mini-batch")[1] == "40% (10 of 25)"
    assert _cells(findings(tmp_path), "epoch 1 (first)", "mini-batch")[1] == "40% (10 of 25)", "NaN steps left out"


def test_the_optimizers_section(tmp_path):
    rows = []
    for optimizer, lr, base in (("Adam", 1e-3, [-1.0, 0.02, 0.05]), ("SGD", 5e-2, [0.3, -0.1, 0.5, 0.2])):
        for seed in range(4):
            for epoch in range(2):
                values = (seed + 1) * (epoch + 2) * np.array(base)
                rows += _rows(seed, epoch, values, lr=lr, lr0=lr, optimizer=optimizer, problem="digits MLP")
    _write(tmp_path, "02", rows)
    text = findings(tmp_path)
    frame = pd.DataFrame(rows)
    for optimizer, lr in (("Adam", "1e-3"), ("SGD", "5e-2")):
        runs = frame[frame["optimizer"] == optimizer]
        per_epoch = [
            [runs["lr_over_alpha"][(runs["epoch"] == e) & (runs["seed"] == s)].to_numpy() for s in range(4)]
            for e in range(2)
        ]
        expected = ["1–2", _expected(per_epoch[0]), _expected(per_epoch[1]), _share([runs["lr_over_alpha"]])]
        assert _cells(text, optimizer, lr) == expected


def test_the_lr_sweep_names_the_lr_closest_to_one_per_seed(tmp_path):
    # the last epoch's α*/lr per seed and lr (negative: lr/α* ≤ 0 on most steps, beyond any ratio)
    ratios = {1e-3: [20.0, 30.0, 25.0], 1e-2: [1.5, 2.0, 1.2], 3e-2: [0.5, 0.9, -1.0]}
    rows = []
    for lr, per_seed in ratios.items():
        for seed, ratio in enumerate(per_seed):
            rows += _rows(seed, 0, [1 / ratio] * 3, lr=lr, lr0=lr, optimizer="Adam", problem="digits MLP")
            last = [1 / ratio, 1 / ratio, -1.0] if ratio > 0 else [-1.0, -2.0, 0.5]
            rows += _rows(seed, 1, last, lr=lr, lr0=lr, optimizer="Adam", problem="digits MLP")
    _write(tmp_path, "03", rows)
    text = findings(tmp_path)
    closest = [min(ratios, key=lambda lr, s=s: abs(math.log(ratios[lr][s])) if ratios[lr][s] > 0 else math.inf)
               for s in range(3)]  # fmt: skip
    assert closest == [1e-2, 3e-2, 1e-2]
    frame = pd.DataFrame(rows)
    for lr, label, chosen in ((1e-3, "1e-3", 0), (1e-2, "1e-2", 2), (3e-2, "3e-2", 1)):
        last = frame[(frame["lr0"] == lr) & (frame["epoch"] == 1)]
        values = [last["lr_over_alpha"][last["seed"] == s].to_numpy() for s in range(3)]
        assert _cells(text, label) == ["2", _expected(values), _share(values), f"{chosen} of 3 seeds"]
    assert "per seed: lr 1e-2, in 2 of 3 seeds." in text
    assert "validation" not in text


def test_one_seed_gets_no_interval_and_a_missing_file_is_said(tmp_path):
    rows = []
    for problem in ("digits MLP", "char transformer"):
        for lr in (1e-3, 1e-2):
            for epoch in range(2):
                values = [lr * 10 * (epoch + 1) * k for k in (-1.0, 1.0, 2.0)]
                rows += _rows(0, epoch, values, lr=lr, lr0=lr, optimizer="Adam", problem=problem)
    _write(tmp_path, "04", rows)
    text = findings(tmp_path)
    for problem in ("digits MLP", "char transformer"):
        for lr, label in ((1e-3, "1e-3"), (1e-2, "1e-2")):
            expected = f"{number(1 / (lr * 10 * 2 * 1.0))} (1 seed: no interval)"
            assert _cells(text, problem, label) == ["2", expected, "33.3% (1 of 3)"]
    assert "95%" not in text.split("## 04")[1]
    for key in ("01", "02", "03"):
        assert f"`{FILES[key]}` is not in `{tmp_path.name}/`: section skipped." in text
        assert f"| `{FILES[key]}` | missing |" in text
    assert f"| `{FILES['04']}` | 1 | 24 | 1–2 |" in text


def test_two_calls_give_the_same_text_and_the_command_line_prints_it(tmp_path, capsys):
    _write(tmp_path, "01", _seed_problem_rows())
    text = findings(tmp_path)
    assert findings(str(tmp_path)) == text
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == text


def test_the_gpt_section_compares_the_step_s_batch_with_a_held_out_batch_along_the_same_step(tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for seed in range(3):
        for i in range(8):
            batch = float(np.exp(rng.normal(2.0, 0.3)))  # alpha*/lr on the step's batch
            held = -1.0 if i == 0 else batch / float(np.exp(rng.normal(1.0, 0.2)))  # one held-out step with alpha* < 0
            rows.append(dict(step=i, epoch=0, seed=seed, phase="warm-up" if i < 4 else "decay", optimizer="AdamW",
                             lr=1e-3, ratio=batch, lr_over_alpha=1 / batch, heldout_ratio=held, heldout_slope=-1.0,
                             flag="ok"))  # fmt: skip
    _write(tmp_path, "11", rows)
    frame = pd.DataFrame(rows)
    text = findings(tmp_path)
    for phase in ("warm-up", "decay"):
        part = frame[frame.phase == phase]
        per_seed = part.groupby("seed").lr_over_alpha.median()
        cells = _cells(text, phase)
        assert cells[0] == "12" and cells[1].startswith(number(1 / float(np.median(per_seed)))), cells
    both = frame[frame.heldout_ratio > 0]
    factor = float(np.exp(np.median(np.log(both.ratio / both.heldout_ratio))))
    assert f"median factor {number(factor)}" in text and "(steps where both are > 0, 21 of 24)" in text
    assert "on 12.5% of the steps" in text  # 3 of 24 held-out steps with alpha* <= 0 while the batch's is > 0


def _bca(values, statistic):
    ci = scipy_stats.bootstrap(
        (np.asarray(values, float),), statistic, confidence_level=0.95, method="BCa", n_resamples=9999,
        random_state=np.random.default_rng(0), vectorized=True,
    ).confidence_interval  # fmt: skip
    return ci.low, ci.high


def _percent(x):
    return ("+" if x > 0 else "") + number(100 * x) + "%"


def _epoch_rows(problem, seed, split, role, method, losses, inverse, **tags):
    """09/10's per-run epoch table: one row per epoch, its held-out loss and its median lr/α*."""
    return [
        dict(problem=problem, seed=seed, split=split, role=role, method=method, epoch=e, val_loss=loss, steps=4,
             median_lr_over_alpha=inverse, alpha_le_0=0.25, **tags)
        for e, loss in enumerate(losses)
    ]  # fmt: skip


def test_the_closing_the_loop_section_reports_the_tune_choices_on_the_test_seeds_with_paired_intervals(tmp_path):
    rng = np.random.default_rng(5)
    rows = []
    for seed in range(2):  # tune: two fixed lrs, two kappas of one source
        for lr in (1e-3, 1e-2):
            rows += _epoch_rows("digits MLP", seed, "tune", "", f"Adam, lr {lr:g}", [1.0, 0.5], 0.1,
                                family="Adam, fixed lr", lr0=lr)  # fmt: skip
        for k in (0.5, 1.0):
            rows += _epoch_rows("digits MLP", seed, "tune", "", f"Adam × {k:g} α* (batch)", [1.0, 0.6], 0.5,
                                family="Adam × κα*", kappa=k, lr0=1e-3)  # fmt: skip
    base = rng.uniform(0.4, 0.6, 10)
    scaled = base * rng.uniform(0.9, 1.2, 10)
    for i, seed in enumerate(range(2, 12)):
        rows += _epoch_rows("digits MLP", seed, "test", "Adam, best fixed lr", "Adam, lr 0.01", [1.0, base[i]],
                            0.2 + 0.01 * i, family="Adam, fixed lr", lr0=1e-2)  # fmt: skip
        rows += _epoch_rows("digits MLP", seed, "test", "Adam × κα*, best", "Adam × 0.5 α* (batch)", [1.0, scaled[i]],
                            0.5, family="Adam × κα*", kappa=0.5, lr0=1e-3)  # fmt: skip
        diverged = [1.0, math.nan if i == 0 else 5.0]  # seed 2 diverges
        rows += _epoch_rows("digits MLP", seed, "test", "greedy (unchosen)", "Adam × 1 α* (batch)", diverged, 1.0,
                            family="Adam × κα*", kappa=1.0, lr0=1e-3)  # fmt: skip
    _write(tmp_path, "09", rows)
    text = findings(tmp_path).split("## 09")[1].split("## ")[0]
    assert "Chosen on 2 seeds (tune: 0–1)" in text and "from 2 values (1e-3, 1e-2)" in text
    assert "κ per α* source from 0.5, 1" in text and "reported on 10 seeds (test: 2–11)" in text
    cells = _cells(text, "digits MLP", "Adam × κα*, best")
    assert cells[0] == "Adam × 0.5 α* (batch)"
    lo, hi = _bca(scaled, np.median)
    assert cells[1] == f"{number(float(np.median(scaled)))} [{number(lo)}, {number(hi)}]"
    delta = scaled / base - 1
    lo, hi = _bca(delta, np.mean)
    won = int((scaled < base).sum())
    assert cells[2] == f"{_percent(delta.mean())} [{_percent(lo)}, {_percent(hi)}], lower on {won} of 10 seeds"
    assert cells[3] == "2 (no interval: all 10 seeds agree)"  # 1 / median of lr/α* = 0.5 on every seed
    base_cells = _cells(text, "digits MLP", "Adam, best fixed lr")
    assert base_cells[2] == "baseline"
    assert base_cells[3] == _expected([np.array([0.2 + 0.01 * i]) for i in range(10)])
    assert _cells(text, "digits MLP", "greedy (unchosen)")[2] == "a run diverged; lower on 0 of 10 seeds"


def test_the_lr_free_section_gives_alpha_over_s_and_the_paired_difference_from_adam(tmp_path):
    rows = []
    losses = {"Adam (best fixed lr)": [0.5, 0.6, 0.7, 0.55], "Prodigy": [0.45, 0.66, 0.63, 0.5]}
    inverse = {"Adam (best fixed lr)": [0.1, 0.2, 0.25, 0.3], "Prodigy": [0.5, -0.1, 0.9, 1.0]}
    for method in losses:
        for seed in range(4):
            rows += _epoch_rows("seed problem", 5 + seed, "", "", method, [1.0, losses[method][seed]],
                                inverse[method][seed])  # fmt: skip
    _write(tmp_path, "10", rows)
    text = findings(tmp_path).split("## 10")[1].split("## ")[0]
    assert "Epoch 2, seeds 5–8" in text
    cells = _cells(text, "seed problem", "Prodigy")
    assert cells[0] == _expected([np.array([v]) for v in inverse["Prodigy"]])
    assert cells[1] == "25%"
    a, p = np.array(losses["Adam (best fixed lr)"]), np.array(losses["Prodigy"])
    lo, hi = _bca(p / a - 1, np.mean)
    assert cells[3] == f"{_percent((p / a - 1).mean())} [{_percent(lo)}, {_percent(hi)}], lower on 3 of 4 seeds"
    assert _cells(text, "seed problem", "Adam (best fixed lr)")[3] == "baseline"
