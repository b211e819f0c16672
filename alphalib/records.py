r"""One record per probed step, the flags for odd curvature, and the tidy DataFrame built from them.

A record describes the step :math:`\Delta = \theta_{t+1} - \theta_t` the optimizer really took, in units of
the step size :math:`s` it used (``step_size``: the learning rate, or the one a learning-rate-free optimizer chose,
see :func:`alphalib.optim.step_size`): :math:`d = \Delta/s`, ``slope`` :math:`= d^\top g_t`, ``curvature``
:math:`= d^\top H_t d`, ``alpha_star`` :math:`= -d^\top g_t / d^\top H_t d` and ``ratio`` :math:`=
\alpha^*/s = -\Delta^\top g_t / \Delta^\top H_t \Delta`, the multiple of the realized step that lands on the
minimum of the quadratic model (1 = on it, < 1 = the step overshoots).
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

#: Flags, in the order they are tested; a record's ``flag`` joins those that hold with ``"|"``, or is ``"ok"``.
#: ``mismatch``: what was handed to the probe is not what training backpropagated (another batch, a loss that is
#: not a multiple of ``loss_fn``, fewer batches than backward passes); the numbers are those of what was handed.
FLAGS: tuple[str, ...] = (
    "error",
    "nonfinite",
    "mismatch",
    "zero_step",
    "zero_curvature",
    "negative_curvature",
    "ascent",
)


@dataclass(frozen=True)
class Record:
    """What the probe measured on one step, in units of the step size the optimizer used.

    The unit is ``step_size``: the first param group's lr, or the step size a learning-rate-free optimizer chose
    (see the module for the definitions).
    """

    step: int  #: index of the optimizer step, counted from 0 over all ``probe.step`` calls
    epoch: int | None  #: epoch, when the caller gives it
    loss: float  #: :math:`L_B(\theta_t)`
    lr: float  #: learning rate of the first param group
    step_size: float  #: the step size the optimizer used: ``lr``, or Prodigy's :math:`d\,\mathrm{lr}`, DoG's η, …
    slope: float  #: :math:`d^\top g_t`
    curvature: float  #: :math:`d^\top H_t d` by ``backend``
    alpha_star: float  #: :math:`-d^\top g_t / d^\top H_t d`, NaN when undefined
    ratio: float  #: ``alpha_star / step_size``
    grad_norm: float  #: :math:`\|g_t\|`, the gradient of the measured loss (before any clipping)
    step_norm: float  #: :math:`\|\theta_{t+1} - \theta_t\|`
    flag: str  #: ``"ok"`` or ``"|"``-joined names from :data:`FLAGS`
    backend: str  #: curvature backend that produced ``curvature``
    path: str = "generic"  #: ``"fast"`` (reused the training step) or ``"generic"`` (recomputed at θ_t)
    fallback: str = ""  #: why the generic path ran (empty when the fast path did); what failed, on errors
    #: :math:`\mathrm{lr}/\alpha^* = -d^\top H d / d^\top g`: defined on odd steps too (continuous through a change
    #: of the curvature's sign, 0 on a flat direction), NaN only when the slope is 0
    lr_over_alpha: float = math.nan
    full_loss: float = math.nan  #: the same along the same d for the full-data loss (when the probe is given data)
    full_slope: float = math.nan
    full_curvature: float = math.nan
    full_ratio: float = math.nan
    heldout_loss: float = math.nan  #: ... and for held-out data, which the step never saw
    heldout_slope: float = math.nan
    heldout_curvature: float = math.nan
    heldout_ratio: float = math.nan
    #: the batch Hessian's largest eigenvalue at :math:`\theta_t` (every ``sharpness_every``-th probed step)
    lambda_max: float = math.nan
    #: :math:`\lambda_{\max}(P_t^{-1} H)`, Adam's preconditioned sharpness (see :mod:`alphalib.sharpness`)
    precond_lambda_max: float = math.nan


def classify(slope: float, curvature: float, *values: float, step_norm: float = 1.0) -> str:
    """Return the flag string for one step's slope and curvature."""
    if not all(math.isfinite(x) for x in (slope, curvature, *values)):
        return "nonfinite"
    if step_norm == 0.0:
        return "zero_step"
    flags = []
    if curvature == 0.0:
        flags.append("zero_curvature")
    elif curvature < 0.0:
        flags.append("negative_curvature")
    if slope > 0.0:
        flags.append("ascent")
    return "|".join(flags) or "ok"


