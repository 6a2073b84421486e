"""The Lightning integration: :class:`~pl_actsparse.lightning.callback.ActivationSparsityCallback`, its
:class:`~pl_actsparse.lightning.calibration_data.CalibrationData` and
:class:`~pl_actsparse.lightning.schedule.SparsitySchedule`, and the ``pl-actsparse`` command line
(:mod:`pl_actsparse.lightning.cli`). The only subpackage that imports ``lightning``.

The callback reports through the ``pl_actsparse`` logger at level INFO (rank 0 only). Like Lightning's own
``lightning.pytorch`` logger, it gets a stderr handler when the application configured no logging, so the
calibration tables show by default; configure ``logging`` (or set the logger's level) to change that.
"""

import logging

_logger = logging.getLogger("pl_actsparse")
if not logging.getLogger().hasHandlers() and not _logger.handlers:
    _logger.setLevel(logging.INFO)
    _logger.addHandler(logging.StreamHandler())
    _logger.propagate = False
