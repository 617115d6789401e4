"""``tunelab data report|clean|split`` as users run them: a subprocess, its exit code, output and files."""

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

TUNELAB = [sys.executable, "-m", "tunelab.cli"]


def tunelab(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([*TUNELAB, *args], capture_output=True, text=True, timeout=timeout, env=env)


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def rows() -> list:
    data: list = [{"instruction": f"计算 {a} 加 {b}" if a % 2 else f"What is {a} plus {b}?", "input": "",
                   "output": str(a + b)} for a in range(10) for b in range(4)]
    data += [data[0], data[1], {"instruction": "讲个故事", "output": "从前有座山，山里有座庙。" * 6}, '{"broken"']
    return data


def test_report_on_files_writes_three_self_contained_files(tmp_path):
    train = write(tmp_path / "train.jsonl", rows())
    test = write(tmp_path / "test.jsonl", rows()[:3])
    result = tunelab("data", "report", str(train), str(test), "-o", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    assert "46 records; 5 exact and 5 near duplicates removable, 3 leaked into held-out splits, 0 conflict groups" \
        in result.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text("utf-8"))
    assert report["inventory"]["files"][0]["rejected"] == 1
    assert report["inventory"]["files"][0]["reject_examples"][0]["source"] == f"{train}:44"
    assert report["flags"]["loop"]["count"] == 1 and report["leakage"]["by_split"]["test"] == 3
    markdown = (tmp_path / "report" / "report.md").read_text("utf-8")
    for title in ("## Inventory", "## Exact duplicates", "## Near-duplicates", "## Train/test leakage",
                  "## Conflicting answers", "## Diversity", "## Answer quality", "## Length vs cutoff"):
        assert title in markdown
    page = (tmp_path / "report" / "report.html").read_text("utf-8")
    assert "http://" not in page and "https://" not in page and "<script" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "讲个故事" in page


def test_report_on_a_config_with_model_shows_mix_tokens_and_difficulty(tmp_path, tiny_model):
    data = write(tmp_path / "d.jsonl", rows())
    extra = write(tmp_path / "general.jsonl", rows()[10:30])
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: '{tiny_model}'}}\n"
                      f"data: {{datasets: [{{path: '{data}'}}, {{path: '{extra}', weight: 0.5}}], test_size: 6, "
                      "cutoff_len: 40}\n", "utf-8")
    out = tmp_path / "report"
    result = tunelab("data", "report", str(config), "data.seed=3", "-o", str(out), "--difficulty-samples", "10")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text("utf-8"))
    assert [m["path"] for m in report["mix"]] == [str(data), str(extra)]
    # 37 and 14 training records at weights 1 and 0.5 make targets of 34 and 17 of the 51.
    assert [(m["sampling"], m["replacement"]) for m in report["mix"]] == [
        ("without replacement: 34 of 37 records", False),
        ("with replacement (records repeat): every record 1x, plus 3 of 14 drawn without replacement", True)]
    assert report["inventory"]["splits"]["test"] == 12
    tokens = report["lengths"]["tokens"]
    assert tokens["cutoff_len"] == 40 and tokens["truncated"] >= 1
    difficulty = report["difficulty"]
    assert difficulty["scored"] == 10 and sum(difficulty["bins"].values()) == 10
    assert len(difficulty["hardest"]) == 5 and difficulty["hardest"][0]["loss"] >= difficulty["easiest"][0]["loss"]
    markdown = (out / "report.md").read_text("utf-8")
    assert "## Training mix" in markdown and "## Difficulty" in markdown and "exceed cutoff_len 40" in markdown


def test_train_saves_the_mix_the_report_shows(tmp_path, tiny_model):
    data = write(tmp_path / "d.jsonl", rows())
    extra = write(tmp_path / "general.jsonl", rows()[10:30])
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: '{tiny_model}'}}\n"
                      f"data: {{datasets: [{{path: '{data}'}}, {{path: '{extra}', weight: 0.5}}], test_size: 6, "
                      "on_bad_record: skip}\n"
                      f"train: {{output_dir: '{tmp_path / 'run'}', max_steps: 1, report_to: none}}\n", "utf-8")
    trained = tunelab("train", str(config))
    assert trained.returncode == 0, trained.stderr
    saved = json.loads((tmp_path / "run" / "data_mix.json").read_text("utf-8"))
    assert [m["sampling"].split(":")[0] for m in saved] == ["without replacement", "with replacement (records repeat)"]
    # The log at the start of training states it too (rich may wrap the line between words).
    assert re.search(r"without\s+replacement:\s+\d+\s+of\s+\d+\s+records", trained.stderr)
    assert tunelab("data", "report", str(config), "-o", str(tmp_path / "report")).returncode == 0
    shown = json.loads((tmp_path / "report" / "report.json").read_text("utf-8"))["mix"]
    assert shown == saved


