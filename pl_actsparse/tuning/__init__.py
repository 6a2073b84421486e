"""Choosing targets, accuracy against sparsity: :mod:`~pl_actsparse.tuning.sweep` (thresholds for any target from
one calibration pass, sweeps), :mod:`~pl_actsparse.tuning.objectives` (perplexity, the calibration loss) and
:mod:`~pl_actsparse.tuning.weight_aware` (per-channel thresholds from ``|x| * ||W[:, i]||``)."""
