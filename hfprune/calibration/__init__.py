"""Pruning from calibration data, without retraining: the passes one-shot strategies run
(:mod:`hfprune.calibration.passes`) and the driver that runs them (:func:`oneshot`, also
``hfprune.oneshot``)."""

from hfprune.calibration.driver import oneshot
from hfprune.calibration.passes import Calibration, CalibrationError, LayerReplay

__all__ = ["Calibration", "CalibrationError", "LayerReplay", "oneshot"]
