"""Every code block in README.md and docs/*.md runs as written, or says on purpose that it does not.

A document's ``python`` blocks run in order in one namespace (a later block builds on an earlier
one, as a reader does), in a fresh working directory, with torchwatch's own warnings as errors.
The only code a block does not show is its document's fixture preamble below, and only the serving
guide has one. Blocks in ``bash``, ``promql`` or ``text`` are shell commands or output, and a
``python pseudo-code`` block is a sketch on purpose; each such block is listed here, so none turns
into one silently.
"""

from __future__ import annotations

import pathlib
import re
import sys
import warnings

import pytest

import torchwatch as tw

ROOT = pathlib.Path(__file__).parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
NOT_RUN = {"bash", "promql", "text"}
# (document, first line of the block): sketches that cannot run here, and why
PSEUDO: dict[tuple[str, str], str] = {}

# The serving guide's TorchServe handler runs against a stand-in for TorchServe's BaseHandler
# (TorchServe is not a dependency) with what the handler uses: initialize() loads self.model from
# the model directory; the context names the directory, the model and the request ids.
PREAMBLE = {
    "docs/serving.md": """
import sys
import types

import torch


class BaseHandler:
    def initialize(self, context):
        self.context = context
        self.model = torch.load(context.system_properties["model_dir"] + "/model.pt", weights_only=False).eval()


for name in ("ts", "ts.torch_handler", "ts.torch_handler.base_handler"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["ts.torch_handler.base_handler"].BaseHandler = BaseHandler


def _torchserve_model_dir():
    import torchwatch as tw

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    torch.save(model, "model.pt")
    tw.Manifest.from_model(model).save("model.manifest.json")
    tw.Canary.record(model, torch.randn(4, 8)).save("model.canary.safetensors")
    return types.SimpleNamespace(system_properties={"model_dir": "."}, model_name="ranker",
                                 request_ids={0: "req-1"})
""",
}
# A block that is a whole example file, verbatim, is run by that example's own test instead.
EXAMPLE_TESTS = {"examples/fastapi_server.py": "tests/test_fastapi_recipe.py"}


def blocks(doc: str) -> list[tuple[int, str, str, str]]:
    """(line, language, info, code) of every fenced block of ``doc``, dedented."""
    text = (ROOT / doc).read_text()
    out = []
    for m in FENCE.finditer(text):
        indent = len(m["indent"])
        code = "".join(line[indent:] for line in m["body"].splitlines(keepends=True))
        out.append((text.count("\n", 0, m.start()) + 1, m["lang"], m["info"].strip(), code))
    return out


def test_every_block_is_run_or_marked_on_purpose():
    pseudo_seen = set()
    for doc in DOCS:
        for line, lang, info, code in blocks(doc):
            where = f"{doc}:{line}"
            assert lang, f"{where}: a block without a language; say python, bash, promql or text"
            if lang == "python" and info:
                assert info == "pseudo-code", f"{where}: unknown marker {info!r}"
                key = (doc, code.splitlines()[0])
                assert key in PSEUDO, f"{where} is marked pseudo-code but not listed in PSEUDO with a reason"
                pseudo_seen.add(key)
            else:
                assert lang == "python" or lang in NOT_RUN, f"{where}: language {lang!r} is neither run nor known"
    assert pseudo_seen == set(PSEUDO), "PSEUDO lists blocks that are no longer marked"


