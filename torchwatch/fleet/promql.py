"""The fleet comparison from Prometheus, for replicas that share no process group (independent
serving pods): PromQL over the series every replica exports, and a client of Prometheus' HTTP API
that runs it (``torchwatch fleet --prometheus URL``).

What each replica exports: ``torchwatch_replica_info`` (who it is: versions, device),
``torchwatch_canary_info{output, digest, weights}`` (its latest canary re-check,
``watch.verify_canary_every``) and its module statistics (``torchwatch_std``, ``torchwatch_absmax``).
Replicas that should agree hold the same digests; the queries return the ones outside the
majority (more than half of the replicas of a model hold the majority's value), and the ones
whose module statistics sit more than ``threshold`` median absolute deviations (plus
``rel_floor`` of the median) from the fleet's median.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError

__all__ = ["FleetFinding", "minority_query", "outlier_query", "queries", "run"]

REPLICA_INFO = "torchwatch_replica_info"
CANARY_INFO = "torchwatch_canary_info"
STATISTICS = ("torchwatch_std", "torchwatch_absmax")
SOFTWARE = ("torch", "cuda", "cudnn", "device_name")


def minority_query(series: str, by: tuple[str, ...], within: tuple[str, ...] = ()) -> str:
    """The replicas whose ``by`` labels differ from what more than half of the model's replicas
    have (per value of the ``within`` labels, e.g. per canary ``output``).

    ``series`` is reduced to one sample per replica first (``max by (model, replica, ...)``)."""
    group = ", ".join(("model", *within))
    keys = ", ".join(("model", *within, *by))
    per = f"max by (model, replica, {', '.join((*within, *by))}) ({series})"
    return (f"{per} unless on ({keys}) (count by ({keys}) ({per}) * 2 > on ({group}) group_left "
            f"count by ({group}) ({per}))")  # fmt: skip


def outlier_query(metric: str, threshold: float = 8.0, rel_floor: float = 0.01) -> str:
    """The replicas whose ``metric`` (a per-module gauge) is farther from the fleet's median than
    ``threshold`` scaled MADs plus ``rel_floor`` of the median; the value is the distance, and the
    ``replica`` label is joined from ``torchwatch_replica_info`` on ``instance``."""
    med = f"quantile by (model, module) (0.5, {metric})"
    dev = f"abs({metric} - on (model, module) group_left {med})"
    mad = f"quantile by (model, module) (0.5, {dev})"
    # no parenthesis right after group_left: PromQL would read it as a label list
    limit = f"{mad} * {threshold * 1.4826:g} + abs({med}) * {rel_floor:g} + 1e-30"
    return (f"({dev} > on (model, module) group_left {limit}) "
            f"* on (instance, model) group_left (replica) {REPLICA_INFO}")  # fmt: skip


def queries(threshold: float = 8.0, rel_floor: float = 0.01) -> dict[str, str]:
    """The documented queries by name: ``canary`` (output digests), ``weights`` (fingerprints),
    ``software`` (versions and device model) and one per module statistic (``torchwatch_std``, ...)."""
    out = {
        "canary": minority_query(CANARY_INFO, ("digest",), within=("output",)),
        "weights": minority_query(CANARY_INFO, ("weights",)),
        "software": minority_query(REPLICA_INFO, SOFTWARE),
    }
    for metric in STATISTICS:
        out[metric] = outlier_query(metric, threshold, rel_floor)
    return out


@dataclass
class FleetFinding:
    """A replica the queries found: ``cause`` (``weights``, ``configuration``, ``hardware`` or
    ``statistics``), what each query said of it, and the modules whose statistics are outliers."""

    model: str
    replica: str
    cause: str
    why: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "replica": self.replica, "cause": self.cause, "why": self.why,
                "modules": self.modules}  # fmt: skip


def query(url: str, promql: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The instant vector ``promql`` gives now, through Prometheus' HTTP API (``/api/v1/query``).

    Raises:
        FormatError: Prometheus cannot be reached, or answered with an error or not a vector.
    """
    target = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:  # noqa: S310 - the user's URL
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:300]
        raise FormatError(f"Prometheus at {url} refused a query ({exc.code}): {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise FormatError(f"cannot query Prometheus at {url}: {exc}") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("status") != "success" or not isinstance(data, dict) \
            or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):  # fmt: skip
        raise FormatError(f"Prometheus at {url} did not answer with a vector: {str(doc)[:300]}")
    return data["result"]


def run(url: str, *, threshold: float = 8.0, rel_floor: float = 0.01, model: str | None = None,
        timeout: float = 10.0) -> tuple[dict[str, int], list[FleetFinding]]:  # fmt: skip
    """Run every query against Prometheus at ``url``: the replicas seen per model, and the findings.

    Cause of a replica whose canary digest is in the minority: ``weights`` if its fingerprint is in
    the minority too, ``configuration`` if its software or device model is, else ``hardware``
    (suspected faulty device). Statistics outliers alone: ``statistics``.
    """
    seen: dict[str, int] = {}
    for sample in query(url, f"count by (model) ({REPLICA_INFO})", timeout):
        seen[sample["metric"].get("model", "")] = int(float(sample["value"][1]))
    hits: dict[str, dict[tuple[str, str], list[dict[str, str]]]] = {}
    for name, promql in queries(threshold, rel_floor).items():
        for sample in query(url, promql, timeout):
            labels = sample.get("metric", {})
            key = (labels.get("model", ""), labels.get("replica", ""))
            if model is None or key[0] == model:
                hits.setdefault(name, {}).setdefault(key, []).append(labels)
    found: dict[tuple[str, str], FleetFinding] = {}
    for key in hits.get("canary", {}):
        cause = ("weights" if key in hits.get("weights", {}) else
                 "configuration" if key in hits.get("software", {}) else "hardware")  # fmt: skip
        found[key] = FleetFinding(*key, cause)
    for key in (*hits.get("weights", {}), *hits.get("software", {})):
        found.setdefault(key, FleetFinding(*key, "weights" if key in hits.get("weights", {}) else "configuration"))
    for metric in STATISTICS:
        for key, rows in hits.get(metric, {}).items():
            f = found.setdefault(key, FleetFinding(*key, "statistics"))
            f.modules += [m for r in rows if (m := r.get("module", "")) and m not in f.modules]
    for key, f in found.items():
        for name, rows in hits.items():
            if key in rows:
                f.why.append(_why(name, rows[key]))
    return seen, sorted(found.values(), key=lambda f: (f.model, f.replica))


def _why(name: str, rows: list[dict[str, str]]) -> str:
    first = rows[0]
    if name == "canary":
        outputs = sorted({r.get("output", "") for r in rows})
        return f"canary output digest differs from the majority's ({', '.join(outputs)})"
    if name == "weights":
        return f"weights fingerprint {first.get('weights', '')[:12]}… differs from the majority's"
    if name == "software":
        return "software or device differs: " + ", ".join(f"{k}={first.get(k, '')!r}" for k in SOFTWARE)
    modules = sorted({r.get("module", "") for r in rows})
    return f"{name.removeprefix('torchwatch_')} outside the fleet's spread in {', '.join(modules[:5])}"