def make_record(
    *,
    step: int,
    epoch: int | None,
    loss: float,
    lr: float,
    step_slope: float,
    step_curvature: float,
    grad_norm: float,
    step_norm: float,
    backend: str,
    path: str = "generic",
    error: bool = False,
    mismatch: bool = False,
    fallback: str = "",
    scopes: Mapping[str, Any] | None = None,
    step_size: float | None = None,
    sharpness: Mapping[str, float] | None = None,
) -> Record:
    """Build a record from slope and curvature along the realized step :math:`\\Delta` (not yet in step-size units;
    ``step_size`` defaults to ``lr``)."""
    flag = "error" if error else classify(step_slope, step_curvature, loss, step_norm=step_norm)
    if mismatch and flag != "error":
        flag = "|".join(sorted({"mismatch", *flag.split("|")} - {"ok"}, key=FLAGS.index))
    usable = not {"error", "nonfinite", "zero_step"} & set(flag.split("|"))
    ratio = alpha(step_slope, step_curvature) if usable else math.nan
    size = lr if step_size is None else step_size
    scale = size if size > 0 else math.nan
    return Record(
        step=step,
        epoch=epoch,
        loss=loss,
        lr=lr,
        step_size=size,
        slope=step_slope / scale,
        curvature=step_curvature / scale / scale,  # (never OverflowError: inf)
        alpha_star=ratio * scale,
        ratio=ratio,
        grad_norm=grad_norm,
        step_norm=step_norm,
        flag=flag,
        backend=backend,
        path=path,
        fallback=fallback,
        lr_over_alpha=_inverse(step_slope, step_curvature) if flag != "error" else math.nan,
        **{
            f"{name}_{key}": value
            for name, res in (scopes or {}).items()
            for key, value in _scope(res.loss, res.slope, res.curvature, scale).items()
        },
        **dict(sharpness or {}),
    )


def tell(listeners: list[Callable[[Record], None]], rec: Record) -> None:
    """Hand ``rec`` to each listener; drop, with a warning, one that raises (a view must never stop training)."""
    for listener in list(listeners):
        try:
            listener(rec)
        except Exception as exc:
            listeners.remove(listener)
            warnings.warn(
                f"alphalib: listener {listener!r} raised {exc!r} and was detached; training goes on.",
                RuntimeWarning,
                stacklevel=3,
            )


def alpha(slope: float, curvature: float) -> float:
    r"""Return :math:`-\text{slope}/\text{curvature}`, the multiple of the direction at the quadratic model's
    stationary point; NaN when the curvature is zero or either value is not finite.

    The one place :math:`\alpha^*` is computed: records, :func:`alphalib.alpha_star` and
    :func:`alphalib.alpha_over` all call it. Example:

        >>> alpha(-2.0, 4.0), alpha(1.0, 0.0)
        (0.5, nan)
    """
    return -slope / curvature if curvature != 0 and math.isfinite(curvature) and math.isfinite(slope) else math.nan


def _inverse(slope: float, curvature: float) -> float:
    r"""Return :math:`-\Delta^\top H \Delta / \Delta^\top g` (= lr/α*), NaN when the slope is 0 or not finite."""
    return -curvature / slope if slope != 0 and math.isfinite(slope) and math.isfinite(curvature) else math.nan


def _scope(loss: float, slope: float, curvature: float, lr: float) -> dict[str, float]:
    return {"loss": loss, "slope": slope / lr, "curvature": curvature / lr / lr, "ratio": alpha(slope, curvature)}


