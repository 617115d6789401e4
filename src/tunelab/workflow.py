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
from tunelab.models.methods import finetuned_model

PROBE_RESOURCE = "general_probe.jsonl"


def probe_path() -> Path:
    return Path(str(resources.files("tunelab.resources").joinpath(PROBE_RESOURCE)))


def evaluate_after_training(config: TunelabConfig, console: Console) -> dict[str, Any]:
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

    train_pool = _training_pool(config)
    # Label answers are recognised from the training answers too: a test split alone is often too small to
    # show that "shoes" is one of six categories rather than free text.
    label_set = infer_label_set([r.answer or "" for r in (*train_pool, *records)])
    console.print(f"[bold]evaluating[/] on {len(records)} held-out test samples")
    scoring = scoring_options(config.eval.answer_kind, config.eval.exact_match)
    on_task = partial(evaluate_model, settings=settings, cutoff_len=cutoff, label_set=label_set, scoring=scoring,
                      embedder=embedding_scorer(config.eval.embedding_model, console))
    on_probe = partial(evaluate_model, settings=settings, cutoff_len=cutoff)

    base = load_for_eval(config.model.name_or_path, label="base", **how)
    dirs = [eval_dir / "base"]
    on_task(base, records, dirs[0])
    if config.eval.fewshot_k > 0:
        shots = with_examples(records, train_pool, config.eval.fewshot_k, config.data.seed)
        base.label = f"base {config.eval.fewshot_k}-shot"
        dirs.append(eval_dir / "fewshot")
        on_task(base, shots, dirs[-1], cutoff_len=cutoff * 2)  # room for the k examples before the question
    probe_dirs = []
    if probe:
        base.label = "base"
        probe_dirs.append(eval_dir / "probe" / "base")
        on_probe(base, probe, probe_dirs[-1])
    del base
    gc.collect()

    model_path, adapter_path = finetuned_model(config.method.name, config.model.name_or_path, run_dir)
    tuned = load_for_eval(model_path, adapter_path, label="fine-tuned", **how)
    dirs.append(eval_dir / "finetuned")
    on_task(tuned, records, dirs[-1])
    if probe:
        probe_dirs.append(eval_dir / "probe" / "finetuned")
        on_probe(tuned, probe, probe_dirs[-1])
    comparison = compare_evals(dirs, eval_dir / "report", probe_dirs=probe_dirs or None)
    console.print(f"[bold]report[/]: {eval_dir / 'report' / 'comparison.md'} (and comparison.html)")
    return comparison


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
