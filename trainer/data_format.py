"""Renders the schema tables of docs/data_format.md from `schema.py` and, for `ctr`, the default
feature spec (`trainer/ctr/specs/synthetic.yaml`) (`make docs`).

Usage: python -m trainer.data_format docs/data_format.md
The text between the BEGIN/END markers is replaced; a test fails when it is out of date.
"""
from __future__ import annotations

import sys

from trainer.ctr import spec as ctr_spec
from trainer.data import schema

BEGIN = "<!-- BEGIN GENERATED SCHEMA (make docs) -->"
END = "<!-- END GENERATED SCHEMA -->"


def _shape(f: schema.FeatureSpec) -> str:
    if not f.is_list:
        return "1 value"
    keep = {"head": "first", "tail": "latest", "reject": "error if more"}[f.keep]
    return f"{f.min_len}..{f.max_len} values ({keep} {f.max_len} kept)" if f.keep != "reject" \
        else f"{f.min_len}..{f.max_len} values (more is an error)"


def _rules(f: schema.FeatureSpec) -> str:
    rules = []
    rules.append("required" if f.required else
                 (f"optional (default {f.default!r})" if f.default is not None else "optional"))
    if f.min_value is not None and f.max_value is not None:
        rules.append(f"in [{f.min_value:g}, {f.max_value:g}]")
    elif f.min_value is not None:
        rules.append(f">= {f.min_value:g}")
    if f.dtype == schema.FLOAT:
        rules.append("finite")
    if f.image:
        rules.append("JPEG/PNG/GIF/BMP")
    if f.same_length_as:
        rules.append(f"same length as `{f.same_length_as}`")
    return ", ".join(rules)


def render_tables() -> str:
    out = []
    for kind in map(ctr_spec.record_kind, schema.KIND_NAMES):
        out.append(f"### `{kind.name}`\n\n{kind.doc}\n")
        out.append("| feature | type | values | rules | meaning |")
        out.append("| --- | --- | --- | --- | --- |")
        for f in kind.features:
            list_type = {"int64": "int64_list", "float32": "float_list", "bytes": "bytes_list"}
            out.append(f"| `{f.name}` | {list_type[f.dtype]} | {_shape(f)} | {_rules(f)} | "
                       f"{f.doc} |")
        if kind.joinable_images:
            joins = ", ".join(f"`{img}` by `{ids}`" for img, ids in kind.joinable_images.items())
            out.append(f"\nJoined from the catalog when absent: {joins}.")
        out.append("")
    return "\n".join(out)


def update(path: str) -> bool:
    """Rewrites the generated section of `path`; True if it changed."""
    with open(path) as f:
        text = f.read()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render_tables()}{END}{tail}"
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":
    print("updated" if update(sys.argv[1]) else "up to date", sys.argv[1])
