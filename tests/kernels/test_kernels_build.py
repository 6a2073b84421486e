"""Building and loading the C++ kernels (pl_actsparse.kernels._extension): issue 13 items 10-13.

Each case is simulated: the build function is replaced by a fake that writes the files a build leaves
(``<name>.so``, the stamp) and loading the library is recorded, so no test compiles anything. One test loads
the real cached build in a fresh process without a compiler when it is built (``make test`` builds it first
with ``pl-actsparse build-kernels``).
"""

from __future__ import annotations

import fcntl
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

from pl_actsparse.kernels import _extension, cpu, int8_cpu
from pl_actsparse.kernels._extension import NOT_BUILT, InlineExtension


class FakeBuilds:
    """Replaces compiling and loading for one extension; counts what happened."""

    def __init__(self, ext: InlineExtension, fail: str | None = None) -> None:
        self.ext, self.fail = ext, fail
        self.compiled: list[str] = []
        self.loaded_paths: list[str] = []
        self.registered = False

    def compile(self, name: str, source: str, build_dir: str) -> None:
        assert source == self.ext.source and os.path.isdir(build_dir)
        assert not os.path.exists(os.path.join(build_dir, "lock")), "a stale torch lock was left in place"
        self.compiled.append(build_dir)
        if self.fail:
            raise RuntimeError(self.fail)
        with open(os.path.join(build_dir, name + ".so"), "wb") as f:
            f.write(b"\x7fELF fake")
        self.registered = True  # load_inline loads what it built

    def load_built(self, name: str, build_dir: str) -> None:
        self.loaded_paths.append(os.path.join(build_dir, name + ".so"))
        self.registered = True


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A fresh, never-loaded state of both C++ kernels, building into an empty cache folder."""
    monkeypatch.setenv("PL_ACTSPARSE_EXT_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PL_ACTSPARSE_BUILD_TIMEOUT", "30")
    fakes = {}
    for ext in (cpu.EXTENSION, int8_cpu.INT8_EXTENSION):
        saved = (ext.loaded, ext.error, ext.warned)
        ext.reset()
        f = FakeBuilds(ext)
        monkeypatch.setattr(ext, "compile", f.compile)
        monkeypatch.setattr(ext, "_load_built", f.load_built)
        monkeypatch.setattr(ext, "_op_registered", lambda f=f: f.registered)
        fakes[ext.prefix] = (f, saved)
    yield {"float": fakes[cpu.EXTENSION.prefix][0], "int8": fakes[int8_cpu.INT8_EXTENSION.prefix][0]}
    for ext in (cpu.EXTENSION, int8_cpu.INT8_EXTENSION):
        ext.loaded, ext.error, ext.warned = fakes[ext.prefix][1]
    cpu.set_backend(None)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------ keys


def test_the_name_is_keyed_on_source_flags_torch_and_environment(monkeypatch):
    ext = cpu.EXTENSION
    base = ext.name()
    assert base.startswith("pl_actsparse_cpu_") and len(base) == len("pl_actsparse_cpu_") + 12
    assert ext.name() == base  # deterministic
    monkeypatch.setattr(_extension, "environment_key", lambda: "0000aaaa")
    env_a = ext.name()
    monkeypatch.setattr(_extension, "environment_key", lambda: "0000bbbb")
    env_b = ext.name()
    monkeypatch.setattr(_extension, "compiler_flags", lambda: (("-O0",), ()))
    flags = ext.name()
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    version = ext.name()
    assert len({base, env_a, env_b, flags, version}) == 5
    assert int8_cpu.INT8_EXTENSION.name() != ext.name()  # the two kernels never share a folder


def test_environment_key_follows_sys_prefix(monkeypatch, tmp_path):
    key = _extension.environment_key()
    assert len(key) == 8 and int(key, 16) >= 0
    monkeypatch.setattr(_extension.sys, "prefix", str(tmp_path / "other-venv"))
    assert _extension.environment_key() != key


def test_build_timeout_is_validated(monkeypatch):
    monkeypatch.delenv("PL_ACTSPARSE_BUILD_TIMEOUT", raising=False)
    assert _extension.build_timeout() == _extension.DEFAULT_BUILD_TIMEOUT
    monkeypatch.setenv("PL_ACTSPARSE_BUILD_TIMEOUT", "2.5")
    assert _extension.build_timeout() == 2.5
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv("PL_ACTSPARSE_BUILD_TIMEOUT", bad)
        with pytest.raises(ValueError, match="PL_ACTSPARSE_BUILD_TIMEOUT"):
            _extension.build_timeout()


# ------------------------------------------------------------------------------------------- build once


def test_builds_once_then_loads_the_cached_build(fake):
    f = fake["float"]
    assert cpu.load_extension(build=True) is True
    assert len(f.compiled) == 1 and f.loaded_paths == []
    status = cpu.extension_status()
    assert status.loaded and status.error is None
    assert os.path.isfile(os.path.join(status.build_directory, _extension._STAMP))
    # a new process: nothing registered yet, the build is found and loaded, not compiled again
    cpu.EXTENSION.reset()
    f.registered = False
    assert cpu.load_extension(build=True) is True
    assert len(f.compiled) == 1 and f.loaded_paths == [os.path.join(status.build_directory, status.name + ".so")]


def test_no_compiler_but_already_built_loads_the_cache(fake, monkeypatch):
    """Item 10: no compiler, kernels already built -> the cached .so is loaded, no fallback."""
    f = fake["float"]
    assert cpu.load_extension(build=True)
    cpu.EXTENSION.reset()
    f.registered = False
    monkeypatch.setattr(cpu.EXTENSION, "compile", _extension.compile_inline)  # the real one: it would fail
    monkeypatch.setenv("CXX", "no-such-compiler-pl-actsparse")
    monkeypatch.setenv("PATH", "")
    assert cpu.load_extension(build=False) is True  # even without permission to build
    assert cpu.extension_status().error is None and len(f.loaded_paths) == 1


def test_an_incomplete_build_without_its_stamp_is_rebuilt(fake):
    """A build killed while linking may leave a partial .so: only a stamped build is loaded."""
    f = fake["float"]
    d = cpu.EXTENSION.build_directory()
    os.makedirs(d)
    with open(os.path.join(d, cpu.EXTENSION.name() + ".so"), "wb") as fh:
        fh.write(b"partial")
    assert cpu.load_extension(build=False) is False and cpu.extension_status().error == NOT_BUILT
    assert cpu.load_extension(build=True) is True
    assert len(f.compiled) == 1 and f.loaded_paths == []


def test_not_built_yet_then_first_use_builds(fake):
    """Item 11: a lookup without building (a pickled/exported model's layer) must not block the later build."""
    f = fake["int8"]
    assert int8_cpu.load_int8_extension(build=False) is False
    assert int8_cpu.int8_extension_status().error == NOT_BUILT
    assert int8_cpu.load_int8_extension(build=True) is True
    assert len(f.compiled) == 1


def test_pickled_int8_model_loaded_first_builds_the_int8_kernel_on_first_use(fake):
    """Item 11 end to end: a fresh state, a pickled Int8SparseInferenceLinear, the first forward builds."""
    from pl_actsparse.core.int8 import Int8WeightLinear
    from pl_actsparse.export.int8_linear import Int8SparseInferenceLinear

    f = fake["int8"]
    f.fail = "simulated compile error"  # so that the call can complete on the torch fallback
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    layer = Int8SparseInferenceLinear(Int8WeightLinear.from_linear(lin))
    blob = pickle.dumps(layer)
    int8_cpu.INT8_EXTENSION.reset()
    restored = pickle.loads(blob)
    assert int8_cpu.load_int8_extension(build=False) is False  # what a layer's eager fast path asks first
    cpu.set_backend("auto")
    x = torch.randn(1, 16)
    with pytest.warns(RuntimeWarning, match="simulated compile error"):
        y = restored(x)
    assert len(f.compiled) == 1, "the first use did not try to build the int8 kernel"
    ref = int8_cpu.int8_masked_linear(x, restored.activation_threshold, restored.qweight_t, restored.scale,
                                      restored.zero_point, restored.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- two envs


def test_two_environments_sharing_one_cache_keep_their_own_builds(fake, monkeypatch):
    """Item 13: switching between two venvs that share the cache never rebuilds."""
    f = fake["float"]
    dirs = {}
    for env in ("aaaa0000", "bbbb0000", "aaaa0000", "bbbb0000"):
        monkeypatch.setattr(_extension, "environment_key", lambda env=env: env)
        cpu.EXTENSION.reset()
        f.registered = False
        assert cpu.load_extension(build=True)
        dirs.setdefault(env, cpu.extension_status().build_directory)
    assert len(f.compiled) == 2 and sorted(f.compiled) == sorted(dirs.values())
    assert len(f.loaded_paths) == 2 and dirs["aaaa0000"] != dirs["bbbb0000"]


# ---------------------------------------------------------------------------------------------- locks


def test_a_killed_builds_stale_locks_do_not_hang(fake, monkeypatch):
    """Item 12: SIGKILL leaves torch's lock file (and our lock file with a dead pid): the next build proceeds."""
    monkeypatch.setenv("PL_ACTSPARSE_BUILD_TIMEOUT", "5")
    ext = cpu.EXTENSION
    d = ext.build_directory()
    os.makedirs(d)
    with open(os.path.join(d, "lock"), "w") as fh:  # torch's FileBaton: would be waited on forever
        fh.write("")
    with open(d + ".lock", "w") as fh:
        fh.write(f"{_dead_pid()} {os.uname().nodename}")
    assert cpu.load_extension(build=True) is True, cpu.extension_status().error
    assert len(fake["float"].compiled) == 1 and not os.path.exists(os.path.join(d, "lock"))


def test_a_build_process_killed_with_sigkill_leaves_nothing_that_blocks(fake, monkeypatch):
    """Item 12 for real: a process takes the build lock and torch's lock file, then dies by SIGKILL."""
    import signal
    import textwrap

    monkeypatch.setenv("PL_ACTSPARSE_BUILD_TIMEOUT", "10")
    ext = cpu.EXTENSION
    d = ext.build_directory()
    os.makedirs(d)
    script = textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({d + ".lock"!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        open(os.path.join({d!r}, "lock"), "w").close()  # torch's FileBaton, as during load_inline
        print("ready", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and os.path.exists(os.path.join(d, "lock"))
    assert cpu.load_extension(build=True) is True, cpu.extension_status().error
    assert len(fake["float"].compiled) == 1 and not os.path.exists(os.path.join(d, "lock"))


def test_a_live_holder_is_waited_for_boundedly_then_one_warning(fake, monkeypatch, caplog):
    monkeypatch.setenv("PL_ACTSPARSE_BUILD_TIMEOUT", "0.3")
    ext = cpu.EXTENSION
    d = ext.build_directory()
    os.makedirs(d)
    fd = os.open(d + ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another builder (a separate open file description conflicts)
        os.write(fd, b"424242 otherhost")
        cpu.set_backend("auto")
        w, x = torch.randn(6, 10), torch.randn(1, 10)
        with pytest.warns(RuntimeWarning) as caught:
            y = cpu.sparse_linear_cpu(x, torch.tensor(0.4), cpu.to_kernel_layout(w))
        msgs = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
        assert len(msgs) == 1
        assert "BuildLockTimeout" in msgs[0] and "424242 otherhost" in msgs[0] and "0.3 s" in msgs[0]
        assert "pure-PyTorch" in msgs[0] and "decode runs at" in msgs[0]  # names the cost
        torch.testing.assert_close(y, cpu.masked_linear(x, 0.4, w), rtol=1e-5, atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            cpu.sparse_linear_cpu(x, torch.tensor(0.4), cpu.to_kernel_layout(w))
        assert fake["float"].compiled == []
        waits = [r.getMessage() for r in caplog.records if "waiting up to 0.3 s" in r.getMessage()]
        assert len(waits) == 1 and "424242 otherhost" in waits[0]  # the wait itself is announced
        with pytest.raises(RuntimeError, match="backend='cpp'.*BuildLockTimeout"):
            cpu.set_backend("cpp")
            cpu.resolve_backend(build=True)
    finally:
        os.close(fd)


def test_without_fcntl_a_pid_file_lock_with_a_dead_holder_is_removed(fake, monkeypatch):
    """Where fcntl is missing the lock is a pid file: a dead holder's file is removed, a live one waited for."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl -> ImportError
    monkeypatch.setenv("PL_ACTSPARSE_BUILD_TIMEOUT", "0.3")
    ext = cpu.EXTENSION
    d = ext.build_directory()
    os.makedirs(d)
    with open(d + ".lock", "w") as fh:
        fh.write(f"{os.getpid()} {os.uname().nodename}")  # alive: this very process
    assert cpu.load_extension(build=True) is False
    assert "BuildLockTimeout" in cpu.extension_status().error and fake["float"].compiled == []
    ext.reset()
    with open(d + ".lock", "w") as fh:
        fh.write(f"{_dead_pid()} {os.uname().nodename}")
    assert cpu.load_extension(build=True) is True, cpu.extension_status().error
    assert len(fake["float"].compiled) == 1 and not os.path.exists(d + ".lock")  # released on exit


def test_a_build_waiting_for_another_process_loads_its_result(fake, monkeypatch):
    """The lock holder finishes while we wait: we load its build instead of compiling again."""
    ext = cpu.EXTENSION
    f = fake["float"]
    d = ext.build_directory()
    os.makedirs(d)
    fd = os.open(d + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    real_sleep = _extension.time.sleep

    def other_process_finishes(seconds):  # called while we poll for the lock
        with open(os.path.join(d, ext.name() + ".so"), "wb") as fh:
            fh.write(b"\x7fELF")
        with open(os.path.join(d, _extension._STAMP), "w") as fh:
            fh.write("{}")
        os.close(fd)  # releases the lock
        monkeypatch.setattr(_extension.time, "sleep", real_sleep)

    monkeypatch.setattr(_extension.time, "sleep", other_process_finishes)
    assert cpu.load_extension(build=True) is True
    assert f.compiled == [] and len(f.loaded_paths) == 1


# --------------------------------------------------------------------------------------- ahead of time


def test_build_all_and_the_cli_subcommand(fake, capsys):
    from pl_actsparse.kernels import build_all
    from pl_actsparse.lightning.cli import main

    statuses = build_all()
    assert set(statuses) == {"float", "int8"} and all(s.loaded for s in statuses.values())
    assert len(fake["float"].compiled) == 1 and len(fake["int8"].compiled) == 1
    with pytest.raises(SystemExit) as exc:
        main(["build-kernels", "--no-profile"])
    assert exc.value.code == 0
    assert '"loaded": true' in capsys.readouterr().out
    assert len(fake["float"].compiled) == 1  # already loaded: not built again


def test_build_kernels_exit_status_on_failure(fake, capsys):
    from pl_actsparse.kernels import build_kernels_main

    fake["float"].fail = "simulated compile error"
    assert build_kernels_main(["--no-profile"]) == 1
    assert "simulated compile error" in capsys.readouterr().out
    assert build_kernels_main(["--allow-failure", "--no-profile"]) == 0


def test_build_kernels_measures_the_profiles(fake, monkeypatch, capsys):
    import json

    from pl_actsparse.kernels import build, build_kernels_main, dispatch

    seen = []

    def fake_profile(dtype, backend=None, **kw):
        seen.append(dtype)
        return dispatch.CpuProfile(dtype=str(dtype), backend="torch", dense_method="linear", max_sparse_tokens=4,
                                   source="measured")

    monkeypatch.setattr(dispatch, "cpu_profile", fake_profile)
    assert build_kernels_main([]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["profiles"]) == {"float32", "bfloat16", "float16"}
    assert out["profiles"]["bfloat16"]["max_sparse_tokens"] == 4
    assert seen == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="unknown floating-point dtype 'int8'"):
        build.measure_profiles(["int8"])


# ------------------------------------------------------------------------------------------ real build


def test_a_real_cached_build_loads_in_a_fresh_process_without_compiler_or_ninja():
    """Item 10 for real: with the kernels built (make test runs build-kernels first), a process with no
    compiler and no ninja on PATH loads both and computes with them."""
    if not (cpu.EXTENSION.is_built() and int8_cpu.INT8_EXTENSION.is_built()):
        if os.environ.get("PL_ACTSPARSE_BUILD_EXT") != "1":
            pytest.skip("C++ kernels not built (run `pl-actsparse build-kernels` or set PL_ACTSPARSE_BUILD_EXT=1)")
        from pl_actsparse.kernels import build_all

        assert all(s.loaded for s in build_all().values())
    script = (
        "import torch, warnings; warnings.simplefilter('error');"
        "from pl_actsparse.kernels import cpu, int8_cpu;"
        "assert cpu.load_extension(build=False) and int8_cpu.load_int8_extension(build=False);"
        "w = torch.randn(40, 24); x = torch.randn(2, 24);"
        "y = cpu.sparse_linear_cpu(x, torch.tensor(0.5), cpu.to_kernel_layout(w));"
        "torch.testing.assert_close(y, cpu.masked_linear(x, 0.5, w), rtol=1e-5, atol=1e-5);"
        "q, s, z = int8_cpu.quantize_weight_t(w);"
        "y8 = int8_cpu.int8_sparse_linear(x, torch.tensor(0.5), q, s, z);"
        "torch.testing.assert_close(y8, int8_cpu.int8_masked_linear(x, torch.tensor(0.5), q, s, z), rtol=1e-4, atol=1e-4);"
        "print('OK')"
    )
    env = dict(os.environ, PATH="", CXX="no-such-compiler-pl-actsparse", PL_ACTSPARSE_CPU_KERNEL="cpp")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "OK"
