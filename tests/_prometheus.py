"""A real Prometheus server for the tests: scraping given ports on loopback every second."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prometheus(directory: Path, ports: list[int]) -> Iterator[str]:
    """Start Prometheus scraping ``127.0.0.1:<port>`` for each port; yields its URL. Skips the
    test when no server binary is installed (``.ci/run`` installs Debian's)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus server binary (.ci/run installs the Debian package)")
    web = free_port()
    config = directory / "prometheus.yml"
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in ports)
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: serving\n"
                      f"    static_configs:\n      - targets: [{targets}]\n")  # fmt: skip
    server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{web}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        yield f"http://127.0.0.1:{web}"
    finally:
        server.terminate()
        server.wait(30)


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    """Poll ``ready`` (errors count as not yet) until true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if ready():
                return
        assert time.monotonic() < deadline, f"{what} in {timeout:.0f} s"
        time.sleep(0.5)
