"""What `import torchwatch` costs and exposes."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import torchwatch as tw

EXPECTED = {
    "MetricEvidence", "Rollout", "Verdict", "rollout",
    "Alert", "CanaryError", "ConfigError", "DEFAULT_CAST_DTYPES", "FirstNonFinite", "FormatError", "IntegrityError",
    "JsonlSink", "MemorySink", "ModuleStats", "Monitor", "NonFiniteError", "Record", "Sink", "Snapshot", "TensorBoardSink",
    "TorchwatchError", "TorchwatchWarning", "Watch", "attach", "tensor_stats",
    "CalibrationReport", "DriftStatus", "Reference", "arl_windows",
    "Canary", "CanaryReport", "Fingerprint", "FingerprintChange", "Manifest", "OutputCheck", "SelfTestReport",
    "Tolerances", "WeightReport", "fingerprint", "selftest", "verify_weights",
    "CircuitBreaker", "CircuitOpenError", "IncidentLog", "PrometheusSink", "rules",
    "IdStats", "Identity", "InputMonitor", "InputStats", "OutputMonitor", "OutputQuality", "Comparison", "Shadow", "compare",
    "shadow", "write_key",
    "Capture", "Incident", "ReplayReport",
}  # fmt: skip


def test_public_names_are_exactly_the_exported_ones_and_sorted():
    assert set(tw.__all__) == EXPECTED
    assert tw.__all__ == sorted(tw.__all__, key=lambda n: (not n.isupper(), n))
    for name in tw.__all__:
        assert getattr(tw, name) is not None


def test_every_public_object_has_a_docstring():
    for name in tw.__all__:
        obj = getattr(tw, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__) > 40, name


def test_import_loads_no_optional_dependency_and_does_not_initialise_cuda():
    code = (
        "import sys, json, torchwatch, torch\n"
        "heavy = [m for m in ('tensorboard', 'prometheus_client', 'triton', 'transformers', 'safetensors')"
        " if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'cuda': torch.cuda.is_initialized()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == {"heavy": [], "cuda": False}


def test_package_ships_type_information():
    assert (pathlib.Path(tw.__file__).parent / "py.typed").exists()


def test_error_tree():
    assert issubclass(tw.ConfigError, tw.TorchwatchError) and issubclass(tw.ConfigError, ValueError)
    assert issubclass(tw.FormatError, ValueError)
    for cls in (tw.IntegrityError, tw.CanaryError, tw.NonFiniteError, tw.CircuitOpenError):
        assert issubclass(cls, tw.TorchwatchError)
    assert issubclass(tw.TorchwatchWarning, UserWarning)


def test_the_distribution_name_is_ours_everywhere():
    # the package index holds an unrelated project called "torchwatch": no install hint may name it
    from importlib.metadata import version

    from torchwatch._dist import DISTRIBUTION, install_hint

    root = pathlib.Path(__file__).parents[1]
    assert f'name = "{DISTRIBUTION}"' in (root / "pyproject.toml").read_text()
    assert version(DISTRIBUTION) == tw.__version__
    assert install_hint("tensorboard") == "pip install 'torchwatch-monitor[tensorboard]'"
    texts = [p.read_text() for p in [root / "README.md", *root.glob("docs/*.md"), *root.glob("torchwatch/**/*.py")]]
    for text in texts:
        assert "pip install 'torchwatch[" not in text and "pip install torchwatch " not in text
