"""alphalib: how far is an optimizer's step from the best step of its local quadratic model?

At step :math:`t` with realized direction :math:`d = (\\theta_{t+1}-\\theta_t)/\\mathrm{lr}`, gradient
:math:`g_t` and Hessian :math:`H_t` of the mini-batch loss, the quadratic model along :math:`d` is minimised
at :math:`\\alpha^* = -d^\\top g_t / d^\\top H_t d`; :math:`\\alpha^*/\\mathrm{lr} = 1` means the step landed
on that minimum.
"""

from ._checks import ParamVector
from ._function import Objective, objective
from .blocks import BlockAlpha, block_alpha
from .curvature import BACKENDS, AlphaResult, Backend, alpha_star, hvp
from .direction import direction
from .optim import step_size
from .probe import AlphaProbe
from .records import FLAGS, Record, epoch_summary, key_numbers, to_frame
from .records import read as read_records
from .records import write as write_records
from .scaled import AlphaScaled
from .sharpness import Sharpness, hessian_trace, stability_threshold, top_eigenvalue
from .spectrum import AlphaScope, LineProfile, alpha_over, line_profile, next_step_profiles

__version__ = "0.1.0"

#: The lab's names (:mod:`alphalib.lab`), each imported from its module when first used: the core above needs none
#: of them, so ``import alphalib`` loads no training loop, data, models, plots or sweeps until asked.
_LAB_NAMES = {
    "train": "train", "run": "train", "History": "train", "evaluate": "train",
    "grid": "sweep", "runs": "sweep", "seed_summary": "stats", "paired_difference": "stats",
    "gaussian_regression": "data", "loader": "data", "SimpleNet": "models",
    "problem": "problems", "Problem": "problems", "PROBLEMS": "problems",
    "make_optimizer": "optimizers", "OPTIMIZERS": "optimizers", "check_parameters": "parameters",
}  # fmt: skip
#: ... and its modules, as ``alphalib.data``, ``alphalib.plot``, ``alphalib.sweep``, ... (``alphalib.train`` is the
#: function)
_LAB_MODULES = (
    "data", "models", "problems", "optimizers", "parameters", "sweep", "stats", "plot", "live", "external"
)  # fmt: skip


def __getattr__(name: str) -> object:
    """Import a name of the lab when first used (see ``_LAB_NAMES``)."""
    import importlib

    if name in _LAB_MODULES:
        return importlib.import_module(f".lab.{name}", __name__)
    if name in _LAB_NAMES:
        return getattr(importlib.import_module(f".lab.{_LAB_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'alphalib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAB_NAMES, *_LAB_MODULES})


__all__ = [
    # curvature along a direction
    "hvp",
    "alpha_star",
    "AlphaResult",
    "Backend",
    "BACKENDS",
    # ... and per group of parameters (a diagonal block of the Hessian each)
    "block_alpha",
    "BlockAlpha",
    # the optimizer's direction
    "direction",
    "ParamVector",
    # probing a training run
    "AlphaProbe",
    "objective",
    "Objective",
    "Record",
    "FLAGS",
    "to_frame",
    "epoch_summary",
    "key_numbers",
    "write_records",
    "read_records",
    # beyond the batch: full-data and held-out α*, line profiles
    "alpha_over",
    "AlphaScope",
    "line_profile",
    "LineProfile",
    "next_step_profiles",
    # optimizers by name (torch.optim's, the learning-rate-free ones, the alpha*-scaled wrapper)
    "make_optimizer",
    "OPTIMIZERS",
    "step_size",
    # sharpness: the Hessian's extreme eigenvalues, Adam's preconditioned sharpness, the stability edge
    "top_eigenvalue",
    "Sharpness",
    "hessian_trace",
    "stability_threshold",
    # closing the loop: step by kappa * alpha*
    "AlphaScaled",
    # training runs, and grids of them
    "train",
    "run",
    "grid",
    "runs",
    "sweep",
    # intervals over seeds
    "seed_summary",
    "paired_difference",
    "History",
    "evaluate",
    "check_parameters",
    # reference data and models
    "gaussian_regression",
    "loader",
    "SimpleNet",
    "problem",
    "Problem",
    "PROBLEMS",
]
