"""report.json -> report.md and a self-contained report.html (inline CSS, charts as base64 PNG).

Both are rendered from one list of sections (:func:`sections`), so the two formats cannot disagree; Markdown leaves
the charts out. Text from the data goes through ``html.escape`` in HTML and has ``|`` escaped in Markdown tables.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tunelab.report.html import _STYLE  # the comparison report's look, so the two pages match
from tunelab.report.markdown import escape_cell

__all__ = ["Section", "render_html", "render_markdown", "sections"]


@dataclass
class Table:
    header: list[str]
    rows: list[list[Any]]


@dataclass
class Plot:
    draw: Callable[[], bytes | None]
    alt: str


@dataclass
class Section:
    title: str
    blocks: list[str | Table | Plot] = field(default_factory=list)
    level: int = 2


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _num(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:.3f}" if isinstance(value, float) else str(value)


def _example_rows(items: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[item["source"], item["split"], item["prompt"], item["answer"]] for item in items]


_EXAMPLE_HEADER = ["source", "split", "prompt (last user turn)", "answer"]


def sections(report: dict[str, Any]) -> list[Section]:
    out = [_summary(report), _inventory(report)]
    if report.get("mix"):
        out.append(_mix(report["mix"]))
    out += [*_duplicates(report), _leakage(report["leakage"]), _conflicts(report["conflicts"]),
            *_diversity(report["diversity"]), *_flags(report), _lengths(report["lengths"])]
    if report.get("difficulty"):
        out.append(_difficulty(report["difficulty"]))
    return out


def _summary(report: dict[str, Any]) -> Section:
    d, flags = report["duplicates"], report["flags"]
    flagged = ", ".join(f"{name} {f['count']:,}" for name, f in flags.items() if f["count"]) or "none"
    leak = report["leakage"]
    leak_text = (f"{leak['leaked']:,} of {leak['held_out_records']:,} held-out records duplicate a training record"
                 if leak["checked"] else "not checked (no validation/test records beside training records)")
    rows = [
        ["records", _num(report["records"])],
        ["exact duplicates (removable)", _num(d["exact"]["removable"])],
        [f"near-duplicates at {report['settings']['near_dup_threshold']} (removable)", _num(d["near"]["removable"])],
        ["train/test leakage", leak_text],
        ["conflicting answers",
         f"{report['conflicts']['groups']:,} groups, {report['conflicts']['records']:,} records"],
        ["answer flags", flagged],
    ]
    for name, dim in report["diversity"].items():
        rows.append([f"diversity: {name.replace('_', ' ')}", _num(dim["score"])])
    return Section("Summary", [Table(["what", "finding"], rows)], level=2)


def _inventory(report: dict[str, Any]) -> Section:
    inv = report["inventory"]
    files = Table(["file", "split", "format", "records", "bad records"],
                  [[f["path"], f["split"], f["format"], _num(f["records"]), _num(f["rejected"])]
                   for f in inv["files"]])
    blocks: list[str | Table | Plot] = [files]
    bad = [r for f in inv["files"] for r in f["reject_examples"]]
    if bad:
        blocks += ["Bad records (skipped, as `data.on_bad_record: skip` would):",
                   Table(["file:line", "reason"], [[r["source"], r["reason"]] for r in bad])]
    blocks.append("Record kinds: " + ", ".join(f"{k} {v:,}" for k, v in inv["kinds"].items()) +
                  "; splits: " + ", ".join(f"{k} {v:,}" for k, v in inv["splits"].items()) + ".")
    langs = ["zh", "en", "other", "none"]
    blocks.append(Table(["field", *langs], [[field, *(_num(counts.get(lang, 0)) for lang in langs)]
                                             for field, counts in inv["languages"].items() if counts]))
    blocks.append("Language by script: zh when at least 30% of the letters are CJK, en when Latin letters dominate, "
                  "none without letters. Prompt = the last user turn.")
    return Section("Inventory", blocks)


def _mix(mix: list[dict[str, Any]]) -> Section:
    rows = [[m["path"], _num(m["records"]), str(m["weight"]), _num(m["train_available"]), _num(m["train_used"]),
             _pct(m["share"]), m["sampling"]] for m in mix]
    return Section("Training mix", [
        "What training would see with this config (each source split first, then its training part sampled to its "
        "weight's share; saved by training as `data_mix.json`).",
        Table(["source", "records", "weight", "train available", "train used", "share", "sampling"], rows)])


def _duplicates(report: dict[str, Any]) -> list[Section]:
    out = []
    for kind, title in (("exact", "Exact duplicates"), ("near", "Near-duplicates")):
        block = report["duplicates"][kind]
        count = block["groups"] if kind == "exact" else block["clusters"]
        blocks: list[str | Table | Plot] = [
            f"{count:,} groups holding {block['records']:,} records; {block['removable']:,} could be removed "
            f"(all but one per group). Rule: {block['rule']}."]
        for i, group in enumerate(block["examples"], start=1):
            blocks += [f"Group {i}:", Table(_EXAMPLE_HEADER, _example_rows(group))]
        if kind == "near" and block["largest"]:
            sizes: list[int] = block["largest"]
            names = [f"#{i + 1}" for i in range(len(sizes))]
            blocks.append(Plot(partial(_bars_png, names, sizes, "largest near-duplicate clusters", "records"),
                               "sizes of the largest near-duplicate clusters"))
        out.append(Section(title, blocks))
    return out


def _leakage(leak: dict[str, Any]) -> Section:
    if not leak["checked"]:
        return Section("Train/test leakage", [
            "Not checked: the input has no validation/test records beside training records. Give a config with "
            "`val_size`/`test_size`, or files whose names say their split (`*test*`, `*eval*`, `*val*`, `*dev*`)."])
    blocks: list[str | Table | Plot] = [
        f"{leak['leaked']:,} of {leak['held_out_records']:,} held-out records are exact or near duplicates of a "
        f"training record (validation {leak['by_split']['validation']:,}, test {leak['by_split']['test']:,}): "
        "a score on them measures memory, not skill."]
    rows = [[p["held_out"]["source"], p["train"]["source"], p["held_out"]["prompt"], p["train"]["prompt"]]
            for p in leak["examples"]]
    if rows:
        blocks.append(Table(["held-out record", "training record", "held-out prompt", "training prompt"], rows))
    return Section("Train/test leakage", blocks)


def _conflicts(conflicts: dict[str, Any]) -> Section:
    blocks: list[str | Table | Plot] = [
        f"{conflicts['groups']:,} groups of records ({conflicts['records']:,} records) have the same or a near-same "
        f"prompt but different answers; {conflicts['label_groups']:,} of them disagree on a label."]
    for i, group in enumerate(conflicts["examples"], start=1):
        kind = "labels" if group["labels"] else "answers"
        blocks += [f"Group {i} ({group['size']} records, {group['distinct_answers']} distinct {kind}):",
                   Table(_EXAMPLE_HEADER, _example_rows(group["records"]))]
    return Section("Conflicting answers", blocks)


def _diversity(diversity: dict[str, Any]) -> list[Section]:
    rows = [[name.replace("_", " "), dim.get("kind", ""), _num(dim["score"]), dim["computed_from"]]
            for name, dim in diversity.items()]
    task = diversity["task_types"]
    blocks: list[str | Table | Plot] = [
        Table(["dimension", "of", "score (0..1)", "computed from"], rows),
        f"Instructions: distinct-1 {_num(diversity['instructions']['distinct_1'])}, distinct-2 "
        f"{_num(diversity['instructions']['distinct_2'])}"
        + (" (estimated with a KMV sketch, about ±1%)" if diversity["instructions"]["estimated"] else "") + ".",
        f"Task types: {task['distinct_leading_words']:,} distinct leading words, effective number "
        f"{_num(task['effective_number'])}; the 10 most common start {_pct(task['top10_share'])} of instructions.",
    ]
    top = task["top"]
    if top:
        blocks.append(Table(["#", "leading word", "instructions"], [[i + 1, t["word"], _num(t["count"])]
                                                                   for i, t in enumerate(top)]))
        blocks.append(Plot(lambda: _bars_png(_ascii_names([t["word"] for t in top]), [t["count"] for t in top],
                                             "leading words of instructions", "instructions"),
                           "bar chart of the most common leading words"))
    lengths = diversity["answer_lengths"]["bins"]
    blocks.append("Answer lengths (characters): " + ", ".join(f"{k}: {v:,}" for k, v in lengths.items()) + ".")
    if "topics" in diversity:
        blocks += _topic_blocks(diversity["topics"])
    return [Section("Diversity", blocks)]


def _topic_blocks(topics: dict[str, Any]) -> list[str | Table | Plot]:
    if not topics["clusters"]:
        return [f"Topics: not clustered ({topics['computed_from']})."]
    structure = "clusters stand out" if topics["structured"] else "no clusters stand out"
    structure += f" (best silhouette {max(topics['silhouettes'].values()):.2f})"
    structure += f"; mean cosine similarity of two records {topics['cohesion']}"
    blocks: list[str | Table | Plot] = [
        f"Topics (content): {topics['k']} clusters of {topics['sampled']:,} records sampled from {topics['of']:,} "
        f"(seed {topics['seed']}), {structure}; effective number of topics {topics['effective_topics']}. "
        f"k: {topics['k_rule']}.",
        Table(["#", "records", "share", "top terms", "most central record (prompt)"],
              [[i + 1, _num(c["size"]), _pct(c["share"]), " ".join(c["terms"]),
                c["examples"][0]["prompt"] if c["examples"] else ""]
               for i, c in enumerate(topics["clusters"])]),
        Plot(partial(_bars_png, [f"#{i + 1}" for i in range(len(topics["clusters"]))],
                     [c["size"] for c in topics["clusters"]], "topic clusters (sampled records)", "records"),
             "sizes of the topic clusters"),
    ]
    for i, cluster in enumerate(topics["clusters"][:EXAMPLE_TOPICS], start=1):
        blocks += [f"Topic {i} ({' '.join(cluster['terms'][:4])}), records nearest its centre:",
                   Table(_EXAMPLE_HEADER, _example_rows(cluster["examples"]))]
    return blocks


EXAMPLE_TOPICS = 5
"""Topics whose example records are shown in full (report.json holds examples of every topic)."""


def _flags(report: dict[str, Any]) -> list[Section]:
    flags = report["flags"]
    n = report["records"]
    blocks: list[str | Table | Plot] = [
        Table(["flag", "records", "share", "meaning"],
              [[name, _num(f["count"]), _pct(f["count"] / n if n else None), f["meaning"]]
               for name, f in flags.items()]),
        Plot(lambda: _bars_png(list(flags), [f["count"] for f in flags.values()], "answer-quality flags", "records"),
             "bar chart of answer-quality flags")]
    for name, f in flags.items():
        if f["examples"]:
            blocks += [f"Examples of `{name}`:", Table(_EXAMPLE_HEADER, _example_rows(f["examples"]))]
    labels = report["labels"]
    if labels is not None:
        names = list(labels["labels"])
        blocks += [
            f"Answers form a label set ({len(names)} labels, {_pct(labels['share_of_records'])} of records): "
            f"imbalance ratio {labels['imbalance_ratio']}" + (" — **imbalanced**" if labels["imbalanced"] else "")
            + f" ({labels['rule']}).",
            Table(["#", "label", "records"], [[i + 1, k, _num(labels["labels"][k])] for i, k in enumerate(names)][:50]),
            Plot(lambda: _bars_png(_ascii_names(names), list(labels["labels"].values()), "labels", "records"),
                 "bar chart of label counts")]
    return [Section("Answer quality", blocks)]


def _lengths(lengths: dict[str, Any]) -> Section:
    chars = lengths["chars"]
    blocks: list[str | Table | Plot] = [
        Table(["characters", "mean", "p50", "p90", "p99", "max"],
              [[name, *(_num(chars[name][k]) for k in ("mean", "p50", "p90", "p99", "max"))]
               for name in ("prompt", "answer") if chars[name]])]
    tokens = lengths["tokens"]
    if tokens is None:
        blocks.append("Token lengths need a tokenizer: pass `--model PATH` or a config that names a model.")
        blocks.append(Plot(lambda: _histogram_png(chars["histogram"], None, "record length (characters)"),
                           "histogram of record lengths in characters"))
        return Section("Length vs cutoff", blocks)
    blocks += [
        f"With the model's tokenizer and template, exactly as training tokenizes: {tokens['truncated']:,} records "
        f"({_pct(tokens['truncated_share'])}) exceed cutoff_len {tokens['cutoff_len']}; they lose "
        f"{tokens['supervised_tokens_lost']:,} of {tokens['supervised_tokens']:,} supervised tokens "
        f"({_pct(tokens['supervised_lost_share'])}), and {tokens['dropped_no_answer_left']:,} keep no answer at all.",
        Plot(lambda: _histogram_png(tokens["histogram"], tokens["cutoff_len"], "tokens per record"),
             "histogram of token lengths with the cutoff marked"),
        "Longest records:",
        Table(["source", "tokens", "prompt"],
              [[x["source"], _num(x["tokens"]), x["prompt"]] for x in tokens["longest"]]),
    ]
    return Section("Length vs cutoff", blocks)


def _difficulty(difficulty: dict[str, Any]) -> Section:
    if not difficulty.get("scored"):
        return Section("Difficulty", ["No record kept an answer token within the cutoff."])
    bins = difficulty["bins"]
    blocks: list[str | Table | Plot] = [
        f"Reference-answer loss under the base model for {difficulty['scored']:,} records (an even sample of "
        f"{difficulty['sampled_from']:,}); median {difficulty['median_loss']}, mean {difficulty['mean_loss']}. "
        f"Rule: {difficulty['rule']}.",
        Table(["easy", "medium", "hard"], [[_num(bins["easy"]), _num(bins["medium"]), _num(bins["hard"])]]),
        Plot(lambda: _histogram_png(difficulty["histogram"], None, "answer loss (nats/token)"),
             "histogram of answer losses"),
    ]
    for name in ("hardest", "easiest"):
        rows = [[x["source"], x["loss"], x["prompt"], x["answer"]] for x in difficulty[name]]
        blocks += [f"{name.capitalize()}:", Table(["source", "loss", "prompt", "answer"], rows)]
    return Section("Difficulty", blocks)


# -- charts ----------------------------------------------------------------------------------------------------------


def _png(figure: Any) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def _ascii_names(names: Sequence[str]) -> list[str]:
    """Chart fonts may lack CJK glyphs (see tunelab.report.plots): non-ASCII names become ``#N``, the table's row."""
    return [name if name.isascii() and name else f"#{i + 1}" for i, name in enumerate(names)]