def to_frame(records: Iterable[Record], tags: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Return the records as a DataFrame, one row per probed step.

    Args:
        records: The records, e.g. ``probe.records``.
        tags: Constant columns to add (name -> value).

    Returns:
        One row per record, a column per :class:`Record` field (in their order), then the ``tags``.
    """
    import pandas as pd

    columns = list(Record.__dataclass_fields__)
    frame = pd.DataFrame([asdict(r) for r in records], columns=columns)
    for key, value in (tags or {}).items():
        frame[key] = value
    return frame


def write(frame: pd.DataFrame, path: str | Path) -> None:
    """Write records to ``path`` as CSV, gzipped CSV or Parquet, by its suffix; the folder is created.

    ``.csv`` and ``.csv.gz`` keep every float exactly, and the same records give the same bytes; ``.parquet``
    needs pyarrow.

    Args:
        frame: The records as a DataFrame (:func:`to_frame`, ``probe.to_frame()``).
        path: The file to write, ending in ``.csv``, ``.csv.gz`` or ``.parquet``.

    Raises:
        ValueError: If ``path`` has another suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    elif path.name.endswith((".csv", ".csv.gz")):
        frame.to_csv(path, index=False, compression={"method": "gzip", "mtime": 0} if path.suffix == ".gz" else None)
    else:
        raise ValueError(f"records are written as .csv, .csv.gz or .parquet, not {path.name!r}.")


def read(path: str | Path) -> pd.DataFrame:
    """Read records written by :func:`write` or streamed by :class:`Stream`.

    A torn last line of a CSV (a run stopped while writing it) is left out with a warning.

    Args:
        path: A ``.csv``, ``.csv.gz`` or ``.parquet`` file, or a folder of Parquet parts (``part-*.parquet``).

    Returns:
        The records as a DataFrame; ``fallback`` stays a string (empty, not NaN), a missing ``epoch`` is NaN.

    Raises:
        FileNotFoundError: If ``path`` is a folder without parts.
        ValueError: If a CSV row has not the header's number of fields (a damaged file).
    """
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        parts = sorted(path.glob("part-*.parquet"))
        if not parts:
            raise FileNotFoundError(f"no records (part-*.parquet) in the folder {path}.")
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    if path.name.endswith(".parquet"):
        return pd.read_parquet(path)
    frame = pd.read_csv(io.StringIO(_whole_lines(path)), dtype={"fallback": str})
    if "fallback" in frame:
        frame["fallback"] = frame["fallback"].fillna("")
    return frame


def _whole_lines(path: Path) -> str:
    """Return the text of a records ``.csv`` (or ``.csv.gz``) without a torn last line, which is dropped with a
    warning; raise ``ValueError`` naming the line where a row has not the header's number of fields."""
    with gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="") as f:
        text = f.read()
    lines = text.count("\n")
    if text and not text.endswith("\n"):  # a crash while a line was written: keep the whole lines before it
        warnings.warn(
            f"{path}, line {lines + 1}: the last line is incomplete (the run stopped while writing it); "
            "it is left out.",
            RuntimeWarning,
            stacklevel=3,
        )
        text = text[: text.rfind("\n") + 1]
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    for row in reader:
        if header is not None and len(row) != len(header):
            raise ValueError(
                f"{path}, line {reader.line_num}: {len(row)} fields where the header has {len(header)}; "
                "the file is damaged there (two runs writing to it, or an edit). Remove that line."
            )
    return text


