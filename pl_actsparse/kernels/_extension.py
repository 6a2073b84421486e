"""Building and loading the package's C++ kernels: one :class:`InlineExtension` per kernel, shared backend choice.

Each kernel is one source file under ``kernels/csrc/``. :class:`InlineExtension` compiles it with
:func:`torch.utils.cpp_extension.load_inline` (``is_python_module=False``: the library registers its ops with
``TORCH_LIBRARY``) into a cache directory and records a completed build with a stamp file. The guarantees:

* **Built at most once per environment.** The extension name, hence its directory, is keyed on the source,
  the compiler flags, the torch version, the Python ABI *and* the environment (a hash of ``sys.prefix``), so
  two virtual environments sharing one cache each keep their own build instead of rebuilding each other's
  (torch's ninja file embeds the environment's include paths, so a shared directory would rebuild on every
  switch).
* **Loaded without a compiler once built.** A directory with a complete build (the ``.so`` and its stamp) is
  loaded with :func:`torch.ops.load_library`: no compiler, no ninja, no torch build lock.
* **Never waits forever.** Builders take an exclusive lock (``fcntl.flock`` on ``<build dir>.lock``, released
  by the kernel when the holder dies, even by SIGKILL; a pid file where ``fcntl`` is missing) and wait for it
  at most :func:`build_timeout` seconds (``PL_ACTSPARSE_BUILD_TIMEOUT``, default 300). A stale torch lock
  left in the build directory by a killed build is removed once the lock is held. A wait that runs out is a
  failed build.
* **Never silent.** Any failure (no compiler, no ninja, compile error, lock timeout, load error) leaves
  :attr:`InlineExtension.error` set; with the ``"auto"`` backend the first call that falls back warns once
  (``RuntimeWarning``) with the cause and what the fallback costs.

Build ahead of time with ``pl-actsparse build-kernels`` (:func:`pl_actsparse.kernels.build_all`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import inspect
import json
import logging
import os
import platform
import shutil
import socket
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

__all__ = [
    "NOT_BUILT", "BuildLockTimeout", "ExtensionStatus", "InlineExtension", "KernelBackend", "build_timeout",
    "ensure_ninja_on_path", "environment_key", "extension_root", "get_backend", "set_backend",
]

log = logging.getLogger(__name__)

KernelBackend = Literal["auto", "cpp", "torch"]
BACKENDS = ("auto", "cpp", "torch")
ENV_BACKEND = "PL_ACTSPARSE_CPU_KERNEL"
ENV_EXT_DIR = "PL_ACTSPARSE_EXT_DIR"
ENV_BUILD_TIMEOUT = "PL_ACTSPARSE_BUILD_TIMEOUT"
DEFAULT_BUILD_TIMEOUT = 300.0

#: The one ``error`` of an extension that was looked for without building (``load(build=False)``) and is not
#: in the cache: a later ``load(build=True)`` builds it (any other error is final for the process).
NOT_BUILT = "not built yet"

_CSRC = Path(__file__).with_name("csrc")
_STAMP = "pl_actsparse_build.json"


# --------------------------------------------------------------------------------------------------
# Backend selection (shared by the float and the int8 kernel)
# --------------------------------------------------------------------------------------------------

_backend: Optional[str] = None


def set_backend(backend: Optional[KernelBackend]) -> None:
    """Choose the CPU kernels: ``"auto"``, ``"cpp"`` (error if they cannot be built) or ``"torch"``.

    ``None`` returns to the ``PL_ACTSPARSE_CPU_KERNEL`` environment variable (default ``"auto"``). The choice
    is read on every call, so it also applies inside ``torch.compile``-d models. Raises ``ValueError`` for
    any other value.
    """
    global _backend
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    _backend = backend


def get_backend() -> str:
    """The configured backend (``"auto"``, ``"cpp"`` or ``"torch"``), before resolution.

    Raises ``ValueError`` if ``PL_ACTSPARSE_CPU_KERNEL`` holds anything else.
    """
    if _backend is not None:
        return _backend
    env = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND} must be one of {BACKENDS}, got {env!r}")
    return env


# --------------------------------------------------------------------------------------------------
# Keys, directories, flags
# --------------------------------------------------------------------------------------------------


def environment_key() -> str:
    """8 hex digits identifying this Python environment (a hash of the resolved ``sys.prefix``)."""
    return hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:8]


def extension_root() -> str:
    """The cache folder of the builds: ``PL_ACTSPARSE_EXT_DIR``, else torch's extension directory."""
    root = os.environ.get(ENV_EXT_DIR)
    if root:
        return root
    from torch.utils.cpp_extension import get_default_build_root

    return get_default_build_root()


