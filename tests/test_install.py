"""What ``pip install .`` from a clone gives a user: a wheel built from a copy of the source tree
(no build isolation: CI has no network for setuptools), read as a zip, then installed into a
directory of its own and imported from there, outside the repository, with its console script run."""

from __future__ import annotations

import email.parser
import os
import pathlib
import pickle
import platform
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import torch
from _oracle import assert_matches, oracle

import torchwatch
from torchwatch._accumulators import stats_from_raw
from torchwatch.stats import DEFAULT_CAST_DTYPES

REPO = pathlib.Path(__file__).resolve().parents[1]
# what a clean clone holds besides the source: local environments and build outputs stay behind
LOCAL = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "runs", "*.egg-info", "__pycache__", "*.so")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    src = tmp_path_factory.mktemp("clone") / "torchwatch"
    shutil.copytree(REPO, src, ignore=LOCAL)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("*.whl")
    return path


def _source_modules() -> set[str]:
    root = REPO / "torchwatch"
    return {str(p.relative_to(REPO)) for p in root.rglob("*.py")}


def test_the_wheel_is_named_torchwatch_monitor_with_its_extras_and_command(wheel):
    with zipfile.ZipFile(wheel) as z:
        info = next(n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        names = set(z.namelist())
    assert meta["Name"] == "torchwatch-monitor" and meta["Version"] == torchwatch.__version__
    assert {"tensorboard", "prometheus"} <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    assert "torch>=2.3" in requires  # broad: the user's torch is never replaced by a pinned one
    assert "[console_scripts]\ntorchwatch = torchwatch.cli:main" in entry_points
    # every module of the source tree, the type marker and the C kernel's source are in it
    missing = _source_modules() - names
    assert not missing, f"not packaged: {sorted(missing)}"
    assert {"torchwatch/py.typed", "torchwatch/kernels/_cstats.c"} <= names


def test_the_installed_wheel_imports_and_runs_outside_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import pkgutil, torch, torchwatch as tw\n"
        "print(tw.__file__)\n"
        "for m in pkgutil.walk_packages(tw.__path__, 'torchwatch.'):\n"
        "    if m.name != 'torchwatch.__main__':  # that one runs the command\n"
        "        __import__(m.name)\n"  # every module imports from the installed copy
        "model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())\n"
        "with tw.attach(model) as watch:\n"
        "    model(torch.randn(2, 4))\n"
        "    print(watch.snapshot()['0'].count)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr
    where, count = run.stdout.split()
    assert pathlib.Path(where).is_relative_to(target) and count == "8"  # 2 rows x 4 features
    script = target / "bin" / "torchwatch"
    version = subprocess.run(
        [sys.executable, str(script), "--version"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert version.returncode == 0 and torchwatch.__version__ in version.stdout, version.stderr


def test_the_c_kernel_is_built_wherever_a_c_compiler_is():
    """setup.py builds the kernel as optional, so that a machine without a C compiler still
    installs (the torch-ops path, tested by test_kernels' fallback test). Where a compiler exists,
    a kernel that did not build is a bug the suite must not pass over: every kernel test would
    skip and the stats tests would lose their vector paths."""

    from torchwatch.kernels import cpu

    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}): this machine gets the torch-ops path")
    assert cpu.available, (
        f"{cc} is here but torchwatch/kernels/_cstats.c was not built; "
        "TORCHWATCH_REQUIRE_KERNEL=1 pip install -e . shows the compiler's error"
    )


def test_the_kernel_loop_benchmark_builds_and_runs(tmp_path):
    """benchmarks/kernel_loop.c includes the kernel's source: it must build with the command in its
    header and run each vector level the CPU has (without AVX2 it says so and exits), or the
    figures RESULTS.md takes from it could no longer be reproduced."""
    if platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux" or shutil.which("gcc") is None:
        pytest.skip("the loop benchmark is for x86-64 Linux with gcc")
    include = sysconfig.get_paths()["include"]
    libdir = sysconfig.get_config_var("LIBDIR")
    version = sysconfig.get_config_var("LDVERSION")
    if not libdir or not (pathlib.Path(libdir) / f"libpython{version}.so").exists():
        pytest.skip("no shared libpython to link against")
    repo = pathlib.Path(__file__).resolve().parents[1]
    exe = tmp_path / "kernel_loop"
    build = subprocess.run(
        ["gcc", "-O3", f"-I{include}", str(repo / "benchmarks" / "kernel_loop.c"), "-o", str(exe),
         f"-L{libdir}", f"-lpython{version}", f"-Wl,-rpath,{libdir}", "-lm"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe), "4096"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    levels = [line.split()[0] for line in lines if "plain sum" in line]
    assert lines == ["this CPU has no AVX2"] or (
        levels in (["avx2"], ["avx512", "avx2"])
        and len([line for line in lines if "kernel loop" in line]) == 4 * len(levels)
        and len([line for line in lines if "ReLU loop" in line]) == 2 * len(levels)
    ), run.stdout


PORTABLE_RUN = """
import importlib.util, pickle, sys
spec = importlib.util.spec_from_file_location("torchwatch.kernels._cstats", sys.argv[1])
kernel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel)
sys.modules["torchwatch.kernels._cstats"] = kernel  # in place of the installed build
import torch
from torchwatch._casts import cast_plan
from torchwatch.kernels import cpu, host_stats
from torchwatch.stats import DEFAULT_CAST_DTYPES
x = torch.load(sys.argv[2])
raws = {str(t.dtype): host_stats(t, cast_plan(t.dtype, DEFAULT_CAST_DTYPES)) for t in x}
pickle.dump((cpu.simd_levels(), raws), open(sys.argv[3], "wb"))
"""


def test_the_kernel_builds_for_cpus_without_x86_vector_code(tmp_path):
    """On ARM servers and Apple silicon the kernel is its portable exact path alone. CI runs on x86-64,
    so the kernel is built here as those CPUs' preprocessor sees it (TW_PORTABLE_ONLY leaves out every
    x86 intrinsic), loaded in place of the installed build, and must give the oracle's statistics for
    float32/float16/bfloat16/float64 tensors with NaN, infinities, zeros and subnormals."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None or sys.platform == "win32":
        pytest.skip(f"no C compiler ({cc})")
    built = tmp_path / f"_cstats{sysconfig.get_config_var('EXT_SUFFIX')}"
    build = subprocess.run(
        [cc, "-O2", "-std=c11", "-shared", "-fPIC", "-DTW_PORTABLE_ONLY", f"-I{sysconfig.get_paths()['include']}",
         str(REPO / "torchwatch" / "kernels" / "_cstats.c"), "-o", str(built), "-lm"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5 * 4096 + 7, generator=g, dtype=torch.float64)  # five blocks of the kernel and a tail
    base[::97] = 0.0
    base[5::101] = 1e-41
    base[[3, 4000, 9000]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    tensors = [base.to(dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)]
    torch.save(tensors, tmp_path / "x.pt")
    run = subprocess.run(
        [sys.executable, "-c", PORTABLE_RUN, str(built), str(tmp_path / "x.pt"), str(tmp_path / "out.pkl")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    levels, raws = pickle.loads((tmp_path / "out.pkl").read_bytes())  # noqa: S301 - our own subprocess wrote it
    assert levels == (0, 0)  # no vector path in this build
    for x in tensors:
        assert_matches(stats_from_raw(1, raws[str(x.dtype)], DEFAULT_CAST_DTYPES), oracle(x, DEFAULT_CAST_DTYPES))
