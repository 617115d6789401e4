"""docs/config.md is generated from the schema: it must match it and cover every field."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from tunelab.config.docs import render_config_docs
from tunelab.config.schema import TunelabConfig

DOCS_PATH = Path(__file__).parents[2] / "docs" / "config.md"


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _leaf_fields(model: type[BaseModel] = TunelabConfig, prefix: str = "") -> dict[str, object]:
    """Every non-section field of the schema by dotted key (``[]`` for list items), walked independently of docs.py."""
    leaves: dict[str, object] = {}
    for name, info in model.model_fields.items():
        inner = _models_in(info.annotation)
        if not inner:
            leaves[prefix + name] = info
            continue
        is_list = typing.get_origin(info.annotation) is list
        leaves.update(_leaf_fields(inner[0], f"{prefix}{name}{'[]' if is_list else ''}."))
    return leaves


LEAVES = _leaf_fields()


def _field_block(docs: str, key: str) -> str:
    """The text documenting ``key``: from its heading to the next heading."""
    heading = f"### `{key}`\n"
    assert heading in docs, f"{key} is not documented in docs/config.md"
    return docs.split(heading, 1)[1].split("\n#", 1)[0]


def test_committed_docs_match_the_schema():
    rendered = render_config_docs()
    committed = DOCS_PATH.read_text(encoding="utf-8") if DOCS_PATH.is_file() else ""
    assert committed == rendered, "docs/config.md is out of date with the schema: run python scripts/gen_config_docs.py"


def test_rendering_is_deterministic():
    assert render_config_docs() == render_config_docs()


def test_the_walk_covers_nested_sections_and_list_items():
    # Guards the test's own walker: if it stopped descending, the per-field tests below would check too little.
    for key in (
        "model.dtype",
        "data.datasets[].path",
        "data.custom_template.assistant",
        "method.lora.rank",
        "method.freeze.trainable_layers",
        "train.max_steps",
        "eval.fewshot_k",
    ):
        assert key in LEAVES


@pytest.mark.parametrize("key", sorted(LEAVES))
def test_every_leaf_field_is_documented(key: str):
    _field_block(render_config_docs(), key)


@pytest.mark.parametrize("key", sorted(k for k, f in LEAVES.items() if f.description))  # type: ignore[attr-defined]
def test_field_docstrings_are_shown(key: str):
    block = _field_block(render_config_docs(), key)
    description = inspect.cleandoc(LEAVES[key].description).replace("``", "`")  # type: ignore[attr-defined]
    assert description in block


def test_literal_fields_list_all_choices():
    docs = render_config_docs()
    block = _field_block(docs, "data.datasets[].format")
    assert "`auto | alpaca | sharegpt | messages | text | preference`" in block
    literal_keys = [k for k, f in LEAVES.items() if typing.get_origin(f.annotation) is typing.Literal]  # type: ignore[attr-defined]
    assert "train.lr_scheduler_type" in literal_keys
    for key in literal_keys:
        choices = typing.get_args(LEAVES[key].annotation)  # type: ignore[attr-defined]
        assert f"`{' | '.join(str(c) for c in choices)}`" in _field_block(docs, key), key  # qlora.bits: 4 | 8


def test_types_defaults_and_constraints_read_plainly():
    docs = render_config_docs()
    assert "- Type: integer\n- Default: `8`\n- Constraints: >= 1\n" in _field_block(docs, "method.lora.rank")
    assert "- Constraints: >= 0, < 1\n" in _field_block(docs, "method.lora.dropout")
    assert "- Type: `all-linear` or list of strings\n" in _field_block(docs, "method.lora.target_modules")
    assert "- Type: `sdpa | eager | flash_attention_2` or null\n- Default: `null`\n" in _field_block(
        docs, "model.attn_implementation"
    )
    assert "- Default: *required*\n" in _field_block(docs, "data.datasets[].path")
    assert "- Default: `[]`\n" in _field_block(docs, "data.datasets")


def test_section_docstrings_appear_under_their_heading():
    docs = render_config_docs()
    section = docs.split("\n## `data.custom_template`\n", 1)[1].split("\n### ", 1)[0]
    assert "A prompt format written out as strings; `{content}` marks where a turn's text goes." in section


def test_intro_says_how_to_regenerate_and_override():
    intro = render_config_docs().split("\n## ", 1)[0]
    assert "python scripts/gen_config_docs.py" in intro
    assert "tunelab train CONFIG.yaml train.max_steps=50" in intro


def test_a_constrained_member_of_a_union_reads_as_its_type_and_bounds():
    from typing import Annotated, Literal

    from pydantic import Field

    from tunelab.config.docs import _describe_type

    assert _describe_type(Literal["auto"] | Annotated[int, Field(ge=1)]) == "`auto` or integer (>= 1)"