def _bars_png(names: Sequence[str], values: Sequence[int], title: str, ylabel: str) -> bytes | None:
    if not names:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(5.0, 0.45 * len(names) + 2), 3.5))
    axes = figure.add_subplot()
    axes.bar(range(len(names)), values, color="#4c72b0")
    axes.set_xticks(range(len(names)), names, rotation=45 if len(names) > 6 else 0, ha="right")
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def _histogram_png(histogram: dict[str, list], cutoff: int | None, xlabel: str) -> bytes | None:
    edges, counts = histogram["edges"], histogram["counts"]
    if not counts:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 3.5))
    axes = figure.add_subplot()
    axes.stairs(counts, edges, fill=True, color="#4c72b0", alpha=0.8)
    if cutoff is not None:
        axes.axvline(cutoff, color="#a4161a", linestyle="--", label=f"cutoff_len {cutoff}")
        axes.legend(fontsize="small")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("records")
    return _png(figure)


# -- the two formats -------------------------------------------------------------------------------------------------


def _md_cell(value: Any) -> str:
    return escape_cell(str(value)).replace("\n", " ")


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Data quality report ({report['records']:,} records)", ""]
    for section in sections(report):
        lines += ["#" * section.level + " " + section.title, ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
                lines.append("")
            elif isinstance(block, str):
                lines += [block, ""]
    lines.append("Charts: see report.html. Every number: report.json.")
    return "\n".join(lines) + "\n"


def _html_block(block: str | Table | Plot) -> str:
    e = html.escape
    if isinstance(block, Table):
        head = "".join(f"<th>{e(h)}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(f'<td class="text">{e(str(c))}</td>' for c in row) + "</tr>"
                       for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Plot):
        png = block.draw()
        if png is None:
            return ""
        data = base64.b64encode(png).decode("ascii")
        return f'<figure><img src="data:image/png;base64,{data}" alt="{e(block.alt)}"></figure>'
    text = e(block)
    # `code` and **bold** as Markdown writes them, after escaping.
    parts = text.split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    text = "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))
    return f"<p>{text}</p>"


def render_html(report: dict[str, Any]) -> str:
    title = f"Data quality report ({report['records']:,} records)"
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections(report):
        body.append(f"<h{section.level}>{html.escape(section.title)}</h{section.level}>")
        body += [_html_block(block) for block in section.blocks]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body>\n</html>\n"
    )
