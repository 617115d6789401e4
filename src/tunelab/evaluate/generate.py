"""Load a model (base, base + adapter, or a run folder) and generate answers in batches.

Several adapters on one base share its weights (:class:`SharedBase`): the base is loaded once, every adapter is
loaded beside it with peft, and one column is active at a time (an adapter, or the base with adapters disabled).

Prompts are encoded by :func:`tunelab.data.tokenize.encode_prompt`, the same code that laid out training
samples, so the fine-tuned model is asked exactly the way it was taught. Batches are left-padded so every row's
answer starts right after its prompt, and ``generate`` uses the KV cache.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from tunelab.config.schema import CustomTemplate, Dtype, ModelConfig, RopeScaling
from tunelab.data.collate import PaddedCollator
from tunelab.data.record import Record
from tunelab.data.template import Template, build_template
from tunelab.data.tokenize import IGNORE_INDEX, encode_prompt, tokenize_record
from tunelab.errors import ConfigError, ModelError
from tunelab.models.load import load_model, load_tokenizer, match_vocabulary
from tunelab.models.methods.prompt import generate_with_virtual_tokens, uses_virtual_tokens


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    template: Template
    label: str
    model_path: str
    adapter_path: str | None


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    """Sampling seed; each batch is seeded with ``seed`` + the index of its first sample, so an evaluation resumed
    at a batch boundary samples the same answers as an uninterrupted one."""

    def describe(self) -> dict[str, Any]:
        """The settings as written to metrics.json (sampling fields only when sampling)."""
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                               "batch_size": self.batch_size, "stop": list(self.stop)}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return out


@dataclass(frozen=True)
class EvalColumn:
    """One model of a multi-model evaluation: the base weights (``adapter is None``) or the base with one adapter.

    ``name`` is the column's label and the name of its eval folder.
    """

    name: str
    adapter: Path | None


BASE_COLUMN = "base"
REPORT_FOLDER = "report"
_COLUMN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def resolve_adapter(path: str | None) -> Path | None:
    """An adapter folder, or a run folder that holds one at its top level."""
    if path is None:
        return None
    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        return folder
    raise ModelError(f"--adapter {path}: no adapter_config.json there (expected an adapter or a LoRA run folder)")


def split_adapter_argument(text: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> ``(NAME, PATH)``; a plain ``PATH`` -> ``(None, PATH)``.

    A folder that exists under the whole text stays a path, so ``--adapter lr=1e-3`` still means that folder.
    """
    name, sep, path = text.partition("=")
    if sep and _COLUMN_NAME.fullmatch(name) and not Path(text).exists():
        return name, path
    return None, text


def eval_columns(adapter_arguments: Sequence[str], base: bool) -> list[EvalColumn]:
    """The columns of a multi-model evaluation: ``base`` first when asked, then one per ``--adapter [NAME=]PATH``.

    An adapter without a name is named after its folder. Names become folder names, so they must be unique, plain
    and neither ``base`` nor ``report``; every adapter folder is checked before any model loads.
    """
    columns = [EvalColumn(BASE_COLUMN, None)] if base else []
    for text in adapter_arguments:
        name, path = split_adapter_argument(text)
        folder = resolve_adapter(path)
        assert folder is not None
        name = name if name is not None else folder.resolve().name
        if not _COLUMN_NAME.fullmatch(name):
            raise ConfigError(f"--adapter {text}: {name!r} cannot name a column folder; use --adapter NAME={path} "
                              "with letters, digits, '_', '-' or '.'")
        if name in (BASE_COLUMN, REPORT_FOLDER):
            raise ConfigError(f"--adapter {text}: the name {name!r} is reserved (for --base and the report); "
                              f"use --adapter NAME={path}")
        if any(c.name == name for c in columns):
            raise ConfigError(f"--adapter {text}: a second column named {name!r}; "
                              "give each its own --adapter NAME=PATH")
        columns.append(EvalColumn(name, folder))
    if not columns:
        raise ConfigError("--adapter/--base: nothing to evaluate; give --base, --adapter NAME=PATH, or both")
    _check_one_peft_type(columns)
    return columns


def _check_one_peft_type(columns: Sequence[EvalColumn]) -> None:
    """peft cannot hold adapters of different types (LoRA and IA3, prefix and prompt tuning) on one model."""
    kinds = {c.name: json.loads((c.adapter / "adapter_config.json").read_text("utf-8")).get("peft_type")
             for c in columns if c.adapter is not None}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{name}: {kind}" for name, kind in kinds.items())
        raise ConfigError(f"--adapter: adapters of different kinds cannot share one base model ({listed}); evaluate "
                          "each kind in its own `tunelab eval`, then `tunelab compare` the eval folders")


