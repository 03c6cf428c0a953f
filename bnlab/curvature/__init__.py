"""Curvature of the loss: the Hessian's top eigenvalues, trace, eigenvalue density, and the
gradient's overlap with the top eigenspace, with batch, running or population statistics.

Why: a normalization researcher checks two results first. Without BN, a few large isolated
Hessian eigenvalues appear early in training and the gradient concentrates in their span;
with BN they are almost absent, and they return when BN runs with population statistics
(Ghorbani, Krishnan & Xiao 2019, arXiv 1901.10159). BN's smoothing shows at depth, not in
shallow nets (Yao et al. 2020, PyHessian, arXiv 1912.07145).

The measures, each of the Hessian H of ``loss_fn(model(x), y)`` on one batch:

- :func:`top_eigenvalues` — the ``k`` largest eigenvalues, descending (Lanczos with full
  reorthogonalization, :mod:`bnlab.curvature.lanczos`);
- :func:`trace` — Hutchinson's estimate with Rademacher probes and its standard error;
- :func:`density` — the eigenvalue density by stochastic Lanczos quadrature, on a grid, with
  Gaussian broadening;
- :func:`gradient_overlap` — ‖P_k g‖² / ‖g‖², P_k the projection on the top-``k`` eigenspace.

Common arguments:

- ``params``: which parameters H is over. None: every trainable parameter. A module path
  (``"features.0"``, ``"stages.2"``): that module's parameters, its submodules' included — the
  diagonal block of H for that layer or block, the rest held fixed. A parameter name
  (``"fc.weight"``): that parameter. A list: one block over the union of its entries (cross
  terms included). An unknown name, or a module without trainable parameters, is a
  ``UsageError``.
- ``bn``: which statistics the norm layers normalize with.
  ``batch``: the batch's own, as in training (running statistics are not updated);
  ``running``: the running statistics, as in evaluation;
  ``population``: statistics re-estimated as Precise BN does
  (:func:`bnlab.precise_bn.precise_bn_copy`, on a copy of the model) from the keyword
  ``population_batches`` (input tensors, all of them used), then used as in evaluation.
  Default (None): the model's own mode, train mode → ``batch``, eval mode → ``running``.
  Only layers with running statistics change mode; every other module keeps the model's
  flags, so comparing modes changes the statistics and nothing else. Layers without running
  statistics (Group/Layer Norm, ``track_running_stats=False``) use batch statistics always.
- ``seed``: the random probe and start vectors come from a private ``torch.Generator`` seeded
  with it; the same seed gives the same result.

Conventions:

- Hessian-vector products by double backward (``torch.autograd.grad`` with
  ``create_graph=True``, :mod:`bnlab.curvature.operator`): one forward and backward per
  call, then one backward through the kept graph per product. Memory: that graph (the
  forward's and the first backward's saved tensors, more than a training step keeps) plus the
  Lanczos basis (steps × parameters values, in the model's dtype).
- The function is fixed: dropout masks and BN noise are drawn once, in the operator's
  forward, under the probes' fixed seed (``bnlab.probes.readonly.PROBE_SEED``), so every
  product, every measure and every call sees the same function. Batch Renorm's r and d are
  constants to autograd (as in training), so its H is that of the loss with r, d fixed.
- float32 or float64, the model's dtype (the tridiagonal matrices in float64); no autocast.
- Read-only: weights, buffers (running statistics, ``num_batches_tracked``), ``.grad``,
  train/eval flags and the global RNG streams are as before the call.
- Layers need a double backward: bnlab's norms have one (the reference backward is
  differentiable), except decorrelated BN with ZCA whitening in training mode, which is
  refused with a ``UsageError`` (``bn='running'``/``'population'`` work; IterNorm too).

To compute several measures of one batch, build the operator once with
:func:`hessian_operator` and call the ``*_of`` functions on it.
"""

from bnlab.curvature.measures import (
    Eigenpairs,
    density,
    gradient_overlap,
    overlap_of,
    quadrature_of,
    top_eigenpairs_of,
    top_eigenvalues,
    trace,
    trace_of,
)
from bnlab.curvature.operator import (
    BN_MODES,
    HessianOperator,
    hessian_operator,
    resolve_bn,
    select_parameters,
)

__all__ = [
    "BN_MODES",
    "Eigenpairs",
    "HessianOperator",
    "density",
    "gradient_overlap",
    "hessian_operator",
    "overlap_of",
    "quadrature_of",
    "resolve_bn",
    "select_parameters",
    "top_eigenpairs_of",
    "top_eigenvalues",
    "trace",
    "trace_of",
]
