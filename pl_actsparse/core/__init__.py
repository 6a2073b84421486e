"""The sparsified layer and its state, scopes and recipes, token masks, int8 weights: plain PyTorch. Imports only
``errors`` and ``kernels`` (third-party layer types arrive through ``core.layer.LINEAR_LIKE_SOURCES``)."""
