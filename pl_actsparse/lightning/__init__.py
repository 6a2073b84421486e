"""The Lightning integration: :class:`~pl_actsparse.lightning.callback.ActivationSparsityCallback`, its
:class:`~pl_actsparse.lightning.calibration_data.CalibrationData` and
:class:`~pl_actsparse.lightning.schedule.SparsitySchedule`, and the ``pl-actsparse`` command line
(:mod:`pl_actsparse.lightning.cli`). The only subpackage that imports ``lightning``.

The callback reports through the ``pl_actsparse`` logger at level INFO (rank 0 only). A library configures no
logging: the logger only gets a ``NullHandler`` and its level is left alone; the ``pl-actsparse`` console script
shows the tables (it is an application), elsewhere configure ``logging`` to see them.
"""

import logging

logging.getLogger("pl_actsparse").addHandler(logging.NullHandler())