class Stream:
    """Write records to disk as training runs, an epoch at a time, so that a crash loses at most the current epoch.

    A listener (``probe.listeners.append(stream)``; :func:`alphalib.train` with ``records_to=`` attaches one, flushes
    it after every epoch and closes it). It keeps a step's record until the epoch changes, :meth:`flush` or
    :meth:`close`, then appends what it kept. :func:`read` reads either form back.

    Args:
        path: A ``.csv`` file, appended to (the header once, every float exact), or else a folder that gets one
            ``part-NNNNN.parquet`` per flush (needs pyarrow): a Parquet file is readable only once complete, so
            each part is written whole. The folder is created.
        tags: Constant columns to add (``probe.frame_tags``).

    Raises:
        ValueError: If ``path`` does not end in ``.csv`` and is an existing file.
    """

    def __init__(self, path: str | Path, tags: Mapping[str, Any] | None = None):
        self.path, self.tags = Path(path), dict(tags or {})
        self.csv = self.path.suffix == ".csv"
        if not self.csv and self.path.exists() and not self.path.is_dir():
            raise ValueError(f"records stream to a .csv file or to a folder of Parquet parts; {self.path} is a file.")
        (self.path.parent if self.csv else self.path).mkdir(parents=True, exist_ok=True)
        self._kept: list[Record] = []
        self._parts = len(list(self.path.glob("part-*.parquet"))) if not self.csv else 0

    def __call__(self, rec: Record) -> None:
        if self._kept and rec.epoch != self._kept[-1].epoch:
            self.flush()
        self._kept.append(rec)

    def flush(self) -> None:
        """Append the records kept so far."""
        if not self._kept:
            return
        frame = to_frame(self._kept, self.tags)
        if self.csv:
            frame.to_csv(
                self.path, mode="a", header=not self.path.exists() or self.path.stat().st_size == 0, index=False
            )
        else:
            frame.to_parquet(self.path / f"part-{self._parts:05d}.parquet", index=False)
            self._parts += 1
        self._kept = []

    def close(self) -> None:
        """Append what is left."""
        self.flush()


class TensorBoard:
    """Write each record's ``alpha_star``, ``ratio``, ``curvature`` and ``loss`` as TensorBoard scalars at its step.

    A listener, like :class:`Stream`, through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package:
    ``pip install -c constraints.txt "alphalib[tensorboard]"``); scalars go under ``alphalib/``. NaN (no step size)
    is written as it is.

    Args:
        log_dir: The folder of the event files.

    Raises:
        ImportError: If the ``tensorboard`` package is not installed.
    """

    SCALARS = ("alpha_star", "ratio", "curvature", "loss")

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "TensorBoard scalars need the tensorboard package: pip install -c constraints.txt "
                '"alphalib[tensorboard]".'
            ) from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, rec: Record) -> None:
        for name in self.SCALARS:
            self.writer.add_scalar(f"alphalib/{name}", getattr(rec, name), rec.step)

    def flush(self) -> None:
        """Write what the writer holds."""
        self.writer.flush()

    def close(self) -> None:
        """Write what is left and close the event file."""
        self.writer.close()


def epoch_summary(frame: pd.DataFrame, *, by: str | Sequence[str] = ()) -> pd.DataFrame:
    """Return per-epoch medians of α*, α*/lr and lr/α*, and the shares of odd steps, one row per epoch (and group).

    Args:
        frame: Records as a DataFrame (:func:`to_frame`), with an ``epoch`` column.
        by: Columns that tell runs apart (``["method", "seed"]``), summarised separately; none: one run.

    Returns:
        A DataFrame indexed by ``by`` and epoch with ``steps``, ``undefined`` (the steps whose α* is NaN, dropped by
        the α* medians), ``median_alpha_star``, ``median_ratio``; where ``frame`` has them, ``median_lr_over_alpha``
        (defined on every step with a nonzero slope, so it keeps the odd steps that the α* medians drop) with
        ``alpha_le_0`` (the share of those steps with lr/α* ≤ 0), ``median_lr`` and ``median_step_size``; then
        ``negative_curvature`` and ``ascent`` (shares of the steps so flagged) and ``loss`` (the mean).

    Example:
        >>> import pandas as pd
        >>> frame = pd.DataFrame({"seed": [0, 0, 1], "epoch": 0, "step": [0, 1, 0], "alpha_star": [1.0, -1.0, 2.0],
        ...                       "ratio": [1e3, -1e3, 2e3], "lr_over_alpha": [1e-3, -1e-3, 5e-4], "loss": 1.0,
        ...                       "flag": ["ok", "negative_curvature", "ok"]})
        >>> summary = epoch_summary(frame, by="seed")  # seed 0: one step of two has α* ≤ 0
        >>> summary.index.tolist(), summary.median_lr_over_alpha.tolist(), summary.alpha_le_0.tolist()
        ([(0, 0), (1, 0)], [0.0, 0.0005], [0.5, 0.0])
    """
    keys = [by] if isinstance(by, str) else list(by)
    flag = frame["flag"]
    extra: dict[str, tuple[str, str]] = {}
    columns = {}
    if "lr_over_alpha" in frame:
        inverse = frame["lr_over_alpha"]
        columns["alpha_le_0"] = (inverse <= 0).astype(float).where(inverse.notna())
        extra |= {"median_lr_over_alpha": ("lr_over_alpha", "median"), "alpha_le_0": ("alpha_le_0", "mean")}
    extra |= {f"median_{name}": (name, "median") for name in ("lr", "step_size") if name in frame}
    summary = frame.assign(
        negative_curvature=flag.str.contains("negative_curvature"),
        ascent=flag.str.contains("ascent"),
        undefined=frame["ratio"].isna(),
        **columns,
    ).groupby([*keys, "epoch"])
    return summary.agg(
        steps=("step", "size"),
        undefined=("undefined", "sum"),
        median_alpha_star=("alpha_star", "median"),
        median_ratio=("ratio", "median"),
        **extra,
        negative_curvature=("negative_curvature", "mean"),
        ascent=("ascent", "mean"),
        loss=("loss", "mean"),
    )


