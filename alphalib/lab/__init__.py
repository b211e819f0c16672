"""The lab: what the project's notebooks run on top of the measuring core.

The training loop (:mod:`~alphalib.lab.train`: :func:`~alphalib.lab.train.train`, :func:`~alphalib.lab.train.run`),
offline data and reference models (:mod:`~alphalib.lab.data`, :mod:`~alphalib.lab.models`,
:mod:`~alphalib.lab.external`, :mod:`~alphalib.lab.problems`), optimizers by name (:mod:`~alphalib.lab.optimizers`),
figures, the live view and the explorer (:mod:`~alphalib.lab.plot`, :mod:`~alphalib.lab.live`), grids and sweeps of
notebooks (:mod:`~alphalib.lab.sweep`) and the notebooks' parameter check (:mod:`~alphalib.lab.parameters`).

The lab imports the core (:mod:`alphalib`'s probe, curvature, records, ...); the core never imports the lab (an
import-linter contract in ``pyproject.toml``, checked by ``make lint``). ``alphalib`` re-exports the lab's names and
modules, imported when first used: ``alphalib.run``, ``alphalib.plot``, ``from alphalib import data, models``.
"""