def test_clean_and_split_commands(tmp_path):
    data = write(tmp_path / "d.jsonl", rows())
    out = tmp_path / "clean" / "d.jsonl"
    result = tunelab("data", "clean", str(data), "-o", str(out), "--dedup", "--drop-flags", "loop")
    assert result.returncode == 0, result.stderr
    assert "kept 40 of 44 rows; dropped 4" in result.stderr and "exact_duplicate 2" in result.stderr
    kept = out.read_text("utf-8").splitlines()
    rejects = [json.loads(line) for line in (tmp_path / "clean" / "d.rejects.jsonl").read_text("utf-8").splitlines()]
    assert len(kept) == 40 and len(rejects) == 4
    assert sorted(r["reason"].split(":")[0] for r in rejects) == ["exact_duplicate", "exact_duplicate", "flag",
                                                                  "unreadable"]
    split = tunelab("data", "split", str(out), "-o", str(tmp_path / "split"), "--test-size", "0.2",
                    "--val-size", "4")
    assert split.returncode == 0, split.stderr
    counts = {name: len((tmp_path / "split" / f"{name}.jsonl").read_text("utf-8").splitlines())
              for name in ("train", "validation", "test")}
    assert counts == {"train": 28, "validation": 4, "test": 8}
    assert "stratified by label" in split.stderr


def test_clean_and_split_take_a_config(tmp_path):
    data = write(tmp_path / "d.jsonl", rows())
    extra = tmp_path / "extra.json"  # a JSON array, read as a stream like the rest
    extra.write_text(json.dumps([{"instruction": "这条评论是正面还是负面？很好", "output": label}
                                 for label in ("正面", "正面", "负面")], ensure_ascii=False), "utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{datasets: [{{path: '{data}'}}, {{path: '{extra}', weight: 2}}], test_size: 0.25, "
                      "seed: 3}\n", "utf-8")
    out = tmp_path / "clean.jsonl"
    cleaned = tunelab("data", "clean", str(config), "-o", str(out), "--dedup", "--conflicts", "majority")
    assert cleaned.returncode == 0, cleaned.stderr
    assert "kept 42 of 47 rows; dropped 5" in cleaned.stderr
    rejects = (tmp_path / "clean.rejects.jsonl").read_text("utf-8").splitlines()
    reasons = [json.loads(line)["reason"] for line in rejects]
    assert sorted(r.split(":")[0] for r in reasons) == ["conflict_minority", "exact_duplicate", "exact_duplicate",
                                                        "exact_duplicate", "unreadable"]
    assert any(r.endswith(f"kept, first at {extra}:1: '正面'") for r in reasons)
    split = tunelab("data", "split", str(config), "data.seed=4", "-o", str(tmp_path / "split"))
    assert split.returncode == 0, split.stderr
    counts = {name: len((tmp_path / "split" / f"{name}.jsonl").read_text("utf-8").splitlines())
              for name in ("train", "validation", "test")}
    # The config's test_size (0.25 of 46) and val_size (0) are the defaults; whole groups per label can overshoot.
    assert counts["validation"] == 0 and abs(counts["test"] - 12) <= 2 and sum(counts.values()) == 46


def test_bad_arguments_and_missing_files_exit_with_codes(tmp_path):
    data = write(tmp_path / "d.jsonl", rows()[:5])
    missing = tunelab("data", "report", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "r"))
    assert missing.returncode == 1 and f"{tmp_path / 'nope.jsonl'}: file not found" in missing.stderr
    assert tunelab("data", "report", str(data), "-o", "r", "--near-dup-threshold", "1.5").returncode == 2
    nothing = tunelab("data", "clean", str(data), "-o", str(tmp_path / "o.jsonl"))
    assert nothing.returncode == 2 and "nothing to do" in nothing.stderr
    flags = tunelab("data", "clean", str(data), "-o", str(tmp_path / "o.jsonl"), "--drop-flags", "loops")
    assert flags.returncode == 2 and "unknown flag 'loops'" in flags.stderr
    too_big = tunelab("data", "split", str(data), "-o", str(tmp_path / "s"), "--test-size", "5")
    assert too_big.returncode == 2 and "--test-size: 5.0 leaves no training samples out of 5" in too_big.stderr
    for command in ("report", "clean", "split"):
        shown = tunelab("data", command, "--help")
        assert shown.returncode == 0 and f"usage: tunelab data {command}" in shown.stdout


def test_report_on_a_file_without_one_readable_record_lists_its_bad_records(tmp_path):
    bad = write(tmp_path / "bad.jsonl", [{"a": 1}, {"问": "答"}])
    result = tunelab("data", "report", str(bad), "-o", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text("utf-8"))
    assert report["inventory"]["files"][0]["rejected"] == 2
    assert report["diversity"]["topics"]["score"] is None
    assert f"{bad}:2" in (tmp_path / "report" / "report.md").read_text("utf-8")
