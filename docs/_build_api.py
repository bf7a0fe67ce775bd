"""Write docs/api.md from the docstrings of everything torchwatch exports.

python docs/_build_api.py          # rewrite docs/api.md
python docs/_build_api.py --check  # exit 1 if docs/api.md is out of date (tests/test_docs.py)
"""

from __future__ import annotations

import inspect
import pathlib
import sys

import torchwatch as tw

HEADER = """# torchwatch API reference

Generated from the docstrings by `python docs/_build_api.py`; do not edit by hand. Everything
here is importable from `torchwatch` (`import torchwatch as tw`); `tw.rules` is a module.
"""


def _section(name: str, obj: object) -> str:
    if inspect.ismodule(obj):
        parts = [f"## `tw.{name}` (module)\n\n{inspect.cleandoc(obj.__doc__ or '')}\n"]
        for member in getattr(obj, "__all__", []):
            parts.append(_section(f"{name}.{member}", getattr(obj, member)).replace("## ", "### ", 1))
        return "\n".join(parts)
    try:
        signature = str(inspect.signature(obj)) if callable(obj) else ""
    except (TypeError, ValueError):
        signature = ""
    kind = "class" if inspect.isclass(obj) else ("function" if callable(obj) else "constant")
    doc = inspect.cleandoc(obj.__doc__ or "") if kind != "constant" else f"`{obj!r}`"
    head = f"## `tw.{name}{signature}`" if signature else f"## `tw.{name}`"
    text = f"{head}\n\n*{kind}*\n\n```text\n{doc}\n```\n"
    if inspect.isclass(obj):
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not (callable(member) or isinstance(member, property)):
                continue
            target = member.fget if isinstance(member, property) else member
            if not getattr(target, "__doc__", None):
                continue
            try:
                sig = "" if isinstance(member, property) else str(inspect.signature(target))
            except (TypeError, ValueError):
                sig = ""
            text += f"\n### `{name}.{attr}{sig}`\n\n```text\n{inspect.cleandoc(target.__doc__)}\n```\n"
    return text


def build() -> str:
    return HEADER + "\n" + "\n".join(_section(name, getattr(tw, name)) for name in tw.__all__)


def main() -> int:
    path = pathlib.Path(__file__).with_name("api.md")
    text = build()
    if "--check" in sys.argv:
        if not path.exists() or path.read_text() != text:
            print("docs/api.md is out of date: run python docs/_build_api.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
