"""The dense path of exported layers and the sparse/dense token crossover, measured per machine.

An exported layer keeps one copy of its weight, ``W^T`` (``[in, out]``, the sparse kernel's layout). Calls
with few tokens (decoding) go to the sparse kernel; calls with more (prefill, batched scoring) go to a dense
GEMM on that same ``W^T``. Which GEMM is fastest, and up to how many tokens the sparse kernel wins, depend on
the CPU and the dtype: on an AVX2 CPU without native bf16, a bf16 GEMM on ``W^T`` runs a slow fallback and
converting ``W^T`` to fp32 a block of rows at a time is several times faster; on a CPU with AVX512_BF16/AMX
the native bf16 GEMM is fastest and the conversion makes prefill 2-4x slower. So both are measured:

* :func:`dense_method` (per dtype): ``"linear"`` (``F.linear(x, W^T.T)``), ``"matmul"`` (``x @ W^T``) or
  ``"fp32_blocks"`` (``W^T`` converted to fp32 8 MiB at a time, then ``addmm``); none keeps a second copy of
  the weight. fp32/fp64 always use ``"linear"``. An exported layer's shape gets its own, measured with its
  crossover (below): oneDNN's bf16 GEMM on ``W^T`` is not equally fast for every shape and method.
* opt-in (``export_for_inference(..., prefill="prepacked")``): :func:`prepack_race` races the shape's method
  against oneDNN on a prepacked second copy (:func:`prepack_weight`, :func:`packed_linear`).
* :func:`sparse_token_crossover` (per dtype and CPU backend): the largest token count (of 1, 2, 4, ... 64)
  up to which the sparse kernel was at least as fast as the chosen dense GEMM, at s = 0.5 with independent
  masks per token (a conservative case: the union of the rows grows fastest).

Each is measured once per machine on first use (about a second; ``export_for_inference`` and
``pl-actsparse build-kernels`` trigger it ahead of decoding), kept in memory and cached in
``<extension cache>/pl_actsparse_cpu_profile.json`` under a key of the CPU model, its ISA flags (from
``/proc/cpuinfo``), the torch version and the thread count. Overrides: ``PL_ACTSPARSE_MAX_SPARSE_TOKENS``
(an integer for every layer, or ``table`` for :data:`~pl_actsparse.kernels.cpu.DEFAULT_MAX_SPARSE_TOKENS`
without measuring), ``PL_ACTSPARSE_DENSE_METHOD`` (one of :data:`DENSE_METHODS`), and per layer the
``max_sparse_tokens`` of an exported layer. The answers are memoized per dtype (a forward call pays a few
dictionary reads); the environment is read when a dtype is first needed, so after changing it in a running
process call :func:`clear_profile_memo`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import pl_actsparse.kernels.cpu as _cpu
from pl_actsparse.kernels._extension import extension_root
from pl_actsparse.kernels.cpu import zero_small
from pl_actsparse.kernels.sparse_op import blocked_fp32_linear

__all__ = [
    "DENSE_METHODS", "CpuProfile", "clear_profile_memo", "cpu_isa_flags", "cpu_profile", "dense_linear_t",
    "dense_method", "machine_key", "measure_cpu_profile", "packed_linear", "prepack_race", "prepack_unavailable",
    "prepack_weight", "sparse_token_crossover",
]

log = logging.getLogger(__name__)

DENSE_METHODS = ("linear", "matmul", "fp32_blocks")
ENV_MAX_SPARSE_TOKENS = "PL_ACTSPARSE_MAX_SPARSE_TOKENS"
ENV_DENSE_METHOD = "PL_ACTSPARSE_DENSE_METHOD"
PROFILE_FILE = "pl_actsparse_cpu_profile.json"
TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64)
_FLOAT_DTYPES = (torch.float32, torch.float64)
_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model or platform.machine(), frozenset(flags)


def cpu_isa_flags() -> dict[str, bool]:
    """The CPU's ISA features that matter for these GEMMs: ``avx2``, ``avx512f``, ``avx512_bf16``, ``amx_bf16``...

    Read from ``/proc/cpuinfo`` (Linux); elsewhere only ``torch.backends.cpu.get_cpu_capability()`` is known
    (``avx2``/``avx512f`` derived from it). Also holds ``torch_capability`` (the string).
    """
    _, flags = _cpuinfo()
    out: dict = {name: name in flags for name in _ISA_FLAGS}
    cap = torch.backends.cpu.get_cpu_capability()
    if not flags:
        out["avx2"] = cap in ("AVX2", "AVX512")
        out["avx512f"] = cap == "AVX512"
    out["torch_capability"] = cap
    return out


def machine_key() -> str:
    """16 hex digits naming this machine for the profile cache: CPU model, ISA flags, torch version, threads."""
    model, _ = _cpuinfo()
    flags = cpu_isa_flags()
    raw = json.dumps([model, sorted(k for k, v in flags.items() if v is True), flags["torch_capability"],
                      torch.__version__, torch.get_num_threads()])
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# The dense path
# --------------------------------------------------------------------------------------------------


def _fp32_blocks(x: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    return blocked_fp32_linear(x, *weight_t.shape, bias, lambda i0, i1: weight_t[i0:i1].float())


def _matmul(x: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    y = torch.matmul(x, weight_t)
    return y + bias if bias is not None else y


def _linear(x: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.linear(x, weight_t.t(), bias)


_DENSE_FNS: dict[str, Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]] = {
    "linear": _linear,
    "matmul": _matmul,
    "fp32_blocks": _fp32_blocks,
}


def dense_linear_t(x: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight_t.T, bias)`` with the GEMM measured fastest for ``x.dtype`` on this CPU.

    ``x`` is ``[..., in]``, ``weight_t`` ``[in, out]`` of ``x``'s dtype; returns ``x``'s dtype. No second copy
    of the weight is kept (``"fp32_blocks"`` converts 8 MiB of it at a time). Non-CPU tensors and fp32/fp64
    use ``F.linear`` directly.
    """
    if x.device.type != "cpu" or x.dtype in _FLOAT_DTYPES or x.dtype != weight_t.dtype:
        return _linear(x, weight_t, bias)
    cached = _shape_method.get((x.dtype, tuple(weight_t.shape)))  # measured on this shape (sparse_token_crossover)
    method = cached[1] if cached is not None and cached[0] == _state() else dense_method(x.dtype)
    return _DENSE_FNS[method](x, weight_t, bias)


