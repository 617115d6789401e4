"""``tunelab data report``: stream the input, compute the findings, write report.json, report.md and report.html."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.quality import findings, topics
from tunelab.data.quality.analyze import Corpus, TokenLengths, analyze_stream, collect_records, record_texts
from tunelab.data.quality.stream import SPLITS, RecordStream, config_stream, files_stream, read_inputs
from tunelab.data.quality.text import normalized
from tunelab.data.record import Record
from tunelab.errors import ConfigError

__all__ = ["DIFFICULTY_SAMPLES", "ReportSettings", "build_report", "open_input", "write_report"]

DIFFICULTY_SAMPLES = 1000
"""Records scored for the difficulty spread (an even sample when there are more): one forward pass each."""
PREVIEW_CHARS = 300
PROGRESS_EVERY = 100_000
"""Records between progress lines on stderr."""


@dataclass
class ReportSettings:
    near_dup_threshold: float = 0.8
    model: str | None = None
    """A model folder or hub id: token lengths with its tokenizer, and difficulty with its weights."""
    cutoff_len: int | None = None
    template: str | None = None
    train_on: str = "all_turns"
    difficulty_samples: int = DIFFICULTY_SAMPLES
    batch_size: int = 8
    seed: int = 0
    """Seeds the topic sample and clustering: the same input and seed give the same topics."""
    topic_sample: int = topics.SAMPLE
    """Records sampled for topic clustering (all when fewer)."""

    def __post_init__(self) -> None:
        if not 0 < self.near_dup_threshold <= 1:
            raise ConfigError(f"--near-dup-threshold: must be in (0, 1], got {self.near_dup_threshold}")


def open_input(inputs: Sequence[str]) -> tuple[RecordStream, Any]:
    """A config (``*.yaml``/``*.yml`` with optional ``key=value`` overrides after it) or data files."""
    sources, config = read_inputs(inputs)
    if config is not None:
        return config_stream(config.data), config
    return files_stream(sources), None


def _settings_from_config(settings: ReportSettings, config: Any) -> ReportSettings:
    if config is None:
        return settings
    return ReportSettings(
        near_dup_threshold=settings.near_dup_threshold,
        model=settings.model or config.model.name_or_path or None,
        cutoff_len=settings.cutoff_len or config.data.cutoff_len,
        template=settings.template or config.data.template,
        train_on=config.data.train_on,
        difficulty_samples=settings.difficulty_samples,
        batch_size=settings.batch_size,
        seed=settings.seed,
        topic_sample=settings.topic_sample,
    )


def _token_lengths(settings: ReportSettings, config: Any) -> TokenLengths | None:
    if settings.model is None:
        return None
    from tunelab.config.schema import DataConfig, ModelConfig
    from tunelab.data.template import build_template
    from tunelab.models.load import add_new_tokens, load_tokenizer

    model_config = config.model if config is not None else ModelConfig(name_or_path=settings.model)
    tokenizer = load_tokenizer(model_config.model_copy(update={"name_or_path": settings.model}))
    add_new_tokens(tokenizer, model_config.new_special_tokens)  # lengths as training counts them
    custom = config.data.custom_template if config is not None else None
    template = build_template(settings.template, tokenizer, custom)
    cutoff = settings.cutoff_len or DataConfig.model_fields["cutoff_len"].default
    settings.cutoff_len = cutoff
    return TokenLengths(template, tokenizer, cutoff, settings.train_on)


def build_report(stream: RecordStream, settings: ReportSettings, config: Any = None,
                 log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Two passes over ``stream``: statistics, then the text of the records the report shows."""
    started = time.perf_counter()
    settings = _settings_from_config(settings, config)
    token_lengths = _token_lengths(settings, config)
    logged = [0]

    def progress(n: int) -> None:
        if n - logged[0] >= PROGRESS_EVERY:
            logged[0] = n
            log(f"read {n:,} records")

    corpus = analyze_stream(stream, token_lengths=token_lengths, progress=progress)
    try:
        report = _findings(corpus, stream, settings)
        shown = _shown_indices(report)
        difficulty_indices = _difficulty_indices(corpus.size, settings)
        sample = topics.sample_indices(corpus.size, settings.seed, settings.topic_sample)
        records = collect_records(stream, shown | set(difficulty_indices) | set(sample))
        report["diversity"]["topics"] = _topics([records[i] for i in sample], sample, corpus.size, settings)
        _attach_examples(report, records, corpus)
        if settings.model is not None and difficulty_indices:
            report["difficulty"] = _difficulty(settings, config, [records[i] for i in difficulty_indices],
                                               difficulty_indices, corpus)
    finally:
        corpus.signatures.close()
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def _findings(corpus: Corpus, stream: RecordStream, settings: ReportSettings) -> dict[str, Any]:
    threshold = settings.near_dup_threshold
    split = corpus.columns["split"]
    exact = findings.exact_groups(corpus)
    near = findings.cluster_near_duplicates(corpus, threshold)
    near_groups = near.members()
    prompts = findings.cluster_near_duplicates(corpus, threshold, part=0,
                                               valid=corpus.columns["prompt_hash"] != 0)
    conflicts = findings.conflicts(corpus, prompts)
    conflicts.pop("all")
    return {
        "records": corpus.size,
        "settings": {"near_dup_threshold": threshold, "shingle_chars": 3, "num_perm": corpus.num_perm,
                     "lsh_bands": near.bands, "lsh_rows": near.rows, "model": settings.model,
                     "cutoff_len": settings.cutoff_len},
        "inventory": {
            "files": [vars(f) for f in stream.files],
            "kinds": dict(corpus.kinds),
            "splits": {name: int((split == i).sum()) for i, name in enumerate(SPLITS) if (split == i).any()},
            "languages": {field: dict(counter.most_common()) for field, counter in corpus.languages.items()},
        },
        "mix": stream.mix or None,
        "duplicates": {
            "exact": {"groups": len(exact), "records": int(sum(g.size for g in exact)),
                      "removable": int(sum(g.size - 1 for g in exact)),
                      "examples": [g[:EXAMPLE_MEMBERS].tolist() for g in exact[: findings.EXAMPLES]],
                      "rule": "prompt and answer equal after folding width, case and whitespace"},
            "near": {"clusters": len(near_groups), "records": int(sum(g.size for g in near_groups)),
                     "removable": int(sum(g.size - 1 for g in near_groups)),
                     "largest": [int(g.size) for g in near_groups[:20]],
                     "examples": [g[:EXAMPLE_MEMBERS].tolist() for g in near_groups[: findings.EXAMPLES]],
                     "candidates": near.candidates, "verified_pairs": near.verified,
                     "rule": f"prompts and answers each with an estimated Jaccard similarity of their 3-character "
                             f"shingles >= {threshold} (MinHash; texts under {findings.MIN_NEAR_CHARS} characters "
                             "must be equal; clusters are transitive; exact duplicates included)"},
        },
        "leakage": findings.leakage(corpus, near),
        "conflicts": conflicts,
        "flags": findings.flag_summary(corpus),
        "labels": findings.label_summary(corpus),
        "diversity": findings.diversity(corpus),
        "lengths": findings.length_summary(corpus, settings.cutoff_len),
        "difficulty": None,
    }


