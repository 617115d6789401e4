"""compare_evals: tables, paired deltas, flips, forgetting and the three report files, on hand-made eval folders."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import pytest

from tunelab.errors import DataError, RunError
from tunelab.evaluate.compare import compare_evals, resolve_eval_dirs, run_compare

# One row per test sample: index, kind, prompt, reference. Labels score only ``correct`` (no exact_match), which is
# what flips fall back to.
SAMPLES = [
    (0, "json", "提取姓名：张三，年龄 30", '{"name": "张三"}'),
    (1, "json", "Extract the name | age\nfrom: Bob, 41", '{"name": "Bob"}'),
    (2, "label", "把 <评论> 分类：这家店很好吃", "正面"),
    (3, "label", "Is this spam? WIN A PRIZE", "spam"),
    (4, "text", "翻译：你好", "Hello"),
    (5, "text", "Say hi & bye", "hi"),
]

# Per column: (prediction, right?, char_f1, ref_loss) for each sample above.
BASE = [
    ('{"name": "李四"}', 0, 0.2, 2.0),
    ('{"name": "Bob"}', 1, 0.9, 1.0),
    ("负面", 0, 0.1, 3.0),
    ("spam", 1, 1.0, 0.5),
    ("Hi", 0, 0.3, 2.5),
    ("hi", 1, 1.0, 3.0),
]
# finetuned vs base: wrong->right 0, 2, 4; right->wrong 1.
FINETUNED = [
    ('{"name": "张三"}', 1, 1.0, 1.0),
    ('{"name": "Rob"}', 0, 0.4, 1.5),
    ("正面", 1, 1.0, 1.0),
    ("spam", 1, 1.0, 0.5),
    ("Hello", 1, 1.0, 1.0),
    ("hi", 1, 1.0, 4.0),
]
# fewshot vs base: wrong->right 2; right->wrong 3, 5.
FEWSHOT = [
    ('{"name": "王五"}', 0, 0.25, 2.0),
    ('{"name": "Bob"}', 1, 0.95, 1.0),
    ("正面", 1, 1.0, 1.0),
    ("ham", 0, 0.0, 2.0),
    ("Hey", 0, 0.35, 2.0),
    ("hi and bye and more", 0, 0.6, 3.0),
]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def write_eval(folder: Path, label: str, rows: list[tuple[str, int, float, float]], *, adapter: str | None = None):
    """An eval folder as `tunelab eval` writes it; aggregates are the means of the per-sample scores."""
    folder.mkdir(parents=True)
    predictions = []
    for (index, kind, prompt, reference), (prediction, right, char_f1, loss) in zip(SAMPLES, rows, strict=True):
        scores = {"correct" if kind == "label" else "exact_match": float(right), "char_f1": char_f1}
        predictions.append(
            {
                "index": index,
                "source": f"test.jsonl:{index + 1}",
                "prompt": prompt,
                "reference": reference,
                "prediction": prediction,
                "kind": kind,
                "scores": scores,
                "ref_loss": loss,
            }
        )

    def aggregate(samples: list[dict]) -> dict:
        table: dict = {"n": len(samples)}
        for metric in ("exact_match", "correct", "char_f1"):
            scored = [s["scores"][metric] for s in samples if metric in s["scores"]]
            if scored:
                table[metric] = _mean(scored)
        return table

    groups = {kind: aggregate([p for p in predictions if p["kind"] == kind]) for kind in ("json", "label", "text")}
    groups["label"]["confusion"] = {"spam": {"spam": 1}}  # nested dicts must be skipped, not crash
    loss = _mean([p["ref_loss"] for p in predictions])
    metrics = {
        "label": label,
        "model": "tiny-model",
        "adapter": adapter,
        "n": len(predictions),
        "overall": aggregate(predictions),
        "groups": groups,
        "ref_loss": loss,
        "perplexity": math.exp(loss),
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False), encoding="utf-8")
    lines = [json.dumps(p, ensure_ascii=False) for p in predictions]
    (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_probe(folder: Path, label: str, right: list[int]) -> Path:
    folder.mkdir(parents=True)
    predictions = [
        {
            "index": i,
            "source": f"probe.jsonl:{i + 1}",
            "prompt": f"q{i}",
            "reference": "a",
            "prediction": "a" if r else "b",
            "kind": "text",
            "scores": {"exact_match": float(r)},
            "ref_loss": None,
        }
        for i, r in enumerate(right)
    ]
    metrics = {
        "label": label,
        "model": "tiny-model",
        "adapter": None,
        "n": len(right),
        "overall": {"exact_match": _mean(right), "n": len(right)},
        "groups": {},
        "ref_loss": None,
        "perplexity": None,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (folder / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions), encoding="utf-8")
    return folder


def write_run(root: Path) -> list[Path]:
    """A run folder with three eval folders; the baseline comes first."""
    return [
        write_eval(root / "run" / "eval" / "base", "base", BASE),
        write_eval(root / "run" / "eval" / "finetuned", "finetuned", FINETUNED, adapter="run/adapter"),
        write_eval(root / "run" / "eval" / "fewshot", "fewshot", FEWSHOT),
    ]


@pytest.fixture
def evals(tmp_path: Path) -> list[Path]:
    return write_run(tmp_path)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One comparison shared by the read-only tests below: rendering its charts is most of a test's time."""
    root = tmp_path_factory.mktemp("compare")
    compare_evals(write_run(root), root / "out", seed=0, n_resamples=500)
    return root / "out"