# --------------------------------------------------------------------------------------------------
# The opt-in prefill copy: W^T prepacked for the GEMM library (what inductor's freezing does)
# --------------------------------------------------------------------------------------------------

#: Batch-size hint of the packers and token count of :func:`prepack_race` (a prompt's length; any count works).
PREPACK_TOKENS = 128


def prepack_unavailable(dtype: torch.dtype, device: torch.device | str = "cpu") -> Optional[str]:
    """Why a weight of ``dtype`` on ``device`` cannot be prepacked here (a sentence), or ``None`` if it can."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"oneDNN packs float32/bfloat16/float16 CPU weights, got {dtype} on {device}"
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN (mkldnn)"
    supported = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported, torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}
    return None if supported.get(dtype, lambda: True)() else f"oneDNN has no {dtype} GEMM on this CPU"


def prepack_weight(weight_t: Tensor) -> Tensor:
    """A copy of ``weight_t`` (``[in, out]``, CPU, fp32/bf16/fp16) in oneDNN's blocked layout for
    :func:`packed_linear` (``torch.ops.mkldnn._reorder_linear_weight``, as inductor's ``freezing`` packs
    ``nn.Linear`` weights): an opaque tensor of the weight's bytes that cannot be saved, copied or moved. Raises
    ``RuntimeError`` where :func:`prepack_unavailable` gives a reason."""
    reason = prepack_unavailable(weight_t.dtype, weight_t.device)
    if reason is not None:
        raise RuntimeError(f"prepack_weight: {reason}")
    return torch.ops.mkldnn._reorder_linear_weight(weight_t.detach().t(), PREPACK_TOKENS)


def packed_linear(x: Tensor, packed: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight_t.T, bias)`` through ``packed = prepack_weight(weight_t)``; ``x`` is ``[..., in]`` of the
    weight's dtype (any token count). Not differentiable."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_prepack_races: dict[tuple, dict] = {}


def prepack_race(weight_t: Tensor, rounds: int = 5, timer: Callable[[], float] = time.perf_counter) -> dict:
    """Whether a prepacked copy of ``weight_t`` (``[in, out]``) beats the shared :func:`dense_linear_t` here:
    best of ``rounds`` interleaved calls each at :data:`PREPACK_TOKENS` tokens (a loss is confirmed with
    ``2 * rounds`` more), raced once per shape, dtype and thread count (kept in memory). Returns ``{"shared_ms", "prepacked_ms", "prepacked": bool}``."""
    key = (weight_t.dtype, tuple(weight_t.shape), _state())
    if key not in _prepack_races:
        packed = prepack_weight(weight_t)
        sparse_token_crossover(weight_t.dtype, weight_t=weight_t)  # picks the shape's shared method first
        x = torch.randn(PREPACK_TOKENS, weight_t.shape[0], generator=torch.Generator().manual_seed(0)).to(weight_t.dtype)
        fns = (lambda: dense_linear_t(x, weight_t), lambda: packed_linear(x, packed))
        shared, pre = _race(*fns, rounds, timer, confirm=lambda s, p: p >= s)
        _prepack_races[key] = {"shared_ms": shared * 1e3, "prepacked_ms": pre * 1e3, "prepacked": pre < shared}
        log.info("pl_actsparse: prefill race %s %s: %s", tuple(weight_t.shape), weight_t.dtype, _prepack_races[key])
    return dict(_prepack_races[key])


# --------------------------------------------------------------------------------------------------
# The profile: measurement, memory and file cache
# --------------------------------------------------------------------------------------------------


@dataclass
class CpuProfile:
    """What was measured (or overridden) for one dtype and CPU backend on this machine.

    ``dense_method`` (one of :data:`DENSE_METHODS`), ``max_sparse_tokens`` (the crossover; 0 = always dense),
    ``source`` (``"measured"``, ``"cache"``, ``"override"`` or ``"table"``), ``dense_ms`` (ms per call of
    each dense method at ``dense_tokens`` tokens on a ``dense_shape`` = ``(in, out)`` weight), ``sparse_ms`` and
    ``dense_by_tokens_ms`` (ms per call by token count on a ``shape`` weight at s = 0.5), ``other_load``
    (CPU cores other processes used while measuring; a busy machine makes the figures noisy).
    """

    dtype: str
    backend: str
    dense_method: str
    max_sparse_tokens: int
    source: str
    dense_ms: dict = field(default_factory=dict)
    sparse_ms: dict = field(default_factory=dict)
    dense_by_tokens_ms: dict = field(default_factory=dict)
    shape: tuple = ()
    dense_shape: tuple = ()
    dense_tokens: int = 0
    other_load: Optional[float] = None

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


_lock = threading.RLock()
_profiles: dict[tuple[str, str, str], CpuProfile] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _profile_path() -> str:
    return os.path.join(extension_root(), PROFILE_FILE)


def _read_cache() -> dict:
    try:
        with open(_profile_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("pl_actsparse: ignoring the unreadable CPU profile cache %s (%s)", _profile_path(), exc)
        return {}


def _write_cache(key: str, profile: CpuProfile) -> None:
    path = _profile_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_cache()
        entry = data.setdefault(key, {"isa": cpu_isa_flags(), "cpu": _cpuinfo()[0], "torch": torch.__version__,
                                      "threads": torch.get_num_threads(), "profiles": {}})
        entry["profiles"][f"{profile.backend}/{profile.dtype}"] = profile.to_dict()
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache: keep the measurement in memory only
        log.warning("pl_actsparse: could not write the CPU profile cache %s (%s)", path, exc)


def _time(fn: Callable[[], object], rounds: int, timer: Callable[[], float], give_up: float = math.inf) -> float:
    fn()  # warm-up (allocations, first-touch, dispatch caches)
    best = math.inf
    for _ in range(rounds):
        t0 = timer()
        fn()
        best = min(best, timer() - t0)
        if best > give_up:  # hopeless candidate: don't spend more time on it
            break
    return best


def _race(a: Callable[[], object], b: Callable[[], object], rounds: int, timer: Callable[[], float],
          confirm: Optional[Callable[[float, float], bool]] = None) -> tuple[float, float]:
    """Best times of ``a`` and ``b`` over ``rounds`` interleaved rounds (alternating order), after a warm-up; where
    ``confirm(time_a, time_b)`` (a loss), best of ``2 * rounds`` more too: a busy window must not decide alone."""
    a()
    b()
    best = [math.inf, math.inf]
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            t0 = timer()
            (a, b)[i]()
            best[i] = min(best[i], timer() - t0)
    if confirm is not None and confirm(*best):
        best = [min(t, u) for t, u in zip(best, _race(a, b, 2 * rounds, timer))]
    return best[0], best[1]


def _busy_ticks() -> tuple[int, int]:
    # (busy ticks of the whole machine, ticks of this process); (0, 0) where /proc is missing
    try:
        with open("/proc/stat") as f:
            v = list(map(int, f.readline().split()[1:]))
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0, 0


def measure_cpu_profile(
    dtype: torch.dtype,
    backend: str,
    *,
    shape: tuple[int, int] = (1024, 2048),
    dense_shape: tuple[int, int] = (512, 1024),
    dense_tokens: int = 64,
    token_counts: tuple[int, ...] = TOKEN_COUNTS,
    sparsity: float = 0.5,
    rounds: int = 5,
    timer: Callable[[], float] = time.perf_counter,
    weight_t: Optional[Tensor] = None,
    method: Optional[str] = None,
) -> CpuProfile:
    """Measure the dense method and the sparse/dense crossover for ``dtype`` and ``backend`` (``"cpp"``/``"torch"``).

    Best of ``rounds`` timed calls (after one warm-up) per candidate. The sparse kernel and the layer's dense
    path (masking + the chosen GEMM) run interleaved at each of ``token_counts`` in turn; the first count where
    the sparse kernel loses is measured again with twice the rounds to confirm, and ends the search. One token
    always counts as sparse (the kernel's purpose; small layers are kept dense by
    :data:`~pl_actsparse.kernels.cpu.MIN_SPARSE_WEIGHT_BYTES`), so a noisy first measurement cannot switch
    decoding off. ``other_load`` records how busy the rest of the machine was (cores used by other processes).
    Nothing is cached here (see :func:`cpu_profile`). ``weight_t`` (``[in, out]`` of ``dtype``) measures the
    crossover on that weight itself (its shape replaces ``shape``; nothing is copied) and ``method`` skips the
    dense-method measurement. Raises ``ValueError`` for an unknown ``backend`` and ``RuntimeError`` for
    ``"cpp"`` when the C++ kernel is not loaded.
    """
    if backend not in ("cpp", "torch"):
        raise ValueError(f"backend must be 'cpp' or 'torch', got {backend!r}")
    if backend == "cpp" and not _cpu.load_extension(build=False):
        raise RuntimeError(f"measure_cpu_profile: the C++ kernel is not loaded ({_cpu.extension_status().error})")
    gen = torch.Generator().manual_seed(0)
    busy0, own0, wall0 = *_busy_ticks(), time.monotonic()
    # 1. the dense method (irrelevant for fp32/fp64: F.linear)
    dense_ms: dict[str, float] = {}
    if dtype in _FLOAT_DTYPES:
        method = "linear"
    elif method is None:  # on weight_t itself where given
        wt = weight_t.detach().contiguous() if weight_t is not None else torch.randn(dense_shape, generator=gen).to(dtype)
        dense_shape = tuple(wt.shape)
        x = torch.randn(dense_tokens, dense_shape[0], generator=gen).to(dtype)
        best = math.inf
        for name in ("fp32_blocks", "linear", "matmul"):  # the robust one first: it bounds the others
            fn = _DENSE_FNS[name]
            t = _time(lambda: fn(x, wt, None), rounds, timer, give_up=3 * best)
            dense_ms[name] = t * 1e3
            best = min(best, t)
        method = min(dense_ms, key=dense_ms.get)
    # 2. the crossover
    if weight_t is not None:
        shape, wt = tuple(weight_t.shape), weight_t.detach().contiguous()
    else:
        wt = torch.randn(shape, generator=gen).to(dtype)
    in_f, out_f = shape
    dense_fn = _DENSE_FNS[method]
    sparse_ms: dict[int, float] = {}
    dense_by_tokens: dict[int, float] = {}
    crossover = 0
    for ntok in token_counts:
        x = torch.randn(ntok, in_f, generator=gen).to(dtype)
        thr = torch.tensor(float(x.float().abs().quantile(sparsity)))
        t_eff = _cpu.effective_threshold(thr, dtype)
        sparse = ((lambda: torch.ops.pl_actsparse_ext.sparse_gemv(x, thr, wt, None, 0)) if backend == "cpp"
                  else lambda: _cpu._sparse_linear_torch(x, t_eff, wt, None))
        dense = lambda: dense_fn(zero_small(x, thr), wt, None)  # noqa: E731  the layer's dense path, masking included
        ts, td = _race(sparse, dense, rounds, timer, confirm=lambda s, d: s > d)  # a loss ends the search
        sparse_ms[ntok], dense_by_tokens[ntok] = ts * 1e3, td * 1e3
        if ts > td:
            break
        crossover = ntok
    crossover = max(crossover, 1)
    busy1, own1 = _busy_ticks()
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    other_load = max(0.0, ((busy1 - busy0) - (own1 - own0)) / hz / max(time.monotonic() - wall0, 1e-6))
    return CpuProfile(
        dtype=_dtype_name(dtype), backend=backend, dense_method=method, max_sparse_tokens=crossover,
        source="measured", dense_ms=dense_ms, sparse_ms=sparse_ms, dense_by_tokens_ms=dense_by_tokens,
        shape=tuple(shape), dense_shape=tuple(dense_shape), dense_tokens=dense_tokens,
        other_load=round(other_load, 2) if busy1 else None,
    )


def _table_profile(dtype: torch.dtype, backend: str, source: str) -> CpuProfile:
    table = _cpu.DEFAULT_MAX_SPARSE_TOKENS
    limit = table.get((backend, dtype), table.get((backend, None), 1))
    method = "linear" if dtype in _FLOAT_DTYPES else "fp32_blocks"
    return CpuProfile(dtype=_dtype_name(dtype), backend=backend, dense_method=method, max_sparse_tokens=limit,
                      source=source)


def _env_overrides() -> tuple[Optional[str], Optional[str]]:
    tokens = os.environ.get(ENV_MAX_SPARSE_TOKENS, "").strip().lower() or None
    if tokens is not None and tokens != "table" and not (tokens.isdigit()):
        raise ValueError(f"{ENV_MAX_SPARSE_TOKENS} must be an integer >= 0 or 'table', got {tokens!r}")
    method = os.environ.get(ENV_DENSE_METHOD, "").strip().lower() or None
    if method is not None and method not in DENSE_METHODS:
        raise ValueError(f"{ENV_DENSE_METHOD} must be one of {DENSE_METHODS}, got {method!r}")
    return tokens, method


def cpu_profile(dtype: torch.dtype, backend: Optional[str] = None, *, refresh: bool = False) -> CpuProfile:
    """The :class:`CpuProfile` for ``dtype`` and ``backend`` on this machine: from memory, the cache file, or
    measured now (about a second, once per machine) and cached. ``refresh=True`` measures again.

    ``backend=None`` is the backend the kernels use now (without building). Environment overrides (see the
    module docstring) apply on top; an unbuilt C++ kernel falls back to the measured-on-AVX2 table until it is
    loaded. Raises ``ValueError`` for malformed overrides.
    """
    if backend is None:
        backend = _cpu.resolve_backend(build=False)
    tokens_env, method_env = _env_overrides()
    fully_overridden = tokens_env is not None and tokens_env.isdigit() and (method_env or dtype in _FLOAT_DTYPES)
    if tokens_env == "table" or fully_overridden or (backend == "cpp" and not _cpu.load_extension(build=False)):
        profile = _table_profile(dtype, backend, "table")  # nothing to measure
    else:
        key = machine_key()
        mem_key = (key, _dtype_name(dtype), backend)
        with _lock:
            profile = None if refresh else _profiles.get(mem_key)
            if profile is None and not refresh:
                cached = _read_cache().get(key, {}).get("profiles", {}).get(f"{backend}/{_dtype_name(dtype)}")
                try:  # an entry that is no dict, has other fields or an unknown method is measured again
                    profile = CpuProfile(**{**cached, "source": "cache"})
                    profile = profile if profile.dense_method in DENSE_METHODS else None
                except TypeError:
                    profile = None
            if profile is None:
                profile = measure_cpu_profile(dtype, backend)
                log.info("pl_actsparse: measured the CPU crossover for %s/%s: dense=%s, sparse up to %d tokens",
                         backend, profile.dtype, profile.dense_method, profile.max_sparse_tokens)
                _write_cache(key, profile)
            _profiles[mem_key] = profile
    if tokens_env is not None and tokens_env != "table" or method_env is not None:
        profile = CpuProfile(**{**profile.to_dict(), "source": "override"})
        if tokens_env is not None and tokens_env != "table":
            profile.max_sparse_tokens = int(tokens_env)
        if method_env is not None and dtype not in _FLOAT_DTYPES:
            profile.dense_method = method_env
    return profile


def _state() -> tuple:
    # What the memoized answers depend on besides dtype/backend, cheap enough for every forward call (reading
    # os.environ is not: ~1-8 us per variable). Environment overrides are read when an answer is memoized;
    # clear_profile_memo() makes a running process read them again.
    return (torch.get_num_threads(), _cpu.EXTENSION.loaded)


_crossover_cache: dict[tuple, tuple[tuple, int]] = {}
_method_cache: dict[torch.dtype, tuple[tuple, str]] = {}
_shape_method: dict[tuple, tuple[tuple, str]] = {}


def sparse_token_crossover(dtype: torch.dtype, backend: Optional[str] = None, *, weight_t: Optional[Tensor] = None) -> int:
    """Largest token count for which the sparse kernel beats the dense path for ``dtype`` here.

    Without ``weight_t``: :func:`cpu_profile`'s figure for a reference shape (cached per machine). With
    ``weight_t`` (``[in, out]`` of ``dtype``): measured on that weight at first use for its shape, dtype,
    backend and thread count (:func:`measure_cpu_profile`, ~0.2 s for a 2048x5632 bf16 layer), kept in
    memory, with the dense method for that shape (which :func:`dense_linear_t` then uses). Environment overrides and an unloaded C++ kernel use :func:`cpu_profile`'s figure.
    Memoized: after the first call per key this is a few dictionary reads.
    """
    if backend is None:
        backend = _cpu.resolve_backend(build=False)
    state = _state()
    key = (dtype, backend) if weight_t is None else (dtype, backend, tuple(weight_t.shape))
    cached = _crossover_cache.get(key)
    if cached is not None and cached[0] == state:
        return cached[1]
    profile = cpu_profile(dtype, backend)
    value = profile.max_sparse_tokens
    if weight_t is not None and profile.source in ("measured", "cache") and weight_t.dtype == dtype:
        with _lock:
            measured = measure_cpu_profile(dtype, backend, weight_t=weight_t, method=_env_overrides()[1])
        value = measured.max_sparse_tokens
        _shape_method[(dtype, tuple(weight_t.shape))] = (state, measured.dense_method)
        log.info("pl_actsparse: %s %s: sparse kernel up to %d tokens, dense method %s", tuple(weight_t.shape), dtype,
                 value, measured.dense_method)
    _crossover_cache[key] = (state, value)
    return value


def clear_profile_memo() -> None:
    """Forget the profiles and answers held in memory (the cache file stays): the next call reads the
    environment overrides and the cache file again, or measures."""
    with _lock:
        _profiles.clear()
        _crossover_cache.clear()
        _method_cache.clear()
        _shape_method.clear()
        _prepack_races.clear()


def dense_method(dtype: torch.dtype) -> str:
    """The dense GEMM used for ``dtype`` (one of :data:`DENSE_METHODS`; ``"linear"`` for fp32/fp64)."""
    if dtype in _FLOAT_DTYPES:
        return "linear"
    state = _state()
    cached = _method_cache.get(dtype)
    if cached is not None and cached[0] == state:
        return cached[1]
    method = _env_overrides()[1]
    if method is None:  # the dense method does not depend on the sparse backend: reuse whichever profile exists
        method = cpu_profile(dtype, "cpp" if _cpu.EXTENSION.loaded else "torch").dense_method
    _method_cache[dtype] = (state, method)
    return method
