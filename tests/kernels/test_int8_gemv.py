"""The int8 C++ kernel's one-token loop (csrc/int8_sparse_gemv.cpp): it prefetches the next group of 8 kept rows
while streaming the current one. Kept-row counts around the group size and column counts around the SIMD widths
check that the prefetched group, the last group (no prefetch), the row remainder and the column tail all add up."""

from __future__ import annotations

import pytest
import torch

from pl_actsparse.kernels import int8_cpu as k8


@pytest.fixture(scope="module")
def gemv():
    assert k8.load_int8_extension(build=True), k8.int8_extension_status()
    return torch.ops.pl_actsparse_int8_ext.int8_sparse_gemv


def raw_reference(x: torch.Tensor, t: float, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``sum_i x_i q[i, :]`` over the kept inputs, and the sum of the terms' magnitudes (error scale)."""
    v = x.double().masked_fill(x.abs() <= t, 0)
    return v @ q.double(), v.abs() @ q.double().abs()


@pytest.mark.parametrize("kept", [0, 7, 8, 15, 16, 17, 24, 150, 300])
@pytest.mark.parametrize("out_f", [8, 64, 200, 1000])
def test_one_token_matches_float64_for_every_group_boundary(gemv, kept, out_f):
    g = torch.Generator().manual_seed(kept * 1000 + out_f)
    in_f = 300
    q = torch.randint(-128, 128, (in_f, out_f), dtype=torch.int8, generator=g)
    x = torch.randn(1, in_f, generator=g) * 0.1  # |x| < 1 except for the kept inputs, set below
    rows = torch.randperm(in_f, generator=g)[:kept]  # scattered kept rows
    x[0, rows] = torch.randn(kept, generator=g).sign() * (1.5 + torch.rand(kept, generator=g))
    ref, mag = raw_reference(x, 1.0, q)
    y = gemv(x, 1.0, q, None, None, None, None, None)
    assert y.dtype == torch.float32 and y.shape == (1, out_f)
    assert bool(((y.double() - ref).abs() <= 1e-6 * (mag + 1)).all())  # fp32 rounding of <= 300 terms


def test_column_split_over_threads_is_bit_identical_to_one_thread(gemv):
    # 1024 kept rows x 1536 columns: above the kernel's parallel threshold, so 2 threads take 768 columns each
    # and prefetch at a column offset; the per-column accumulation order is the same, hence the same bits.
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-128, 128, (1024, 1536), dtype=torch.int8, generator=g)
    x = torch.randn(1, 1024, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = gemv(x, -1.0, q, None, None, None, None, None)
        torch.set_num_threads(2)
        y2 = gemv(x, -1.0, q, None, None, None, None, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)
    ref, mag = raw_reference(x, -1.0, q)
    assert bool(((y1.double() - ref).abs() <= 1e-6 * (mag + 1)).all())