@pytest.fixture
def comparison(out: Path) -> dict:
    return json.loads((out / "comparison.json").read_text(encoding="utf-8"))


def test_metric_table_values_and_deltas(comparison: dict) -> None:
    assert [c["label"] for c in comparison["columns"]] == ["base", "finetuned", "fewshot"]
    assert comparison["baseline"] == "base"
    assert list(comparison["metrics"]) == ["exact_match", "correct", "char_f1", "ref_loss", "perplexity"]

    em = comparison["metrics"]["exact_match"]["columns"]
    # exact_match is scored on the 4 json/text samples: base 2/4, finetuned 3/4, fewshot 1/4.
    assert [em[c]["value"] for c in ("base", "finetuned", "fewshot")] == [0.5, 0.75, 0.25]
    assert [em[c]["n_scored"] for c in ("base", "finetuned", "fewshot")] == [4, 4, 4]
    assert "delta" not in em["base"]
    assert em["finetuned"]["delta"] == pytest.approx(0.25)
    assert em["fewshot"]["delta"] == pytest.approx(-0.25)

    f1 = comparison["metrics"]["char_f1"]["columns"]
    assert f1["base"]["value"] == pytest.approx(3.5 / 6)
    assert f1["finetuned"]["value"] == pytest.approx(5.4 / 6)
    assert f1["finetuned"]["delta"] == pytest.approx(1.9 / 6)
    assert f1["fewshot"]["delta"] == pytest.approx((3.15 - 3.5) / 6)

    loss = comparison["metrics"]["ref_loss"]
    assert loss["higher_is_better"] is False
    assert loss["columns"]["finetuned"]["delta"] == pytest.approx(9.0 / 6 - 12.0 / 6)
    # perplexity has no per-sample scores: a value and a delta, but no intervals.
    ppl = comparison["metrics"]["perplexity"]["columns"]
    assert ppl["base"]["ci"] is None and ppl["finetuned"]["delta_ci"] is None
    assert ppl["finetuned"]["delta"] == pytest.approx(math.exp(1.5) - math.exp(2.0))