def run_template_settings(folder: Path | None) -> tuple[str | None, CustomTemplate | None]:
    """The template a run trained with, read from its saved config.yaml (``(None, None)`` when absent)."""
    if folder is None or not (folder / "config.yaml").is_file():
        return None, None
    data = (yaml.safe_load((folder / "config.yaml").read_text("utf-8")) or {}).get("data", {})
    custom = data.get("custom_template")
    return data.get("template"), CustomTemplate(**custom) if custom else None


def run_rope_scaling(folder: Path | None) -> RopeScaling | None:
    """``model.rope_scaling`` of the run that trained an adapter (its base must be loaded with it), else ``None``."""
    if folder is None or not (folder / "config.yaml").is_file():
        return None
    scaling = (yaml.safe_load((folder / "config.yaml").read_text("utf-8")) or {}).get("model", {}).get("rope_scaling")
    return RopeScaling(**scaling) if scaling else None


def load_for_eval(
    model_path: str, adapter: str | None = None, *, template: str | None = None, dtype: Dtype = "auto",
    label: str | None = None, trust_remote_code: bool = False, custom_template: CustomTemplate | None = None,
    quantization: Any = None,
) -> LoadedModel:
    """A model (plus adapter) ready to generate; ``quantization`` (a BitsAndBytesConfig) loads the base k-bit."""
    adapter_dir = resolve_adapter(adapter)
    model_dir = Path(model_path)
    config = ModelConfig(name_or_path=model_path, dtype=dtype, trust_remote_code=trust_remote_code,
                         rope_scaling=run_rope_scaling(adapter_dir))
    tokenizer = _load_column_tokenizer(config, adapter_dir)
    # An adapter trained with model.new_special_tokens expects the grown vocabulary (its tokenizer has it).
    model = match_vocabulary(load_model(config, quantization=quantization), tokenizer)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        template=_column_template(template, custom_template, adapter_dir or _run_folder(model_path), tokenizer),
        label=label or (adapter_dir.name if adapter_dir else model_dir.name or model_path),
        model_path=model_path,
        adapter_path=str(adapter_dir) if adapter_dir else None,
    )


def _run_folder(model_path: str) -> Path | None:
    return Path(model_path) if Path(model_path).is_dir() else None


def _load_column_tokenizer(config: ModelConfig, adapter_dir: Path | None) -> Any:
    """The tokenizer saved with the adapter (a run folder saves the one it trained with), else the base's."""
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(config.model_copy(update={"name_or_path": str(adapter_dir)}))
    return load_tokenizer(config)


def _column_template(
    template: str | None, custom_template: CustomTemplate | None, run_folder: Path | None, tokenizer: Any
) -> Template:
    """``--template`` when given, else the template the run trained with (its config.yaml), else the tokenizer's."""
    run_name, run_custom = run_template_settings(run_folder)
    return build_template(template if template is not None else run_name, tokenizer, custom_template or run_custom)


