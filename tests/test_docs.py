"""The generated API reference matches the docstrings; the docs name only what exists."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_api_reference_is_up_to_date():
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "_build_api.py"), "--check"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_docs_link_to_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    for target in ("docs/concepts.md", "docs/serving.md", "docs/api.md", "docs/tensorboard.png",
                   "examples/readiness_server.py", "benchmarks/containment.py"):  # fmt: skip
        assert target in readme or target in (ROOT / "docs" / "concepts.md").read_text(), target
        assert (ROOT / target).exists(), target
