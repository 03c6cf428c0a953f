"""Signal propagation at initialization and scale invariance: ``bnlab signal`` and the measures
that the ``gram/`` and ``scale/`` probes share with it.

- :mod:`bnlab.signal.measures`: the definitions (channel moments, the sample Gram matrix and its
  similarity and ranks, the angle of a weight update and its equilibrium, the log-linear fit);
- :mod:`bnlab.signal.positions`: where a model is measured (norm slots, residual blocks,
  gradient layers), found from its structure;
- :mod:`bnlab.signal.collect`: one read-only measurement of a model on one batch;
- :mod:`bnlab.signal.report`: ``signal.json`` (mean ± std over seeds and batches, the fitted
  gradient growth, the summary numbers ``bnlab compare`` shows);
- :mod:`bnlab.signal.figures`: the figures of one run and the overlay of several;
- :mod:`bnlab.signal.command`: the ``bnlab signal`` command (its config schema and run).

Nothing is imported here, so ``import bnlab.signal.measures`` costs only what it needs.
"""
