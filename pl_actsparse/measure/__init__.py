"""What was achieved: :mod:`~pl_actsparse.measure.metric` (the one counter of ``|x| <= threshold``: the
``ActivationSparsity`` metric, ``SparsityCounter``, ``DecodeSparsity``), :mod:`~pl_actsparse.measure.report` (the
one report, of a live model or a checkpoint) and :mod:`~pl_actsparse.measure.plot` (every plot; matplotlib is
optional). Imports only ``core``; never ``export``."""
