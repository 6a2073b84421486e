"""Block-wise (sequential) exact calibration: a cache of block inputs instead of the whole model in flight.

Most large models are a list of blocks (``model.model.layers`` of HF Llama, ``transformer.h`` of GPT-2). As GPTQ
and llm-compressor's sequential pipeline do for quantization, this driver calibrates them one after another,
with the thresholds of lockstep calibration bit for bit (see ``docs/calibration.md``):

1. **Capture** (:mod:`~pl_actsparse.calibrate.blocks`): with every block stubbed, one cheap pass caches each
   batch's input to block 0 and every block's other arguments (:mod:`~pl_actsparse.calibrate.cache`); targeted
   layers before block 0 are calibrated on the way, in lockstep.
2. **Blocks, in order**: level by level with one batch in flight (:mod:`~pl_actsparse.calibrate.levels`), or in
   lockstep when a block cannot be leveled; each batch's output then replaces its cache entry.
3. **Tail**: layers after the last block (``lm_head``) in a lockstep pass whose blocks return the cached final
   hidden states.

:func:`sequential_input_gradients` runs the backward pass of ``allocation="auto"`` on the same cache. A model
that does not fit the scheme (no block list, blocks not chained output-to-input, a targeted layer between two
blocks, NNCF's non-reentrant forward) is calibrated in lockstep, with a logged warning saying why.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from pl_actsparse.calibrate.blocks import BlockRunner, ModelRunner, StubMode, Stubs, find_block_list, hidden_out, probe
from pl_actsparse.calibrate.cache import BoundaryCache
from pl_actsparse.calibrate.distributed import Distributed
from pl_actsparse.calibrate.histogram import LayerStatistics
from pl_actsparse.calibrate.levels import BlockPlan, Unleveled, calibrate_block, plan_block
from pl_actsparse.calibrate.lockstep import calibrate_layers
from pl_actsparse.calibrate.progress import Progress
from pl_actsparse.calibrate.running import (
    call_model, default_transform_fn, forward_is_not_reentrant, hooks_removed, mask_of, model_device, take_batches, to_device
)
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.core.masking import resolve_mask_fn
from pl_actsparse.core.module_state import preserved_modes
from pl_actsparse.errors import NonFiniteActivationError

__all__ = ["calibrate_sequential", "input_gradients", "sequential_input_gradients"]

log = logging.getLogger(__name__)

Layers = Sequence[tuple[str, nn.Module]]


class _Fallback(Exception):
    """The model does not fit the block-wise scheme; the message says why."""


def calibrate_sequential(model: nn.Module, layers: Layers, items: Iterable[Any], config: CalibrationConfig = CalibrationConfig(),
                         *, blocks: str | None = None, offload_dir: str | None = None) -> dict[str, LayerStatistics]:
    """Block-wise exact calibration of ``layers`` (already sparsified modules of ``model``) on ``items``.

    Same contract and same thresholds as :func:`~pl_actsparse.calibrate.lockstep.calibrate_layers` (bit for bit),
    with the memory of the boundary cache plus one batch's activations inside one block (module docstring).
    Of ``config`` this also reads ``offload`` (where the cache lives; ``"disk"``: files under ``offload_dir``,
    default the system's temporary directory, deleted at the end) and ``in_block`` (``"levels"``: one batch in
    flight inside a block; ``"lockstep"``: every batch through the block at once). A block that cannot be
    leveled (a layer called twice or not at all, e.g. mixture-of-experts) is calibrated in lockstep, with a
    logged message saying why. ``blocks`` names the ``nn.ModuleList`` of blocks (default: :func:`find_block_list`).
    A model that does not fit the scheme (module docstring) is calibrated by ``calibrate_layers``, with a warning.

    Raises:
        InvalidOptionError: ``blocks`` names no ``nn.ModuleList`` of the model.
        EmptyDatasetError, LayerNotCalledError, NonFiniteActivationError: as ``calibrate_layers``.
    """
    transform = config.transform_fn or default_transform_fn
    dist = Distributed(config.sync_across_processes, model_device(model))
    batches = take_batches(items, config.num_batches, dist)
    scheme = _scheme(model, layers, len(batches), config, blocks, offload_dir)
    if isinstance(scheme, str):
        return _fallback(model, layers, batches, config, scheme)
    block_list, by_block, outside, cache, stubs = scheme
    mask_fn = resolve_mask_fn(config.token_mask)
    masks = [mask_of(mask_fn, b) for b in batches]
    inner = config.replace(num_batches=None, transform_fn=None, token_mask=None, progress=False)
    stats: dict[str, LayerStatistics] = {}
    plans: dict[tuple, BlockPlan | str] = {}
    try:
        with preserved_modes(model), Progress("calibrating block by block", len(block_list) + 2, config.progress and dist.is_main) as bar:
            model.eval()
            post = _capture(model, stubs, batches, transform, masks, outside, dist, inner, stats)
            where = {None: "with the model", "cpu": "in CPU memory", "disk": "on disk"}[config.offload]
            bar.advance(f"captured the inputs of {len(block_list)} blocks "
                        f"({cache.hidden_nbytes() / 2**20:.1f} MiB of hidden states, {where})")
            for j, block in enumerate(block_list):
                stats.update(_block(block, j, by_block[j], cache, masks, dist, inner, plans))
                bar.advance(f"block {j + 1}/{len(block_list)}")
            if post:
                stats.update(_tail(model, stubs, batches, transform, masks, post, inner))
            bar.advance("after the blocks")
    except _Fallback as exc:  # the modes are back: lockstep calibration from the model as it was given
        with preserved_modes(model):
            return _fallback(model, layers, batches, config, str(exc))
    finally:
        cache.close()
    return {n: stats[n] for n, _ in layers}


def _fallback(model: nn.Module, layers: Layers, batches: list, config: CalibrationConfig, reason: str) -> dict[str, LayerStatistics]:
    log.warning("sequential calibration is not possible here, calibrating in lockstep instead: %s", reason)
    return calibrate_layers(model, layers, batches, config)


def _scheme(model: nn.Module, layers: Layers, n: int, config: CalibrationConfig, blocks: str | None,
            offload_dir: str | None) -> tuple | str:
    """The blocks, the layers per block and outside them, the cache of ``n`` batches and the stubs; or why not."""
    list_name, why = find_block_list(model, [n for n, _ in layers], blocks)
    if list_name is None or forward_is_not_reentrant(model):
        return why if list_name is None else "the model keeps per-forward global state (NNCF's function hooks)"
    block_list = list(model.get_submodule(list_name))
    cache = BoundaryCache(n, model_device(model), config.offload, offload_dir)
    return (block_list, *_split(block_list, list_name, layers), cache, Stubs(block_list, cache))


def _split(block_list: list, list_name: str, layers: Layers) -> tuple[list[list], list]:
    """The targeted layers per block, and those outside every block."""
    prefix = f"{list_name}." if list_name else ""
    by_block: list[list[tuple[str, nn.Module]]] = [[] for _ in block_list]
    outside: list[tuple[str, nn.Module]] = []
    block_of = {id(m): j for j, b in enumerate(block_list) for m in b.modules()}
    for name, m in layers:
        j = block_of.get(id(m))
        (outside if j is None or not name.startswith(prefix) else by_block[j]).append((name, m))
    return by_block, outside


def _capture(model: nn.Module, stubs: Stubs, batches: list, transform: Callable, masks: list, outside: Layers,
             dist: Distributed, config: CalibrationConfig, stats: dict | None) -> Layers:
    """Fill the cache with every batch's block inputs, calibrating the targeted layers before block 0 on the
    way (into ``stats``; ``None``: there must be none); returns the targeted layers after the blocks."""
    with stubs:
        pre, failure = probe(model, stubs, batches, transform, outside, dist)
        pre_layers = [(n, m) for n, m in outside if n in pre]
        if failure or (pre_layers and stats is None):
            raise _Fallback(failure or f"targeted layers run before the first block: {[n for n, _ in pre_layers]}")
        stubs.mode = StubMode.CAPTURE
        runner = ModelRunner(model, stubs, batches, transform, masks)
        if pre_layers:
            stats.update(_lockstep(runner, pre_layers, len(batches), config))
        else:
            with torch.no_grad():
                for i in range(len(batches)):
                    runner(i)
    if dist.any(runner.failure is not None):
        raise _Fallback(runner.failure or "another rank's model does not fit the block-wise scheme")
    return [(n, m) for n, m in outside if n not in pre]


def _block(block: nn.Module, j: int, layers: Layers, cache: BoundaryCache, masks: list, dist: Distributed,
           config: CalibrationConfig, plans: dict) -> dict[str, LayerStatistics]:
    """Calibrate block ``j``'s layers (level by level, else in lockstep); its outputs become the cached inputs."""
    runner = BlockRunner(block, j, cache, masks)
    if not layers:
        with torch.no_grad():
            for i in range(len(masks)):
                runner(i)
                runner.commit()
        return {}
    got = None if config.in_block == "lockstep" else _leveled(block, j, layers, cache, masks, dist, plans)
    if got is None:
        got = _lockstep(runner, layers, len(masks), config)
        runner.commit()
    return got