def build_timeout() -> float:
    """Seconds a build waits for another process's build of the same kernel (``PL_ACTSPARSE_BUILD_TIMEOUT``).

    Raises ``ValueError`` if the variable is not a non-negative number.
    """
    raw = os.environ.get(ENV_BUILD_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_BUILD_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{ENV_BUILD_TIMEOUT} must be a number of seconds >= 0, got {raw!r}")
    return value


@functools.lru_cache(maxsize=None)
def compiler_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(cflags, ldflags)`` of the builds (part of the cache key)."""
    cflags = ["-O3", "-std=c++17"]
    ldflags: list[str] = []
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        # Not -march=native: the build cache may be shared between machines.
        cflags += ["-mavx2", "-mfma", "-mf16c"]
    if "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        # at::parallel_for is inlined from the headers; without -fopenmp it would run on one thread.
        # The extension then links libgomp.so.1, which resolves to the copy torch has already loaded.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return tuple(cflags), tuple(ldflags)


def ensure_ninja_on_path() -> None:
    """Put the ``ninja`` of this Python environment on ``PATH`` if ``PATH`` has none.

    ``torch.utils.cpp_extension`` runs ``ninja`` from ``PATH``. The pip-installed one (the ``kernels``
    extra) lives next to the interpreter, which is not on ``PATH`` when a venv is used without activating it
    (``.venv/bin/pl-actsparse ...``).
    """
    if shutil.which("ninja") is not None:
        return
    for folder in (os.path.dirname(sys.executable), sysconfig.get_path("scripts")):
        if folder and shutil.which("ninja", path=folder) is not None:
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return


def compile_inline(name: str, source: str, build_dir: str) -> None:
    """Compile ``source`` into ``build_dir/name.so`` and load it; raises on any failure (no compiler, ...)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH)")
    ensure_ninja_on_path()
    from torch.utils import cpp_extension

    cflags, ldflags = compiler_flags()
    kwargs = {}
    if "no_implicit_headers" in inspect.signature(cpp_extension.load_inline).parameters:
        kwargs["no_implicit_headers"] = True  # skip <torch/extension.h> (pybind11): faster build
    cpp_extension.load_inline(
        name=name,
        cpp_sources=[source],
        extra_cflags=list(cflags),
        extra_ldflags=list(ldflags),
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# The build lock
# --------------------------------------------------------------------------------------------------


class BuildLockTimeout(RuntimeError):
    """Another process held a kernel's build lock for longer than :func:`build_timeout` seconds."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _read_holder(path: str) -> str:
    try:
        return Path(path).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class _BuildLock:
    """An exclusive, bounded-wait inter-process lock on ``path`` (content: ``"<pid> <host>"`` of the holder)."""

    def __init__(self, path: str, timeout: float, poll: float = 0.2) -> None:
        self.path, self.timeout, self.poll = path, timeout, poll
        self._fd: Optional[int] = None
        self._pid_file = False  # True where fcntl is missing: the file itself is the lock

    def __enter__(self) -> "_BuildLock":
        deadline = time.monotonic() + self.timeout
        announced = False
        try:
            import fcntl
        except ImportError:  # not on Linux/macOS: a pid file (tests simulate this)
            fcntl = None
        while True:
            if fcntl is not None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                else:
                    self._fd = fd
                    break
            else:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                    self._fd, self._pid_file = fd, True
                    break
                except FileExistsError:
                    self._remove_if_dead()
            if not announced:
                announced = True
                log.warning(
                    "pl_actsparse: waiting up to %g s for another build of this kernel (holder: %s; lock %s)",
                    self.timeout, _read_holder(self.path), self.path,
                )
            if time.monotonic() >= deadline:
                raise BuildLockTimeout(
                    f"another build of this kernel (holder: {_read_holder(self.path)}; lock {self.path}) did not "
                    f"finish within {self.timeout:g} s (set {ENV_BUILD_TIMEOUT} to wait longer, or run "
                    "`pl-actsparse build-kernels` once)"
                )
            time.sleep(self.poll)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()} {socket.gethostname()}".encode())
        return self

    def _remove_if_dead(self) -> None:  # the pid-file variant: a lock whose holder died on this host is stale
        holder = _read_holder(self.path).split()
        if holder and holder[0].isdigit() and (len(holder) < 2 or holder[1] == socket.gethostname()):
            if not _pid_alive(int(holder[0])):
                log.warning("pl_actsparse: removing the stale build lock %s of dead process %s", self.path, holder[0])
                with contextlib.suppress(OSError):
                    os.remove(self.path)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)  # closing releases the flock
                self._fd = None
                if self._pid_file:
                    with contextlib.suppress(OSError):
                        os.remove(self.path)


# --------------------------------------------------------------------------------------------------
# One C++ extension
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class ExtensionStatus:
    """Whether a C++ kernel is loaded, and why not if it is not.

    ``loaded`` (bool), ``error`` (``None`` when loaded or not tried yet; :data:`NOT_BUILT` when looked for
    without building), ``name`` (the keyed extension name) and ``build_directory`` (its cache folder).
    """

    loaded: bool
    error: Optional[str]
    name: str
    build_directory: str


class InlineExtension:
    """One of the package's C++ kernels: ``csrc/<source>`` registering ``torch.ops.<namespace>.<op>``.

    ``prefix`` starts the extension name; ``description`` and ``fallback_cost`` word the one fallback
    warning. State is per process: :meth:`load` builds at most once, a failure other than :data:`NOT_BUILT`
    is final. ``compile`` (default :func:`compile_inline`) is the build function, replaceable for tests.
    """

    def __init__(self, prefix: str, source: str, namespace: str, op: str, *, description: str, fallback_cost: str) -> None:
        self.prefix, self.source_file, self.namespace, self.op = prefix, source, namespace, op
        self.description, self.fallback_cost = description, fallback_cost
        self.compile: Callable[[str, str, str], None] = compile_inline
        self.loaded: Optional[bool] = None  # None: not tried yet
        self.error: Optional[str] = None
        self.warned = False
        self._lock = threading.Lock()

    # -- identity ---------------------------------------------------------------------------------
    @functools.cached_property
    def source(self) -> str:
        """The C++ source text (``kernels/csrc/<source>``)."""
        return (_CSRC / self.source_file).read_text()

    def name(self) -> str:
        """The extension name: ``prefix`` + 12 hex digits of the source, flags, torch, Python ABI and environment."""
        cflags, ldflags = compiler_flags()
        key = "\n".join(
            [
                self.source,
                " ".join(cflags),
                " ".join(ldflags),
                torch.__version__,
                str(torch.version.git_version),
                sys.implementation.cache_tag or "",
                str(sysconfig.get_config_var("EXT_SUFFIX")),
                environment_key(),
            ]
        )
        return self.prefix + hashlib.sha1(key.encode()).hexdigest()[:12]

    def build_directory(self, name: Optional[str] = None) -> str:
        """The cache folder of this build (under :func:`extension_root`)."""
        return os.path.join(extension_root(), name or self.name())

    def status(self) -> ExtensionStatus:
        """An :class:`ExtensionStatus` snapshot."""
        name = self.name()
        return ExtensionStatus(bool(self.loaded), self.error, name, self.build_directory(name))

    def reset(self) -> None:
        """Forget this process's attempt (tests; a library loaded into the process stays loaded)."""
        self.loaded, self.error, self.warned = None, None, False

    # -- loading ----------------------------------------------------------------------------------
    def _op_registered(self) -> bool:
        try:
            getattr(getattr(torch.ops, self.namespace), self.op)
        except (AttributeError, RuntimeError):
            return False
        return True

    def is_built(self) -> bool:
        """Whether the cache holds a complete build for this environment (its ``.so`` and stamp)."""
        d = self.build_directory()
        return os.path.isfile(os.path.join(d, self.name() + ".so")) and os.path.isfile(os.path.join(d, _STAMP))

    def _load_built(self, name: str, build_dir: str) -> None:
        if not self._op_registered():
            torch.ops.load_library(os.path.join(build_dir, name + ".so"))
        if not self._op_registered():
            raise RuntimeError(f"{name}.so loaded but did not register torch.ops.{self.namespace}.{self.op}")

    def _build(self, name: str, build_dir: str) -> None:
        os.makedirs(build_dir, exist_ok=True)
        with _BuildLock(build_dir + ".lock", build_timeout()):
            if self.is_built():  # another process finished it while we waited
                self._load_built(name, build_dir)
                return
            stale = os.path.join(build_dir, "lock")  # torch's FileBaton: only a killed build leaves it behind
            if os.path.exists(stale):
                log.warning("pl_actsparse: removing the stale torch build lock %s (a killed build left it)", stale)
                with contextlib.suppress(OSError):
                    os.remove(stale)
            log.info("pl_actsparse: compiling the C++ kernel %s into %s (once per environment)", name, build_dir)
            self.compile(name, self.source, build_dir)
            if not self._op_registered():
                self._load_built(name, build_dir)
            stamp = {"name": name, "torch": torch.__version__, "prefix": os.path.realpath(sys.prefix),
                     "python": sys.version.split()[0], "flags": list(compiler_flags()[0])}
            tmp = os.path.join(build_dir, _STAMP + f".{os.getpid()}")
            Path(tmp).write_text(json.dumps(stamp))
            os.replace(tmp, os.path.join(build_dir, _STAMP))

    def load(self, build: bool = True) -> bool:
        """Load the kernel, compiling it first if needed and ``build`` (20-60 s, once per environment).

        Returns ``False`` instead of raising when it cannot be loaded; :meth:`status` has the reason. With
        ``build=False`` nothing is compiled: a missing build gives ``False`` and :data:`NOT_BUILT`, and a later
        ``load(build=True)`` still builds it. Any other failure is not retried in this process.
        """
        if self.loaded or (self.loaded is False and self.error != NOT_BUILT):
            return bool(self.loaded)
        with self._lock:
            if self.loaded or (self.loaded is False and self.error != NOT_BUILT):
                return bool(self.loaded)
            name = self.name()
            build_dir = self.build_directory(name)
            try:
                if self._op_registered() or self.is_built():
                    self._load_built(name, build_dir)  # no compiler, no ninja needed (nothing to do when registered)
                elif not build:
                    self.loaded, self.error = False, NOT_BUILT
                    return False
                else:
                    self._build(name, build_dir)
            except Exception as exc:  # no compiler/ninja, compile or load error, lock timeout -> fallback
                self.loaded, self.error = False, f"{type(exc).__name__}: {exc}".strip()[:2000]
                log.debug("pl_actsparse: %s unavailable", self.description, exc_info=True)
                return False
            self.loaded, self.error = True, None
            return True

    def resolve(self, build: bool = True) -> str:
        """The implementation the next call uses: ``"cpp"`` or ``"torch"``.

        With ``"auto"``/``"cpp"`` this may compile the kernel (once). With ``build=False`` nothing is compiled
        and nothing raises (an unbuilt ``"cpp"`` reports ``"cpp"``: it is built on use). Raises
        ``RuntimeError`` when ``"cpp"`` was requested and the kernel cannot be loaded.
        """
        backend = get_backend()
        if backend == "torch":
            return "torch"
        if self.load(build=build):
            return "cpp"
        if backend == "cpp":
            if not build:
                return "cpp"
            raise RuntimeError(
                f"pl_actsparse: the {self.description} was requested (backend='cpp') but is unavailable: {self.error}"
            )
        return "torch"

    def resolve_for_call(self) -> str:
        """:meth:`resolve` for a kernel call: builds if needed; the first fallback under ``"auto"`` warns once."""
        backend = _backend if _backend is not None else get_backend()
        if backend == "torch":
            return "torch"
        if self.loaded:  # fast path: a few attribute reads per call
            return "cpp"
        backend = self.resolve(build=True)
        if backend == "torch" and not self.warned and get_backend() == "auto":
            self.warned = True
            warnings.warn(
                f"pl_actsparse: the {self.description} is unavailable ({self.error}); {self.fallback_cost}. "
                f"Build it with `pl-actsparse build-kernels`, or set {ENV_BACKEND}=torch to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
        return backend