class SharedBase:
    """One base model with several adapters loaded beside each other; :meth:`activate` switches between columns.

    The base weights are loaded once: the first adapter wraps the model in a ``PeftModel``, the others are added with
    ``load_adapter``. The base column runs with every adapter disabled (``disable_adapter``), which computes exactly
    the base model's outputs. Each column keeps its own tokenizer and template (a run folder decides its own).
    """

    def __init__(
        self, model_path: str, columns: Sequence[EvalColumn], *, template: str | None = None, dtype: Dtype = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        config = ModelConfig(name_or_path=model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        # Tokenizers and templates first: a bad template fails before the weights load.
        self.columns = {c.name: self._column(c, config, template, model_path) for c in columns}
        model = load_model(config)
        widest = max(self.columns.values(), key=lambda loaded: len(loaded.tokenizer)).tokenizer
        model = match_vocabulary(model, widest)
        self.adapter_names: dict[str, str] = {}
        for column in columns:
            if column.adapter is not None:
                model = self._add_adapter(model, column)
        model.eval()
        self.model = model
        for loaded in self.columns.values():
            loaded.model = model

    @staticmethod
    def _column(column: EvalColumn, config: ModelConfig, template: str | None, model_path: str) -> LoadedModel:
        tokenizer = _load_column_tokenizer(config, column.adapter)
        return LoadedModel(
            model=None,
            tokenizer=tokenizer,
            template=_column_template(template, None, column.adapter or _run_folder(model_path), tokenizer),
            label=column.name,
            model_path=model_path,
            adapter_path=str(column.adapter) if column.adapter else None,
        )

    def _add_adapter(self, model: Any, column: EvalColumn) -> Any:
        from peft import PeftModel

        # peft keys modules by adapter name and forbids '.', so the user's name stays a label only.
        peft_name = f"column_{len(self.adapter_names)}"
        try:
            if not self.adapter_names:
                model = PeftModel.from_pretrained(model, str(column.adapter), adapter_name=peft_name)
            else:
                model.load_adapter(str(column.adapter), adapter_name=peft_name)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"--adapter {column.name}={column.adapter}: cannot load it onto the base model "
                             f"(trained on another base?): {type(exc).__name__}: {exc}") from None
        self.adapter_names[column.name] = peft_name
        return model

    @contextmanager
    def activate(self, name: str) -> Iterator[LoadedModel]:
        """The column ``name`` ready to generate: its adapter active, or every adapter disabled for the base."""
        loaded = self.columns[name]
        if loaded.adapter_path is None:
            context = self.model.disable_adapter() if self.adapter_names else nullcontext()
        else:
            self.model.set_adapter(self.adapter_names[name])
            context = nullcontext()
        with context:
            yield loaded


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def stop_token_ids(loaded: LoadedModel, extra_stops: Sequence[str] = ()) -> list[int]:
    """EOS plus every stop string that is a single token (e.g. <|im_end|>), so generation ends at the turn's end."""
    ids = {loaded.tokenizer.eos_token_id} if loaded.tokenizer.eos_token_id is not None else set()
    for text in (*loaded.template.stop_strings, *extra_stops):
        encoded = loaded.tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(ids)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate_answers(
    loaded: LoadedModel, prompts: Sequence[Record], settings: GenerationSettings, *, desc: str = "generate",
    first_index: int = 0,
) -> Iterator[tuple[int, str]]:
    """Yield ``(index, answer)`` for each prompt record (its final answer, if any, is not shown to the model).

    ``first_index`` is the position of ``prompts[0]`` in the whole test set (it seeds sampling batches).
    """
    tokenizer = loaded.tokenizer
    model = loaded.model
    stops = tuple(settings.stop) + loaded.template.stop_strings
    eos_ids = stop_token_ids(loaded, settings.stop)
    # Stop strings longer than one token end generation through transformers' StopStringCriteria; the answer is
    # cut at the stop string below either way.
    long_stops = [s for s in settings.stop if s and len(tokenizer.encode(s, add_special_tokens=False)) > 1]
    stop_kwargs = {"stop_strings": long_stops, "tokenizer": tokenizer} if long_stops else {}
    collator = PaddedCollator(pad_token_id=tokenizer.pad_token_id, padding_side="left")
    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts), desc=desc, unit="sample", dynamic_ncols=True)
    index = 0
    for batch in _batches(prompts, settings.batch_size):
        features = [{"input_ids": encode_prompt(loaded.template, tokenizer, r.system, r.prompt_turns)} for r in batch]
        inputs = collator(features)
        if settings.do_sample:
            torch.manual_seed(settings.seed + first_index + index)
        # Prompt-learning adapters generate through their own path (see tunelab.models.methods.prompt).
        generate = partial(generate_with_virtual_tokens, model) if uses_virtual_tokens(model) else model.generate
        output = generate(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            temperature=settings.temperature if settings.do_sample else None,
            top_p=settings.top_p if settings.do_sample else None,
            eos_token_id=eos_ids or None,
            pad_token_id=tokenizer.pad_token_id,
            **stop_kwargs,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        for row in new_tokens:
            text = tokenizer.decode(row, skip_special_tokens=False)
            text, _ = cut_at_stop(text, stops + (tokenizer.pad_token or "",))
            yield index, text.strip()
            index += 1
        bar.update(len(batch))
    bar.close()


@torch.no_grad()
def reference_losses(
    loaded: LoadedModel, records: Sequence[Record], cutoff_len: int, batch_size: int
) -> list[float | None]:
    """Mean cross-entropy (nats/token) of each record's final answer given its prompt; ``None`` if nothing is left."""
    tokenizer = loaded.tokenizer
    model = loaded.model
    device = next(model.parameters()).device
    collator = PaddedCollator(pad_token_id=tokenizer.pad_token_id)
    out: list[float | None] = []
    for batch in _batches(records, batch_size):
        examples = [tokenize_record(r, loaded.template, tokenizer, cutoff_len, "last_turn") for r in batch]
        kept = [e for e in examples if e is not None]
        losses = iter(_per_sample_loss(model, collator, kept, device) if kept else [])
        out.extend(next(losses) if e is not None else None for e in examples)
    return out


def _per_sample_loss(model: Any, collator: PaddedCollator, examples: list, device: Any) -> list[float]:
    batch = collator([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    # Prompt and P-tuning adapters also return logits for their virtual tokens, in front: keep the inputs' own.
    logits = logits[:, -batch["input_ids"].shape[1] :]
    labels = batch["labels"].to(device)[:, 1:]
    logits = logits[:, :-1].float()
    token_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return [float(v) for v in (token_loss.sum(dim=1) / counts).tolist()]


def mean_loss(losses: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(mean reference loss, its perplexity) over the samples that have one."""
    values = [v for v in losses if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, math.exp(min(mean, 50.0))