def _tail(model: nn.Module, stubs: Stubs, batches: list, transform: Callable, masks: list, post: Layers,
          config: CalibrationConfig) -> dict[str, LayerStatistics]:
    """Calibrate the layers after the blocks by a lockstep pass in which the blocks return the cached outputs."""
    stubs.mode = StubMode.TAIL
    tail = ModelRunner(model, stubs, batches, transform, masks, post=[m for _, m in post])
    for _, m in post:
        m._actsparse.observers[id(tail)] = tail.observer
    try:
        with stubs:
            return _lockstep(tail, post, len(batches), config)
    finally:
        for _, m in post:
            m._actsparse.observers.pop(id(tail), None)


def _leveled(block: nn.Module, j: int, layers: Layers, cache: BoundaryCache, masks: list, dist: Distributed,
             plans: dict) -> dict[str, LayerStatistics] | None:
    """Calibrate block ``j`` level by level (:mod:`pl_actsparse.calibrate.levels`); ``None`` when it cannot be.

    The plan comes from this rank's first batch, once per block structure, and must be the same on every rank
    (a rank that cannot plan, or has no batch, sends every rank to lockstep for the block)."""
    local = {id(m): n for n, m in block.named_modules()}
    sig = (type(block),) + tuple((local[id(m)], type(m)) for _, m in layers)
    if sig not in plans:
        got = plan_block(block, [m for _, m in layers], *cache.call(0, j, cache.hidden(0))) if masks else "this rank has no calibration batch"
        code = zlib.crc32(repr(got).encode()) if isinstance(got, BlockPlan) else -1
        if dist.min_int(code) != -dist.min_int(-code):
            got = got if isinstance(got, str) else "another rank found other dependency levels, or none"
        plans[sig] = got
    plan = plans[sig]
    if isinstance(plan, str):
        log.info("block %d is calibrated with all batches in flight (lockstep): %s", j, plan)
        return None
    got = calibrate_block(block, plan, layers, j, cache, masks, dist)
    if isinstance(got, Unleveled) and got.spoiled:
        raise _Fallback(f"block {j}: {got.reason}")
    if isinstance(got, Unleveled):
        log.warning("block %d is calibrated with all batches in flight (lockstep) instead of level by level: %s", j, got.reason)
        return None
    return got


