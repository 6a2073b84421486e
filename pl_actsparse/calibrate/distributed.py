"""Agreement between ``torch.distributed`` ranks: every collective of calibration goes through :class:`Distributed`."""

from __future__ import annotations

import torch

__all__ = ["Distributed", "NOBODY"]

#: An integer larger than any layer index or dtype code: "nothing to propose" in :meth:`Distributed.min_int`.
NOBODY = 1 << 62
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


class Distributed:
    """Summing and agreeing across processes; a no-op in a single process.

    ``enabled``: ``None`` sums over ranks when a process group with several ranks is initialized; ``False``
    never does. ``device``: the model's device (nccl reduces tensors there, gloo on CPU).
    """

    def __init__(self, enabled: bool | None, device: torch.device | None) -> None:
        import torch.distributed as dist

        available = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.enabled = available if enabled is None else (enabled and available)
        self.dist = dist
        backend = dist.get_backend() if self.enabled else None
        # gloo reduces CPU tensors; nccl needs CUDA ones
        self.device = device if (backend == "nccl" and device is not None) else torch.device("cpu")

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks (a new tensor on ``t``'s device; ``t`` itself in a single process)."""
        if not self.enabled:
            return t
        buf = t.to(self.device).contiguous()  # gloo reduces the storage as laid out: a transposed view would come back transposed
        self.dist.all_reduce(buf, op=self.dist.ReduceOp.SUM)
        return buf.to(t.device)

    def gather_(self, t: torch.Tensor) -> torch.Tensor:
        """On rank 0, the rows of ``t`` of every rank in rank order; on the others, ``t`` (``t`` itself in a single
        process). Only rank 0 holds the union: the others never allocate it."""
        if not self.enabled:
            return t
        world, rank = self.dist.get_world_size(), self.dist.get_rank()
        sizes = self.sum_(torch.zeros(world, dtype=torch.int64).index_fill_(0, torch.tensor([rank]), t.shape[0])).tolist()
        buf = t.new_zeros(max(sizes), *t.shape[1:], device=self.device)
        buf[: t.shape[0]] = t
        parts = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
        self.dist.gather(buf, parts, dst=0)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(t.device) if rank == 0 else t

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over ranks."""
        if not self.enabled:
            return value
        buf = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(buf, op=self.dist.ReduceOp.MIN)
        return int(buf.item())

    def count(self, n: int) -> int:
        """``n`` summed over ranks."""
        return int(self.sum_(torch.tensor([n])).item()) if self.enabled else n

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank."""
        return bool(self.count(int(flag)))

    def agreed_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        """Ranks that saw no input for a layer (``None``) learn its dtype from the others."""
        return _CODE_DTYPES[self.min_int(_DTYPE_CODES[dtype] if dtype is not None else NOBODY)]

    @property
    def is_main(self) -> bool:
        return not self.enabled or self.dist.get_rank() == 0
