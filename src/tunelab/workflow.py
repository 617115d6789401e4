"""After training: base vs fine-tuned (and few-shot, and the forgetting probe) on the held-out test split.

Writes ``RUN/eval/{base,fewshot,finetuned}`` eval folders, ``RUN/eval/probe/*`` and the comparison report in
``RUN/eval/report``.
"""

from __future__ import annotations

import gc
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.config.schema import TunelabConfig
from tunelab.evaluate.fewshot import with_examples
from tunelab.evaluate.generate import GenerationSettings, load_for_eval
from tunelab.evaluate.metrics.score import scoring_options
from tunelab.evaluate.metrics.select import infer_label_set
from tunelab.evaluate.run_eval import evaluate_model, read_test_records
from tunelab.models.load import weight_dtype
from tunelab.models.methods import finetuned_model, method_quantization

PROBE_RESOURCE = "general_probe.jsonl"


def load_finetuned(config: TunelabConfig, console: Console, **how: Any) -> Any:
    """The fine-tuned column's model. A QLoRA adapter is measured on the k-bit base it was trained against (the
    model it was fitted to), not on the full-precision base; ``tunelab export`` merges into the latter."""
    model_path, adapter_path = finetuned_model(config.method.name, config.model.name_or_path,
                                               config.train.output_path)
    quantization = method_quantization(config.method, weight_dtype(config.model.dtype))
    if quantization is not None:
        console.print(f"fine-tuned column: the base is loaded {config.method.qlora.bits}-bit, as in training")
    return load_for_eval(model_path, adapter_path, label="fine-tuned", quantization=quantization, **how)


def probe_path() -> Path:
    return Path(str(resources.files("tunelab.resources").joinpath(PROBE_RESOURCE)))


def evaluate_after_training(config: TunelabConfig, console: Console,
                            train_records: list | None = None) -> dict[str, Any]:
    """``train_records``: the run's training split when the caller has it (else it is read again from the data)."""
    from tunelab.evaluate.compare import compare_evals

    run_dir = config.train.output_path
    eval_dir = run_dir / "eval"
    test_file = run_dir / "test.jsonl"
    records = read_test_records(str(test_file), config.eval.max_samples)
    settings = GenerationSettings(max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size)
    probe = read_test_records(str(probe_path()), config.eval.probe_max_samples) if config.eval.forgetting_probe else []
    cutoff = config.data.cutoff_len
    how = {"template": config.data.template, "custom_template": config.data.custom_template,
           "dtype": config.model.dtype, "trust_remote_code": config.model.trust_remote_code}

    train_pool = train_records if train_records is not None else _training_pool(config)
    # Label answers are recognised from the training answers too: a test split alone is often too small to
    # show that "shoes" is one of six categories rather than free text.
    label_set = infer_label_set([r.answer or "" for r in (*train_pool, *records)])
    console.print(f"[bold]evaluating[/] on {len(records)} held-out test samples")
    scoring = scoring_options(config.eval.answer_kind, config.eval.exact_match)
    on_task = partial(evaluate_model, settings=settings, cutoff_len=cutoff, label_set=label_set, scoring=scoring,
                      embedder=embedding_scorer(config.eval.embedding_model, console))
    on_probe = partial(evaluate_model, settings=settings, cutoff_len=cutoff)

    dirs = [eval_dir / "base", *([eval_dir / "fewshot"] if config.eval.fewshot_k > 0 else [])]
    probe_dirs = [eval_dir / "probe" / "base"] if probe else []

    def evaluate_base() -> None:
        base = load_for_eval(config.model.name_or_path, label="base", **how)
        on_task(base, records, dirs[0])
        if config.eval.fewshot_k > 0:
            shots = with_examples(records, train_pool, config.eval.fewshot_k, config.data.seed)
            base.label = f"base {config.eval.fewshot_k}-shot"
            on_task(base, shots, dirs[1], cutoff_len=cutoff * 2)  # room for the k examples before the question
        if probe:
            base.label = "base"
            on_probe(base, probe, probe_dirs[0])
        del base
        gc.collect()

    base_columns = [*dirs, *probe_dirs]
    cache = config.eval.base_cache_dir
    if cache is None:
        evaluate_base()
    else:
        key = base_columns_key(config, records, train_pool, probe, label_set)
        reuse_or_fill(Path(cache) / key, eval_dir, base_columns, evaluate_base, console)

    tuned = load_finetuned(config, console, **how)
    dirs.append(eval_dir / "finetuned")
    on_task(tuned, records, dirs[-1])
    if probe:
        probe_dirs.append(eval_dir / "probe" / "finetuned")
        on_probe(tuned, probe, probe_dirs[-1])
    comparison = compare_evals(dirs, eval_dir / "report", probe_dirs=probe_dirs or None)
    console.print(f"[bold]report[/]: {eval_dir / 'report' / 'comparison.md'} (and comparison.html)")
    return comparison


def base_columns_key(config: TunelabConfig, records: list, train_pool: list, probe: list, label_set: Any) -> str:
    """Everything the base model's columns depend on: the base, how it is prompted and scored, and the samples."""
    import hashlib
    import json

    from tunelab import __version__

    def digest(items: list) -> str:
        return hashlib.sha256(json.dumps([r.to_json() for r in items], ensure_ascii=False,
                                         sort_keys=True).encode("utf-8")).hexdigest()

    facts = {
        "tunelab": __version__, "model": config.model.model_dump(mode="json"),
        "template": config.data.template, "custom_template": config.data.model_dump(mode="json")["custom_template"],
        "cutoff": config.data.cutoff_len, "seed": config.data.seed,
        "eval": config.eval.model_dump(mode="json", exclude={"after_training", "base_cache_dir"}),
        "test": digest(records), "probe": digest(probe), "labels": sorted(label_set or []),
        "pool": digest(train_pool) if config.eval.fewshot_k > 0 else None,
        "model_files": _model_fingerprint(config.model.name_or_path),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:20]


def _model_fingerprint(name_or_path: str) -> list:
    """Sizes and modification times of a local model folder's files (a hub id is taken as it is)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return []
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file())


def reuse_or_fill(entry: Path, eval_dir: Path, columns: list[Path], evaluate: Any, console: Console) -> None:
    """Copy the base columns from the cache ``entry`` when it is complete; else evaluate and fill it."""
    import shutil

    relative = [column.relative_to(eval_dir) for column in columns]
    if (entry / "complete").is_file():
        for name in relative:
            shutil.rmtree(eval_dir / name, ignore_errors=True)
            shutil.copytree(entry / name, eval_dir / name)
        console.print(f"base model columns reused from {entry} (same base, test split and eval settings)")
        return
    evaluate()
    partial_entry = entry.with_name(entry.name + ".partial")
    shutil.rmtree(partial_entry, ignore_errors=True)
    for name in relative:
        shutil.copytree(eval_dir / name, partial_entry / name)
    (partial_entry / "complete").write_text("", "utf-8")
    shutil.rmtree(entry, ignore_errors=True)
    partial_entry.rename(entry)


def embedding_scorer(path: str | None, console: Console) -> Any:
    from tunelab.evaluate.metrics.embedding import load_embedding_scorer

    if path is None:
        return None
    scorer, reason = load_embedding_scorer(path)
    if scorer is None:
        console.print(f"embedding_cosine left out: {reason}", markup=False, highlight=False, soft_wrap=True)
    return scorer


def _training_pool(config: TunelabConfig) -> list:
    """Few-shot examples come from the training side of the split only, never from test."""
    from tunelab.data.build import load_splits

    return load_splits(config.data).train