EXAMPLE_MEMBERS = 3
"""Members shown per example cluster."""


def _shown_indices(report: dict[str, Any]) -> set[int]:
    shown: set[int] = set()
    for kind in ("exact", "near"):
        for group in report["duplicates"][kind]["examples"]:
            shown.update(group)
    for pair in report["leakage"]["examples"]:
        shown.update(pair.values())
    for group in report["conflicts"]["examples"]:
        shown.update(group["records"][:EXAMPLE_MEMBERS])
    for flag in report["flags"].values():
        shown.update(flag["examples"])
    tokens = report["lengths"]["tokens"]
    if tokens is not None:
        shown.update(tokens["longest"])
    return shown


def _preview(record: Record, index: int, corpus: Corpus) -> dict[str, Any]:
    _, user, answer = record_texts(record)
    return {"index": index, "source": record.source, "split": SPLITS[int(corpus.columns["split"][index])],
            "prompt": _shorten(user), "answer": _shorten(answer)}


def _shorten(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def _attach_examples(report: dict[str, Any], records: dict[int, Record], corpus: Corpus) -> None:
    """Replace the indices in every ``examples`` list by previews of the records."""
    def show(index: int) -> dict[str, Any]:
        return _preview(records[index], index, corpus)

    for kind in ("exact", "near"):
        block = report["duplicates"][kind]
        block["examples"] = [[show(i) for i in group] for group in block["examples"]]
    report["leakage"]["examples"] = [{k: show(v) for k, v in pair.items()} for pair in report["leakage"]["examples"]]
    for group in report["conflicts"]["examples"]:
        group["size"] = len(group["records"])
        group["records"] = [show(i) for i in group["records"][:EXAMPLE_MEMBERS]]
    for flag in report["flags"].values():
        flag["examples"] = [show(i) for i in flag["examples"]]
    for cluster in report["diversity"]["topics"]["clusters"]:
        cluster["examples"] = [show(i) for i in cluster["examples"]]
    tokens = report["lengths"]["tokens"]
    if tokens is not None:
        tokens["longest"] = [{**show(i), "tokens": int(corpus.columns["tokens"][i])} for i in tokens["longest"]]


def _topics(records: list[Record], sample: list[int], total: int, settings: ReportSettings) -> dict[str, Any]:
    """The content-diversity dimension: topic clusters of the sampled records' prompt + answer."""
    texts = []
    for record in records:
        prompt, _, answer = record_texts(record)
        half = topics.TEXT_CHARS // 2  # a long prompt must not crowd the answer out
        texts.append(normalized(prompt[:half] + "\n" + answer[:half]))
    found = topics.find_topics(texts, settings.seed)
    if found is None:
        return {"score": None, "kind": "content", "clusters": [],
                "computed_from": f"topic clusters need at least {2 * topics.MIN_PER_CLUSTER} records sharing "
                                 f"terms (each in {topics.MIN_DF}+ records); this input has too few"}
    return {"kind": "content", **found.summary(sample, total, settings.seed)}


def _difficulty_indices(size: int, settings: ReportSettings) -> list[int]:
    if settings.model is None or size == 0:
        return []
    count = min(size, settings.difficulty_samples)
    return sorted({int(i) for i in np.linspace(0, size - 1, count).round()})


def _difficulty(settings: ReportSettings, config: Any, records: list[Record], indices: list[int],
                corpus: Corpus) -> dict[str, Any]:
    """Per-sample loss of the reference answer under the model, binned relative to the median.

    easy: below half the median loss; hard: above 1.5x the median; medium: between. Relative bins, because what a
    "high" loss is depends on the model and the tokenizer.
    """
    from tunelab.evaluate.generate import load_for_eval, reference_losses

    assert settings.model is not None
    custom = config.data.custom_template if config is not None else None
    loaded = load_for_eval(settings.model, template=settings.template, custom_template=custom,
                           trust_remote_code=bool(config is not None and config.model.trust_remote_code))
    cutoff = settings.cutoff_len or 1024
    losses = reference_losses(loaded, records, cutoff, settings.batch_size)
    scored = [(loss, i, r) for loss, i, r in zip(losses, indices, records, strict=True) if loss is not None]
    if not scored:
        return {"scored": 0}
    values = np.array([s[0] for s in scored])
    median = float(np.median(values))
    easy, hard = 0.5 * median, 1.5 * median
    bins = {"easy": int((values < easy).sum()), "medium": int(((values >= easy) & (values <= hard)).sum()),
            "hard": int((values > hard).sum())}
    ranked = sorted(scored, key=lambda s: (s[0], s[1]))

    def show(item: tuple[float, int, Record]) -> dict[str, Any]:
        return {**_preview(item[2], item[1], corpus), "loss": round(item[0], 4)}

    counts, edges = np.histogram(values, bins=30)
    return {
        "scored": len(scored), "sampled_from": corpus.size, "median_loss": round(median, 4),
        "mean_loss": round(float(values.mean()), 4),
        "rule": f"mean cross-entropy (nats/token) of the answer; easy < {easy:.3f} (0.5x median) <= medium <= "
                f"{hard:.3f} (1.5x median) < hard",
        "bins": bins, "hardest": [show(s) for s in reversed(ranked[-findings.EXAMPLES:])],
        "easiest": [show(s) for s in ranked[: findings.EXAMPLES]],
        "histogram": {"edges": [round(float(e), 3) for e in edges], "counts": counts.tolist()},
    }


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    from tunelab.data.quality.render import render_html, render_markdown

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(report, ensure_ascii=False, indent=1, default=_plain), "utf-8")
    paths["md"].write_text(render_markdown(report), "utf-8")
    paths["html"].write_text(render_html(report), "utf-8")
    return paths


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)
