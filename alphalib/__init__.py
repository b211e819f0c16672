"""alphalib: how far is an optimizer's step from the best step of its local quadratic model?

At step :math:`t` with realized direction :math:`d = (\\theta_{t+1}-\\theta_t)/\\mathrm{lr}`, gradient
:math:`g_t` and Hessian :math:`H_t` of the mini-batch loss, the quadratic model along :math:`d` is minimised
at :math:`\\alpha^* = -d^\\top g_t / d^\\top H_t d`; :math:`\\alpha^*/\\mathrm{lr} = 1` means the step landed
on that minimum.
"""

from . import sweep
from ._checks import ParamVector
from ._function import Objective, objective
from .curvature import BACKENDS, AlphaResult, Backend, alpha_star, hvp
from .data import gaussian_regression, loader
from .direction import direction
from .models import SimpleNet
from .optim import OPTIMIZERS, make_optimizer, step_size
from .parameters import check_parameters
from .probe import AlphaProbe
from .problems import PROBLEMS, Problem, problem
from .records import FLAGS, Record, epoch_summary, key_numbers, seed_summary, to_frame
from .records import read as read_records
from .records import write as write_records
from .scaled import AlphaScaled
from .sharpness import Sharpness, hessian_trace, stability_threshold, top_eigenvalue
from .spectrum import AlphaScope, LineProfile, alpha_over, line_profile, next_step_profiles
from .sweep import grid, runs
from .train import History, evaluate, run, train

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """Import the rings that pull in plotting and widgets, ``alphalib.live`` and ``alphalib.plot``, when first used."""
    if name in ("live", "plot"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'alphalib' has no attribute {name!r}")


__all__ = [
    # curvature along a direction
    "hvp",
    "alpha_star",
    "AlphaResult",
    "Backend",
    "BACKENDS",
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
    "seed_summary",
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
