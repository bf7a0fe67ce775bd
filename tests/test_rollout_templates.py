"""The rollout-controller templates in examples/rollout/: valid against the controllers' schemas,
and their PromQL, run by a real Prometheus scraping real primary/candidate pairs, decides as the
templates say.

Argo Rollouts: validated by the validator generated from Argo Rollouts' CRDs in the npm package
``@kubernetes-models/argo-rollouts`` (``.ci/run`` installs it; the test skips without node or the
package). Flagger publishes its CRDs only in its repository, which CI cannot reach: its
MetricTemplate and the Canary's analysis metrics are checked against the fields, types, enums and
required keys of Flagger's CRD (artifacts/flagger/crd.yaml, v1beta1), written out below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _prometheus import prometheus, wait_until

from torchwatch.fleet.promql import query

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

HERE = Path(__file__).parent
EXAMPLES = HERE.parent / "examples" / "rollout"
NODE_MODULES = os.environ.get("TORCHWATCH_K8S_MODELS", str(HERE.parent / ".ci" / "node" / "node_modules"))

# Flagger's v1beta1 MetricTemplate and Canary analysis metrics, as its CRD defines them
FLAGGER_METRIC_TEMPLATE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "flagger.app/v1beta1"},
        "kind": {"const": "MetricTemplate"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["provider", "query"],
            "properties": {
                "provider": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {
                        "type": {"enum": ["prometheus", "influxdb", "datadog", "externalmetrics", "stackdriver",
                                          "cloudwatch", "newrelic", "graphite", "dynatrace", "keptn", "splunk"]},
                        "address": {"type": "string"},
                        "secretRef": {"type": "object", "required": ["name"]},
                        "region": {"type": "string"},
                        "insecureSkipVerify": {"type": "boolean"},
                    },
                },
                "query": {"type": "string"},
            },
        },
    },
}  # fmt: skip
FLAGGER_CANARY_METRIC = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "interval": {"type": "string", "pattern": "^[0-9]+(m|s)"},
        "threshold": {"type": "number"},
        "thresholdRange": {"type": "object", "properties": {"min": {"type": "number"}, "max": {"type": "number"}}},
        "query": {"type": "string"},
        "templateRef": {"type": "object", "required": ["name"],
                        "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}}},
        "templateVariables": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}  # fmt: skip


def _load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def test_the_argo_analysis_template_is_valid_for_argo_rollouts():
    node = shutil.which("node")
    package = Path(NODE_MODULES) / "@kubernetes-models" / "argo-rollouts"
    if node is None or not package.is_dir():
        pytest.skip("node or @kubernetes-models/argo-rollouts missing (.ci/run installs them)")
    (doc,) = _load("argo-analysistemplate.yaml")
    check = Path(NODE_MODULES).parent / "check_analysis_template.mjs"
    check.write_text(
        'import { AnalysisTemplate } from "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1/AnalysisTemplate";\n'
        'import { readFileSync } from "node:fs";\n'
        "const doc = JSON.parse(readFileSync(0, 'utf8'));\n"
        "try { new AnalysisTemplate(doc).validate(); console.log('valid'); }\n"
        "catch (e) { console.log('invalid: ' + e.message); }\n"
    )  # fmt: skip

    def validate(d: dict) -> str:
        done = subprocess.run([node, str(check)], input=json.dumps(d), capture_output=True, text=True, timeout=60,
                              cwd=check.parent)  # fmt: skip
        return done.stdout.strip() + done.stderr.strip()

    assert validate(doc) == "valid"
    broken = json.loads(json.dumps(doc))
    broken["spec"]["metrics"][0]["provider"]["prometheus"]["query"] = 7  # the validator must be able to fail
    assert validate(broken).startswith("invalid")


def test_the_flagger_templates_have_the_crds_fields_and_types():
    template, canary = _load("flagger-metrictemplate.yaml")
    jsonschema.validate(template, FLAGGER_METRIC_TEMPLATE)
    assert canary["kind"] == "Canary" and canary["apiVersion"] == "flagger.app/v1beta1"
    for metric in canary["spec"]["analysis"]["metrics"]:
        jsonschema.validate(metric, FLAGGER_CANARY_METRIC)
        assert metric["templateRef"]["name"] == template["metadata"]["name"]
    with pytest.raises(jsonschema.ValidationError):  # the schema can fail
        jsonschema.validate({**template, "spec": {"provider": {"type": "nagios"}, "query": "x"}},
                            FLAGGER_METRIC_TEMPLATE)  # fmt: skip


def _argo_outcome(metric: dict, result: list[float]) -> str:
    """Argo's reading of one measurement: its conditions, evaluated as the expressions say."""

    def holds(condition: str) -> bool:
        expr = condition.replace("&&", " and ").replace("||", " or ")
        return bool(eval(expr, {"len": len}, {"result": result}))  # noqa: S307 - our own template's two conditions

    if "failureCondition" in metric and holds(metric["failureCondition"]):
        return "Failed"
    return "Successful" if holds(metric["successCondition"]) else "Inconclusive"


@pytest.mark.xdist_group("heavy")
def test_the_templates_promql_decides_on_a_real_prometheus_scraping_real_pairs(tmp_path):
    pairs = {name: subprocess.Popen([sys.executable, str(HERE / "_rollout_pair.py"), name, kind],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name, kind in (("v2-same", "same"), ("v2-swap", "swap"))}  # fmt: skip
    try:
        ports = [int(p.stdout.readline()) for p in pairs.values()]
        with prometheus(tmp_path, ports) as url:
            wait_until(lambda: len(query(url, "torchwatch_rollout_verdict")) == 2,
                       "Prometheus did not scrape both pairs")  # fmt: skip
            (argo,) = _load("argo-analysistemplate.yaml")
            flagger, canary = _load("flagger-metrictemplate.yaml")
            verdict_metric = argo["spec"]["metrics"][0]
            outcomes = {}
            for name in pairs:
                promql = verdict_metric["provider"]["prometheus"]["query"].replace("{{args.rollout}}", name)
                result = [float(s["value"][1]) for s in query(url, promql)]
                outcomes[name] = _argo_outcome(verdict_metric, result)
                flagger_query = re.sub(r"\{\{ *variables\.rollout *\}\}", name, flagger["spec"]["query"])
                (value,) = [float(s["value"][1]) for s in query(url, flagger_query)]
                bounds = canary["spec"]["analysis"]["metrics"][0]["thresholdRange"]
                outcomes[name + "/flagger"] = "pass" if value >= bounds.get("min", -float("inf")) else "fail"
            assert outcomes == {"v2-same": "Successful", "v2-same/flagger": "pass",
                                "v2-swap": "Failed", "v2-swap/flagger": "fail"}  # fmt: skip
    finally:
        for p in pairs.values():
            p.stdin.close()
            p.wait(60)