def _beyond(inverse: float) -> float:
    """Return 1/x for a median x of lr/α*: +inf where x ≤ 0 (most steps had α* ≤ 0: beyond any ratio), NaN for NaN."""
    if math.isnan(inverse):  # first: an ordered comparison with NaN raises the FPU's invalid flag
        return math.nan
    return 1 / inverse if inverse > 0 else math.inf


def key_numbers(frame: pd.DataFrame, by: str | Sequence[str] = (), *, digits: int = 2) -> pd.DataFrame:
    r"""Return a run's key numbers per ``by`` group, each rounded to ``digits`` significant digits.

    What a notebook's last cell prints and nbval compares with the stored output: rounded, the table is the same on
    machines whose floats differ in the last bits (another CPU, another thread count), and still changes when the
    science does.

    Args:
        frame: Records as a DataFrame (:func:`to_frame`).
        by: The column or columns to group by; none (the default): one row for the whole frame.
        digits: The significant digits to round to.

    Returns:
        A DataFrame, indexed by the ``by`` groups, with the columns ``steps`` (probed steps), ``ok`` (the share
        flagged ``ok``), ``alpha_over_lr`` (:math:`1/\operatorname{median}(\mathrm{lr}/\alpha^*)`: the median
        :math:`\alpha^*/s` counting every step, odd ones included; +inf where that median is ≤ 0, most steps having
        :math:`\alpha^* \le 0`), ``loss_first`` and ``loss_last`` (the mean
        batch loss of the first and the last epoch probed).

    Example:
        >>> import pandas as pd
        >>> frame = pd.DataFrame({"step": [0, 1, 2], "epoch": [0, 0, 1], "loss": [2.0, 1.0, 0.5], "flag": ["ok"] * 3,
        ...                       "lr_over_alpha": [0.5, 0.25, 0.3]})
        >>> key_numbers(frame).to_dict("records")
        [{'steps': 3, 'ok': 1.0, 'alpha_over_lr': 3.3, 'loss_first': 1.5, 'loss_last': 0.5}]
    """
    import pandas as pd

    def rounded(x: float) -> float:
        return float(f"{x:.{digits}g}")

    def numbers(rows: pd.DataFrame) -> dict[str, float]:
        epochs = rows["epoch"] if rows["epoch"].notna().any() else pd.Series(0, index=rows.index)
        return {
            "steps": len(rows),
            "ok": rounded((rows["flag"] == "ok").mean()),
            "alpha_over_lr": rounded(_beyond(rows["lr_over_alpha"].median())),
            "loss_first": rounded(rows["loss"][epochs == epochs.min()].mean()),
            "loss_last": rounded(rows["loss"][epochs == epochs.max()].mean()),
        }

    keys = [by] if isinstance(by, str) else list(by)
    if not keys:
        return pd.DataFrame([numbers(frame)])
    table = pd.DataFrame({key: numbers(rows) for key, rows in frame.groupby(keys, sort=False)}).T
    table.index.names = keys
    return table.astype({"steps": int})