def test_intervals_contain_the_mean_and_depend_only_on_the_seed(evals: list[Path], tmp_path: Path) -> None:
    first = compare_evals(evals, tmp_path / "a", seed=0, n_resamples=500)
    again = compare_evals(evals, tmp_path / "b", seed=0, n_resamples=500)
    other = compare_evals(evals, tmp_path / "c", seed=1, n_resamples=500)
    assert first["metrics"] == again["metrics"] and first["groups"] == again["groups"]

    f1 = first["metrics"]["char_f1"]["columns"]
    assert f1["finetuned"]["ci"] != other["metrics"]["char_f1"]["columns"]["finetuned"]["ci"]
    assert f1["finetuned"]["delta_ci"] != other["metrics"]["char_f1"]["columns"]["finetuned"]["delta_ci"]
    for row in first["metrics"].values():
        for cell in row["columns"].values():
            if cell["ci"] is not None:
                assert cell["ci"][0] <= cell["score_mean"] <= cell["ci"][1]
            if cell.get("delta_ci") is not None:
                assert cell["delta_ci"][0] <= cell["delta"] + 1e-12 and cell["delta"] - 1e-12 <= cell["delta_ci"][1]
    assert first["ci_method"] == "percentile bootstrap of the per-sample mean, 500 resamples"


def test_delta_interval_is_paired(evals: list[Path], tmp_path: Path) -> None:
    """A column equal to the baseline plus a constant has a zero-width delta CI only when the resampling is paired."""
    shifted = [(p, r, f1, loss + 0.5) for p, r, f1, loss in BASE]
    folders = [evals[0], write_eval(tmp_path / "shifted", "shifted", shifted)]
    result = compare_evals(folders, tmp_path / "out-paired", n_resamples=200)
    cell = result["metrics"]["ref_loss"]["columns"]["shifted"]
    assert cell["delta_ci"] == pytest.approx([0.5, 0.5])
    assert cell["significant"] is True
    assert cell["ci"][1] - cell["ci"][0] > 0.5


def test_flips_lists_and_counts(comparison: dict) -> None:
    ft = comparison["flips"]["finetuned"]
    assert [f["index"] for f in ft["wrong_to_right"]] == [0, 2, 4]
    assert [f["index"] for f in ft["right_to_wrong"]] == [1]
    assert ft["counts"] == {"wrong_to_right": 3, "right_to_wrong": 1, "unchanged": 2, "compared": 6}
    assert ft["wrong_to_right"][0] == {
        "index": 0,
        "prompt": "提取姓名：张三，年龄 30",
        "reference": '{"name": "张三"}',
        "baseline_prediction": '{"name": "李四"}',
        "prediction": '{"name": "张三"}',
    }
    fs = comparison["flips"]["fewshot"]
    assert [f["index"] for f in fs["wrong_to_right"]] == [2]
    assert [f["index"] for f in fs["right_to_wrong"]] == [3, 5]
    assert fs["counts"] == {"wrong_to_right": 1, "right_to_wrong": 2, "unchanged": 3, "compared": 6}
    assert "base" not in comparison["flips"]


def test_group_tables(comparison: dict) -> None:
    assert list(comparison["groups"]) == ["json", "label", "text"]
    label = comparison["groups"]["label"]
    assert label["n"] == {"base": 2, "finetuned": 2, "fewshot": 2}
    assert list(label["metrics"]) == ["correct", "char_f1"]  # the nested confusion dict is not a metric
    correct = label["metrics"]["correct"]["columns"]
    assert [correct[c]["value"] for c in ("base", "finetuned", "fewshot")] == [0.5, 1.0, 0.5]
    assert correct["finetuned"]["delta"] == pytest.approx(0.5)
    assert correct["base"]["n_scored"] == 2
    text_em = comparison["groups"]["text"]["metrics"]["exact_match"]["columns"]
    assert text_em["fewshot"]["delta"] == pytest.approx(-0.5)


def test_json_file_is_the_returned_dict(evals: list[Path], tmp_path: Path) -> None:
    returned = compare_evals(evals, tmp_path / "out", n_resamples=50)
    text = (tmp_path / "out" / "comparison.json").read_text(encoding="utf-8")
    assert json.loads(text) == returned  # JSON has lists where the dict has lists too: no tuples, no NaN
    assert "张三" in text


