r"""The probe: take the optimizer's step and measure how far it is from the quadratic model's best step.

On a probed step the probe keeps a copy of :math:`\theta_t`, calls ``optimizer.step()`` exactly as training
would, forms the realized step :math:`\Delta = \theta_{t+1} - \theta_t` and evaluates, at :math:`\theta_t` on
the same batch, the slope :math:`\Delta^\top g_t` and the curvature :math:`\Delta^\top H_t \Delta` with the
chosen backend (see :mod:`alphalib.curvature`). Because it uses the realized step it works for any
optimizer, and with several param groups at different learning rates the ``ratio``
:math:`-\Delta^\top g_t / \Delta^\top H_t \Delta` (the multiple of the whole step that reaches the model's
minimum) stays defined; ``alpha_star`` is then ``ratio`` times the *first* group's learning rate.

**The function that is probed.** Slope and curvature come from one function, the one training differentiated:
``loss_fn(model(x), y)`` (or the :func:`alphalib.objective`) on the same batch, or on the union of the
micro-batches that built ``.grad``, as the training forward ran it: each module in the mode it was in, the
buffers at the values it read, its random draws replayed (a model with dropout is probed with the step's own
mask), hooks, parametrizations and pruning included; gradient-only modifiers (backward hooks,
``scale_grad_by_freq``) do not change it, so the slope is the loss's own gradient along the step
(:mod:`alphalib._trained`).

**Two paths.** The *fast* path reuses what the training step computed: for ``"hessian"`` and ``"ggn"`` a
sweep along the step over its saved activations and errors (:mod:`alphalib.fast`: by module rules where every
module has one and runs its textbook forward, else over the operations the training forward ran); for
``"fd"``, ``"fd_onesided"`` and ``"secant"`` the training loss and gradient. The *generic* path evaluates the
same function afresh at :math:`\theta_t` under the training forward's state and works for any model and loss.
``path="auto"`` (default) takes the fast path only where the evidence shows that what it would reuse is this
step's: one forward pass on the batch handed over, one backward pass of a multiple of the probe's loss through
the model's output, parameters unchanged since; :math:`g_t` is what reached the parameters through the output
(so clipping or penalties on ``.grad`` do not leak in). Otherwise the generic path runs and the record's
``fallback`` says why; a batch that is not what training backpropagated is flagged ``mismatch``. On a model
followed by recorded operations, where the fast path is not always the cheaper (many small operations cost
Python time each), ``path="auto"`` times the training iteration in the user's own loop on both paths during its
first five probed steps (the 2nd and 4th generic) and keeps the faster; ``fallback`` says so.

**Precision.** Below float64 the probe measures in float64 what the parameters' precision leaves to rounding:
the difference backends always, and every backend on a step below the parameters' resolution or a loss within
:math:`10^3 u` of zero (:mod:`alphalib.probe.router`); ``fallback`` says so.

**Step size.** The record gives :math:`\alpha^*` in units of the step size the optimizer chose,
``step_size`` (:func:`alphalib.optim.step_size`: the lr, or a learning-rate-free optimizer's own, such as
Prodigy's :math:`d\,\mathrm{lr}` or DoG's :math:`\eta`), so ``ratio`` is the multiple of the realized step for
every optimizer. Schedule-Free is measured at its gradient point :math:`y_t`, the parameters in its train mode;
an optimizer left in eval mode is refused before it steps.

**A pure observer.** Parameters, ``.grad``, optimizer state, buffers (BatchNorm running statistics) and the
global RNG stream end up bit-for-bit as they would without the probe. What cannot be measured raises a
``ValueError`` before the optimizer steps; after it nothing raises: odd curvature is recorded and named in
``flag`` (see :data:`alphalib.records.FLAGS`), and a backend that fails (for example an operation without a
double backward) records ``flag="error"``, its reason in ``fallback``, and warns once.

**DistributedDataParallel.** Given a DDP model, the probe follows the module it wraps and records the *global*
batch's :math:`\alpha^*`: each rank measures its own shard, then loss, slope, curvature (averaged) and the norm of the
averaged gradient are all-reduced over DDP's process group, the same collectives on every rank whatever path it
took, so every rank holds the same records (write them on one: :func:`alphalib.distributed.is_main_process`). With
a mean-reduced loss and equal shards this is a single process's :math:`\alpha^*` on the concatenated batch; unequal
shards, costs and failures: see :mod:`alphalib.distributed`.

**Where each part lives.** :mod:`~alphalib.probe.facade` (:class:`AlphaProbe`), :mod:`~alphalib.probe.recorder`
(what the training step left, kept by hooks), :mod:`~alphalib.probe.evidence` (from those facts, what the fast
path may reuse), :mod:`~alphalib.probe.router` (which path measures the step, and the precision rules).
"""

from .facade import AlphaProbe, Path

__all__ = ["AlphaProbe", "Path"]