@pytest.mark.parametrize("doc", [d for d in DOCS if any(b[1] == "python" and not b[2] for b in blocks(d))])
def test_python_blocks_run_as_written(doc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_block__"}
    watches = []
    real_attach = tw.attach

    def attach(*args, **kwargs):  # remembered so that the test detaches what a block left attached
        watches.append(real_attach(*args, **kwargs))
        return watches[-1]

    monkeypatch.setattr(tw, "attach", attach)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", tw.TorchwatchWarning)
            if doc in PREAMBLE:
                exec(compile(PREAMBLE[doc], f"{doc} (preamble)", "exec"), namespace)
            for line, lang, info, code in blocks(doc):
                if code in EXAMPLES:
                    continue  # run by its own test (EXAMPLE_TESTS)
                if lang == "python" and not info:
                    # padded so that a traceback's line numbers are the document's
                    exec(compile("\n" * line + code, doc, "exec"), namespace)
                    if doc in CHECKS:
                        CHECKS[doc](line, namespace)
    finally:
        for watch in watches:
            watch.detach()
        for name in ("ts", "ts.torch_handler", "ts.torch_handler.base_handler"):
            sys.modules.pop(name, None)
    assert CHECKED.get(doc, set()) <= set(namespace), f"{doc}: checks never ran: {CHECKED[doc] - set(namespace)}"
    assert capsys.readouterr().out or doc not in PRINTS


def _readme(line: int, ns: dict) -> None:
    """What the README's blocks claim, checked after each one."""
    if "snap" in ns and "dense" in ns and "quick" not in ns:
        ns["quick"] = True
        assert ns["dense"].calls == 1 and ns["dense"].nan == 0 and ns["snap"].outputs.rows == 8
        assert not ns["snap"].nonfinite  # "(empty: none did)"
    if "result" in ns and "compared" not in ns:
        ns["compared"] = True
        assert pathlib.Path("v2-vs-v1.jsonl").stat().st_size > 0
    if "ref" in ns and "drift" not in ns:
        ns["drift"] = True
        assert pathlib.Path("pooler-ref.safetensors").exists()
    if "mlp_watch" in ns and "sampled" not in ns:
        ns["sampled"] = True
        assert ns["mlp_watch"].snapshot()["2"].calls == 2  # "2 of the 32 calls were sampled"
    if "report" in ns and "selftested" not in ns:
        ns["selftested"] = True
        assert ns["report"].ok and pathlib.Path("manifest.key").stat().st_mode & 0o777 == 0o600


def _serving(line: int, ns: dict) -> None:
    if "Handler" in ns and "handled" not in ns:
        import torch

        ns["handled"] = True
        handler = ns["Handler"]()
        handler.initialize(ns["_torchserve_model_dir"]())
        out = handler.inference(torch.randn(5, 8))
        assert out.shape == (5, 3) and handler.watch.snapshot()["0"].calls == 1


def _concepts(line: int, ns: dict) -> None:
    if "breaker" in ns and "contained" not in ns:
        ns["contained"] = True
        assert ns["answer"].eq(0).all() and not ns["watch"].healthy


def _rollouts(line: int, ns: dict) -> None:
    """docs/rollouts.md's printed outputs, as the text blocks show them."""
    if "verdict" in ns and "aa" not in ns:
        ns["aa"] = True
        assert ns["verdict"].decision == "promote"
    if "act" in ns and "server" in ns and "rolled_back" not in ns and ns["server"].model is ns["primary"]:
        ns["rolled_back"] = True
        assert ns["rollout"].verdict().metric == "agreement"
    if "share" in ns and "gradual" not in ns:
        ns["gradual"] = True
        assert ns["rollout"].verdict().decision == "promote"


CHECKS = {"README.md": _readme, "docs/serving.md": _serving, "docs/concepts.md": _concepts,
          "docs/rollouts.md": _rollouts}  # fmt: skip
# what each document's checks must have seen: a block renamed or removed fails here, not silently
CHECKED = {"README.md": {"quick", "compared", "drift", "selftested", "sampled"}, "docs/serving.md": {"handled"},
           "docs/concepts.md": {"contained"}, "docs/rollouts.md": {"aa", "rolled_back", "gradual"}}  # fmt: skip
EXAMPLES = {(ROOT / path).read_text(): path for path in EXAMPLE_TESTS}


def test_example_files_shown_whole_are_the_files_and_have_their_test():
    shown = {code for doc in DOCS for _, _, _, code in blocks(doc)}
    for path, test in EXAMPLE_TESTS.items():
        assert (ROOT / path).read_text() in shown, f"no document shows {path} as it is"
        assert path in (ROOT / test).read_text() or pathlib.Path(path).stem in (ROOT / test).read_text()


PRINTS = {"README.md", "docs/concepts.md", "docs/rollouts.md"}