def test_markdown_report(out: Path) -> None:
    md = (out / "comparison.md").read_text(encoding="utf-8")
    assert md.startswith("# Comparison: base vs finetuned, fewshot\n")
    row = next(line for line in md.splitlines() if line.startswith("| exact_match |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("0.500 [") and cells[2].startswith("0.750 [") and cells[3].startswith("0.250 [")
    assert cells[4].startswith("+0.250 ↑ [") and cells[5].startswith("-0.250 ↓ [")
    assert "| ref_loss (lower is better) |" in md
    # Flip tables: the pipe and newline in prompt 1 are escaped, and the tag in prompt 2 cannot become HTML.
    assert "Extract the name \\| age<br>from: Bob, 41" in md
    assert "把 &lt;评论&gt; 分类" in md
    assert "3 wrong → right, 1 right → wrong, 2 unchanged" in md
    assert "## Forgetting" not in md and "WARNING" not in md


def test_markdown_truncates_and_caps_flips(tmp_path: Path) -> None:
    long_prompt = "长" * 500
    many = [(i, "text", long_prompt if i == 0 else f"p{i}", "x") for i in range(25)]
    base = tmp_path / "b"
    tuned = tmp_path / "t"
    for folder, label, right in ((base, "base", 0), (tuned, "tuned", 1)):
        folder.mkdir()
        rows = [
            {
                "index": i,
                "prompt": p,
                "reference": r,
                "prediction": "x" if right else "y",
                "kind": k,
                "scores": {"exact_match": float(right)},
            }
            for i, k, p, r in many
        ]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (folder / "metrics.json").write_text(json.dumps({"label": label, "overall": {"exact_match": float(right)}}))
    result = compare_evals([base, tuned], tmp_path / "out", n_resamples=50)
    assert len(result["flips"]["tuned"]["wrong_to_right"]) == 25  # the JSON keeps them all
    md = (tmp_path / "out" / "comparison.md").read_text(encoding="utf-8")
    assert "(first 20 of 25)" in md
    assert "| 19 |" in md and "| 20 |" not in md
    assert "长" * 199 + "…" in md and "长" * 200 not in md


def test_html_is_self_contained_and_escapes_data(out: Path) -> None:
    page = (out / "comparison.html").read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in page
    assert page.count("data:image/png;base64,") == 2  # metric bars and length histogram
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, flags=re.IGNORECASE)
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert html.escape("把 <评论> 分类：这家店很好吃") in page
    assert "把 <评论>" not in page
    assert "提取姓名：张三，年龄 30" in page
    assert "+0.250 ↑" in page


def test_html_charts_name_non_ascii_columns(evals: list[Path], tmp_path: Path) -> None:
    metrics = json.loads((evals[1] / "metrics.json").read_text(encoding="utf-8"))
    metrics["label"] = "微调"
    (evals[1] / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False), encoding="utf-8")
    compare_evals(evals[:2], tmp_path / "out-cjk", n_resamples=50)
    page = (tmp_path / "out-cjk" / "comparison.html").read_text(encoding="utf-8")
    assert "In the chart: column 2 = 微调." in page


@pytest.mark.parametrize(
    ("tuned_right", "threshold", "warns"),
    [
        ([1] * 7 + [0] * 3, 0.05, True),  # 0.8 -> 0.7: a drop of 0.1
        ([1] * 7 + [0] * 3, 0.2, False),
        ([1] * 8 + [0] * 2, 0.05, False),  # no drop
        ([1] * 15 + [0] * 5, 0.05, False),  # 0.8 -> 0.75: exactly the threshold is not past it
        ([1] * 37 + [0] * 13, 0.05, True),  # 0.8 -> 0.74: just past it
    ],
)
def test_forgetting_warning(
    evals: list[Path], tmp_path: Path, tuned_right: list[int], threshold: float, warns: bool
) -> None:
    size = len(tuned_right)
    base_right = [1] * (size * 4 // 5) + [0] * (size - size * 4 // 5)
    probes = [
        write_probe(tmp_path / "probe-base", "base", base_right),
        write_probe(tmp_path / "probe-tuned", "finetuned", tuned_right),
    ]
    result = compare_evals(evals[:2], tmp_path / "out-probe", probe_dirs=probes, forgetting_threshold=threshold)
    forgetting = result["forgetting"]
    assert forgetting["warning"] is warns
    assert forgetting["columns"][0]["drop"] == pytest.approx(0.8 - sum(tuned_right) / size)
    md = (tmp_path / "out-probe" / "comparison.md").read_text(encoding="utf-8")
    page = (tmp_path / "out-probe" / "comparison.html").read_text(encoding="utf-8")
    assert "## Forgetting" in md
    for text in (md, page):
        assert ("WARNING: finetuned forgot general ability" in text) is warns
        assert ("{path: general.jsonl, weight: 0.3}" in text) is warns


def test_run_folder_resolution(evals: list[Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "eval" / "notes").mkdir()  # a folder without metrics.json is not an eval folder
    write_eval(run / "eval" / "a-fewshot", "a-fewshot", FEWSHOT)  # sorts before base, yet base is the baseline
    evals_of_run = [run / "eval" / name for name in ("base", "a-fewshot", "fewshot", "finetuned")]
    assert resolve_eval_dirs([run]) == evals_of_run
    assert resolve_eval_dirs([run / "eval" / "finetuned", str(run / "eval" / "base")]) == [
        run / "eval" / "finetuned",
        run / "eval" / "base",
    ]
    result = compare_evals([run], tmp_path / "out-run", n_resamples=50)
    assert [c["label"] for c in result["columns"]] == ["base", "a-fewshot", "fewshot", "finetuned"]


def test_run_compare_returns_the_markdown(evals: list[Path], tmp_path: Path) -> None:
    md = run_compare([str(tmp_path / "run")], str(tmp_path / "cli-out"), seed=3)
    assert md == tmp_path / "cli-out" / "comparison.md"
    assert md.is_file() and (md.parent / "comparison.html").is_file() and (md.parent / "comparison.json").is_file()
    assert json.loads((md.parent / "comparison.json").read_text(encoding="utf-8"))["seed"] == 3


def test_duplicate_labels_become_distinct_columns(evals: list[Path], tmp_path: Path) -> None:
    result = compare_evals([evals[0], evals[1], evals[1]], tmp_path / "out-dup", n_resamples=50)
    assert [c["label"] for c in result["columns"]] == ["base", "finetuned", "finetuned #2"]
    assert result["flips"]["finetuned #2"]["counts"]["wrong_to_right"] == 3


def test_bad_inputs_name_the_problem(evals: list[Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no eval/ subfolder"):
        resolve_eval_dirs([tmp_path / "empty"])

    with pytest.raises(RunError, match=r"at least two eval folders .* got 1"):
        compare_evals(evals[:1], tmp_path / "x")

    short = tmp_path / "short"
    write_eval(short, "short", BASE)
    lines = (short / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    (short / "predictions.jsonl").write_text("\n".join(lines[:4]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"4 predictions but .* has 6"):
        compare_evals([evals[0], short], tmp_path / "x")

    swapped = tmp_path / "swapped"
    write_eval(swapped, "swapped", BASE)
    (swapped / "predictions.jsonl").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"index: sample 1 has index 1 but .* has 0"):
        compare_evals([evals[0], swapped], tmp_path / "x")

    other_set = tmp_path / "other"  # same count and order, other questions: not comparable
    write_eval(other_set, "other", BASE)
    rows = [json.loads(line) for line in lines]
    rows[2]["reference"] = "另一个答案"
    (other_set / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                 encoding="utf-8")
    with pytest.raises(DataError, match=r"reference: sample 3 has reference '另一个答案' but .* has"):
        compare_evals([evals[0], other_set], tmp_path / "x")

    broken = tmp_path / "broken"
    write_eval(broken, "broken", BASE)
    (broken / "predictions.jsonl").write_text(lines[0] + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"predictions\.jsonl:2: invalid JSON"):
        compare_evals([evals[0], broken], tmp_path / "x")

    (broken / "predictions.jsonl").write_text(lines[0] + '\n{"index": 1, "kind": "text", "scores": {}}\n')
    with pytest.raises(DataError, match=r"predictions\.jsonl:2: prediction: missing or not a str"):
        compare_evals([evals[0], broken], tmp_path / "x")

    (broken / "metrics.json").write_text(json.dumps({"overall": {}}))
    with pytest.raises(DataError, match=r"metrics\.json: label: missing or not a str"):
        compare_evals([evals[0], broken], tmp_path / "x")
