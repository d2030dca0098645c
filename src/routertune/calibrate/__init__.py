"""Calibrate router thresholds to a target capacity, without retraining.

    routertune calibrate --routers runs/rt --target_capacity 0.5

    from routertune.calibrate import calibration_split, make_batches, calibrate_thresholds
    fit, heldout = calibration_split("builtin", n=64, n_heldout=32)
    result = calibrate_thresholds(model, make_batches(tokenizer, fit), target_capacity=0.5)

A router keeps a unit (a sequence or a token of one layer) iff ``score - threshold >= 0``.
Calibration records the routers' scores on instruction examples and moves the thresholds to
score quantiles so that the routed model keeps the requested share of routed units:

* ``global`` (default): one threshold for all routed layers, the quantile ``1 - C`` of all
  scores pooled; layers whose routers score higher keep more, so compute moves between
  layers as the routers prefer. On SmolLM2 it gave a lower held-out loss than ``per_layer``
  at the same capacity (docs/baselines.md).
* ``per_layer``: every routed layer keeps the share ``C`` of its units; the threshold of
  layer ``l`` is the quantile ``1 - C`` of that layer's scores. Exact, and one forward pass.

Skipping a unit changes the hidden states every later layer sees, so the scores of layer
``l`` depend on the thresholds of the layers before it (and, for ``global``, of itself).

* ``per_layer`` is solved exactly, layer after layer: each layer's quantile is taken from
  the scores it makes while every earlier layer already runs with its final threshold. With
  the calibration set in one batch that is one forward pass (a hook sets each router's
  threshold the moment it has scored the batch, before its layer acts); with several
  batches, one pass per routed layer, each stopped right after that layer's router.
* ``global`` iterates: each pass runs the routed model (really skipping) under the current
  threshold and proposes the pooled-score quantile of what it saw, bisecting inside the
  bracket of thresholds known to keep too much and too little, until the kept count is
  within ``max(1, 0.5%)`` of the routed units.

A first version iterated ``per_layer`` the same way; on SmolLM2 with trained routers whose
scores sit within a few hundredths of each other, 8 passes did not settle (every upstream
change flips decisions downstream). docs/baselines.md has the measured comparison.

``data``: the calibration set (``calibration_split``, ``make_batches``), also used by the
attention-drop baseline and the routing analysis; ``thresholds``: the searches above.
"""

from routertune.calibrate.data import (
    DEFAULT_HELDOUT,
    DEFAULT_N,
    CalibrationError,
    calibration_split,
    make_batches,
)
from routertune.calibrate.thresholds import (
    CALIBRATION_METHODS,
    CALIBRATION_REPORT,
    CalibrationResult,
    calibrate_thresholds,
    kept_target,
    save_calibrated,
    threshold_for_count,
)

__all__ = [
    "CALIBRATION_METHODS",
    "CALIBRATION_REPORT",
    "DEFAULT_HELDOUT",
    "DEFAULT_N",
    "CalibrationError",
    "CalibrationResult",
    "calibrate_thresholds",
    "calibration_split",
    "kept_target",
    "make_batches",
    "save_calibrated",
    "threshold_for_count",
]