def _lockstep(runner: nn.Module, layers: Layers, count: int, config: CalibrationConfig) -> dict[str, LayerStatistics]:
    """``calibrate_layers`` on a runner over batch indices ``0..count-1``; statistics under the layers' full names."""
    local = {id(m): n for n, m in runner.named_modules()}
    full = {local[id(m)]: n for n, m in layers}
    got = calibrate_layers(runner, [(local[id(m)], m) for _, m in layers], list(range(count)), config)
    return {full[k]: dataclasses.replace(st, name=full[k]) for k, st in got.items()}


def input_gradients(layers: Layers, run: Callable[[], tuple]) -> tuple[list, tuple]:
    """``run() -> (output, its gradient or None for a scalar loss, tensors wrt)`` with autograd on; returns
    ``[(name, input, d output / d input or None)]`` for every call of the ``layers`` (each call its own node: q/k/v
    reading one tensor get their own shares) and the gradients of ``wrt``. Parameters' ``.grad`` stay untouched."""
    captured: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def capture(args: tuple, name: str) -> tuple:
        own = args[0].clone() if args[0].requires_grad else args[0].detach().clone().requires_grad_()
        captured.append((name, args[0].detach(), own))
        return (own, *args[1:])

    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: capture(a, n)) for n, m in layers]
    with hooks_removed(handles), torch.enable_grad():
        out, grad, wrt = run()
        grads = torch.autograd.grad(out, [*wrt, *(c[2] for c in captured)], grad, allow_unused=True) if captured or wrt else ()
    return [(n, x, g) for (n, x, _), g in zip(captured, grads[len(wrt):])], tuple(grads[: len(wrt)])


