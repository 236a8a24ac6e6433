"""The configuration reference, generated from the config dataclasses and their field comments.

    python -m piccolo_jax.config.reference             # print the Markdown tables
    python -m piccolo_jax.config.reference README.md   # rewrite the block between the markers in place

Each field's description is its comment in the source: the `# ...` at the end of its line, or the
comment lines right above it. The README carries the output between `<!-- config-reference -->` markers,
and a test fails when it is stale.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path

from piccolo_jax.config import TrainConfig

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
_FIELD = re.compile(r"^\s{4}(\w+): [^=]+?(?:= .*?)?(?:\s+#\s?(.*))?$")


def field_comments(cls) -> dict[str, str]:
    """field name -> its comment (end-of-line, else the comment block above it)."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = _FIELD.match(line)
        if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
            out[match.group(1)] = " ".join(p for p in (*above, match.group(2) or "") if p)
        above = []
    return out


def _type_name(tp) -> str:
    text = str(tp).replace("typing.", "")
    return getattr(tp, "__name__", text) if not typing.get_args(tp) else text


def _default(field: dataclasses.Field) -> str:
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return "`" + repr(value).replace("|", "\\|") + "`"


def render() -> str:
    hints = typing.get_type_hints(TrainConfig)
    sections = [(None, TrainConfig)] + [(f.name, hints[f.name]) for f in dataclasses.fields(TrainConfig)
                                        if dataclasses.is_dataclass(hints[f.name])]
    lines = []
    for name, cls in sections:
        comments = field_comments(cls)
        cls_hints = typing.get_type_hints(cls)
        title = "top level" if name is None else f"[{name}]"
        lines += [f"**{title}** — {inspect.getdoc(cls).splitlines()[0]}", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if name is None and dataclasses.is_dataclass(cls_hints[f.name]):
                continue
            key = f.name if name is None else f"{name}.{f.name}"
            doc = comments.get(f.name, "").replace("|", "\\|")
            kind = _type_name(cls_hints[f.name]).replace("|", "\\|")
            lines.append(f"| `{key}` | {kind} | {_default(f)} | {doc} |")
        lines.append("")
    return "\n".join(lines)


def update(path: Path) -> bool:
    """Rewrite the marked block of `path`; True when it changed."""
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}{END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(f"{sys.argv[1]}: {'updated' if update(Path(sys.argv[1])) else 'up to date'}")
    else:
        print(render())
