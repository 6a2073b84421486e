import os
import sys
from pathlib import Path

import pytest

# tests/ (tiny_models) and its folders (test modules that import helpers of another, e.g. test_masks) importable
sys.path[:0] = [str(Path(__file__).parent)] + sorted(str(d) for d in Path(__file__).parent.iterdir() if d.is_dir() and d.name[0] not in "._")

from hypothesis import settings  # noqa: E402

# CI gates merges: the same examples every run (derandomize), so a red run is reproducible; dev runs keep exploring
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def one_thread():
    """Tiny matmuls: one intra-op thread avoids OpenMP spin-waiting on a busy machine (docs/models.md).

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny():
    from tiny_models import tiny_llama

    return tiny_llama()


@pytest.fixture
def batches():
    from tiny_models import token_batches

    return token_batches()


@pytest.fixture(params=["torch", "cpp"])
def int8_backend(request):
    """Each int8 kernel backend in turn ("cpp" skipped when the C++ extension cannot load); the default restored after."""
    from pl_actsparse.kernels import cpu
    from pl_actsparse.kernels import int8_cpu as k8

    if request.param == "cpp" and not k8.load_int8_extension():
        pytest.skip(f"int8 C++ kernel unavailable: {k8.int8_extension_status().error}")
    cpu.set_backend(request.param)
    yield request.param
    cpu.set_backend(None)