def sequential_input_gradients(model: nn.Module, layers: Layers, batches: list, loss_fn: Callable,
                               config: CalibrationConfig, visit: Callable[[list, Any], None]) -> bool:
    """Block-wise twin of one forward and backward of ``model`` per batch: calls ``visit(gradients, token mask)``
    with :func:`input_gradients` of the ``layers`` after the blocks (loss ``loss_fn(output, inputs, item, mask)[0]`` at
    the head, the blocks returning the cached last hidden states), then of each block's layers from the last block
    to the first, each recomputed from its cached input with autograd on and given its output's gradient.

    Memory above the model's: the boundary cache (``config.offload``), one batch's block inputs and one block's
    autograd activations. Returns ``False``, having visited nothing and logged a warning, when the model does not
    fit the block-wise scheme (:func:`calibrate_sequential`) or a targeted layer runs before the first block.

    Raises:
        NonFiniteActivationError: the gradient at the last block is not finite (also the sign of a head that
            reads an earlier block's output).
    """
    transform, device = config.transform_fn or default_transform_fn, model_device(model)
    scheme = _scheme(model, layers, len(batches), config, None, None)
    if isinstance(scheme, str):
        log.warning("block-wise gradients are not possible here, running the whole model: %s", scheme)
        return False
    block_list, by_block, outside, cache, stubs = scheme
    try:
        post = _capture(model, stubs, batches, transform, [None] * len(batches), outside,
                        Distributed(config.sync_across_processes, device), config, None)
        for i, item in enumerate(batches):
            mask, inputs = mask_of(resolve_mask_fn(config.token_mask), item), []
            with torch.no_grad():
                for j, block in enumerate(block_list):
                    h = cache.hidden(i)
                    inputs.append(cache.keep(i, "input", h))
                    args, kwargs = cache.call(i, j, h)
                    cache.set_hidden(i, hidden_out(block(*args, **kwargs)))
            x_in = to_device(transform(item), device)
            with stubs:
                stubs.mode = StubMode.TAIL
                stubs.start(i)
                got, (g,) = input_gradients(post, lambda: (loss_fn(call_model(model, x_in), x_in, item, mask)[0], None, [stubs.state.final]))
            if g is None or not bool(torch.isfinite(g).all()):
                raise NonFiniteActivationError("the gradient of the last block's output is not finite (or none): a non-finite loss, or "
                                               "a head that reads an earlier block's output too (not a chain): use calibration='lockstep'")
            visit(got, mask)
            for j in reversed(range(len(block_list))):
                x = cache.load(inputs[j]).requires_grad_()
                args, kwargs = cache.call(i, j, x)
                run = lambda b=block_list[j], a=args, k=kwargs, x=x, g=g: (hidden_out(b(*a, **k)), g, [x])  # noqa: E731
                got, (g,) = input_gradients(by_block[j], run)
                visit(got, mask)
                g = torch.zeros_like(x) if g is None else g
                cache.drop(inputs[j])
    except _Fallback as exc:
        log.warning("block-wise gradients are not possible here, running the whole model: %s", exc)
        return False
    finally:
        cache.close()
    return True
