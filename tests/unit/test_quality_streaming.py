"""Every input layout is streamed and gives the same report; a config's streamed splits and mix are training's."""

import json
import random
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tunelab.config.schema import DataConfig
from tunelab.data.build import load_splits
from tunelab.data.quality.report import ReportSettings, build_report, open_input
from tunelab.data.quality.stream import config_stream
from tunelab.data.readers import files as readers
from tunelab.data.readers import read_rows
from tunelab.errors import DataError


def crafted_rows() -> list[dict]:
    """zh/en Alpaca rows with an exact and a near duplicate, a conflict, a loop and one row without an answer."""
    rng = random.Random(11)
    rows = []
    for i in range(24):
        if i % 2:
            text = "".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(50))
            rows.append({"instruction": f"请解释第{i}个概念：{text[:12]}", "input": "", "output": text + "。"})
        else:
            words = " ".join(f"w{rng.randrange(10**5)}" for _ in range(14))
            rows.append({"instruction": f"Explain concept {i}: {words[:30]}", "input": "", "output": words + "."})
    rows += [dict(rows[3]), dict(rows[4], output=rows[4]["output"][:-1] + "!"),
             {"instruction": "这条评论是正面还是负面？很好用", "input": "", "output": "正面"},
             {"instruction": "这条评论是正面还是负面？很好用", "input": "", "output": "负面"},
             {"instruction": "Tell me a story.", "input": "", "output": "I went home. " * 8},
             {"instruction": "An instruction without an answer", "input": ""}]
    return rows


def write_layouts(folder: Path, rows: list[dict]) -> dict[str, Path]:
    paths = {}
    paths["jsonl"] = folder / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    # A JSON array with one element per line after a two-line element, so lines and indices differ.
    paths["json"] = folder / "d.json"
    paths["json"].write_text("[\n" + json.dumps(rows[0], ensure_ascii=False, indent=1) + ",\n"
                             + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows[1:]) + "\n]\n", "utf-8")
    frame = pd.DataFrame(rows, columns=["instruction", "input", "output"])
    paths["csv"] = folder / "d.csv"
    frame.to_csv(paths["csv"], index=False, encoding="utf-8")
    paths["parquet"] = folder / "d.parquet"
    frame.to_parquet(paths["parquet"])
    return paths


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    """The report without what names the file: paths, formats, ``file:line`` sources and the timing."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("source", "path", "format", "seconds")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(json.dumps(report, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))))


def report_of(*inputs: str) -> dict[str, Any]:
    stream, config = open_input(list(inputs))
    return build_report(stream, ReportSettings(), config)


def test_json_array_csv_and_parquet_give_the_jsonl_report(tmp_path):
    rows = crafted_rows()
    paths = write_layouts(tmp_path, rows)
    reports = {layout: report_of(str(path)) for layout, path in paths.items()}
    expected = comparable(reports["jsonl"])
    assert expected["duplicates"]["exact"]["removable"] == 1 and expected["duplicates"]["near"]["removable"] == 2
    assert expected["conflicts"]["groups"] == 1 and expected["flags"]["loop"]["count"] == 1
    for layout in ("json", "csv", "parquet"):
        assert comparable(reports[layout]) == expected, layout
    # The bad row (the 30th) is named by the line it starts on: in the array, 1 for "[", 2 to 6 for the first
    # element (indented, 5 lines), then one line each, so the 30th starts on line 35; in the CSV, the header is 1.
    reasons = {layout: r["inventory"]["files"][0]["reject_examples"] for layout, r in reports.items()}
    assert reasons["jsonl"] == [{"source": f"{paths['jsonl']}:30", "reason": "output: missing"}]
    assert reasons["json"] == [{"source": f"{paths['json']}:35", "reason": "output: missing"}]
    assert reasons["csv"] == [{"source": f"{paths['csv']}:31", "reason": "output: missing"}]
    assert reasons["parquet"] == [{"source": f"{paths['parquet']}:30", "reason": "output: missing"}]


def test_json_array_reads_the_same_through_any_window(tmp_path, monkeypatch):
    """Values cut by the end of the reading window (numbers, escapes, CJK, nested arrays) are read whole."""
    rng = random.Random(5)
    rows = [{"text": "".join(rng.choice('ab 你好\n"\\\u2028é') for _ in range(rng.randint(1, 30))),
             "n": rng.randint(-10**6, 10**6), "x": [True, None, 1.5e3, {"k": "v"}]} for _ in range(60)]
    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=bool(i % 2), indent=2 if i % 3 == 0 else None)
                                       for i, r in enumerate(rows)) + "\n]\n", "utf-8")
    whole = list(read_rows(path))
    assert [row for _, row in whole] == rows
    for window in (1, 2, 7, 64):
        monkeypatch.setattr(readers, "_WINDOW_CHARS", window)
        assert list(read_rows(path)) == whole, window
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"text": "a"},\n {"text": "b" "c"}\n]\n', "utf-8")
    for window in (1, 5, 64, 1 << 20):
        monkeypatch.setattr(readers, "_WINDOW_CHARS", window)
        with pytest.raises(DataError, match=r"broken.json:3: -: invalid JSON: Expecting ',' delimiter \(column 15\)"):
            list(read_rows(broken))


def test_json_array_is_not_read_whole(tmp_path, monkeypatch):
    """The reader asks for its window at a time, never for the rest of the file."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": f"row {i} " + "x" * 50} for i in range(2000)]), "utf-8")
    sizes = []

    class Spy:
        def __init__(self, handle):
            self.handle = handle

        def read(self, size=-1):
            sizes.append(size)
            return self.handle.read(size)

    original = readers._JsonWindow.__init__
    monkeypatch.setattr(readers._JsonWindow, "__init__", lambda self, handle, name: original(self, Spy(handle), name))
    monkeypatch.setattr(readers, "_WINDOW_CHARS", 4096)
    assert sum(1 for _ in read_rows(path)) == 2000
    assert len(sizes) > 30 and max(sizes) == 4096 and -1 not in sizes


def unique_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"Q{seed}-{i} " + " ".join(f"w{rng.randrange(10**6)}" for _ in range(6)),
             "output": f"A{seed}-{i} " + " ".join(f"a{rng.randrange(10**6)}" for _ in range(6))} for i in range(n)]


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 0.2, 3.0)])
def test_config_stream_splits_and_mixes_exactly_as_training(tmp_path, weights):
    sources = []
    for i, (n, layout) in enumerate(((120, "jsonl"), (80, "json"), (30, "csv"))):
        rows = unique_rows(n, i)
        path = write_layouts(tmp_path, rows)[layout].rename(tmp_path / f"s{i}.{layout}")
        sources.append({"path": str(path), "weight": weights[i]})
    config = DataConfig(datasets=sources, val_size=0.1, test_size=7, seed=5)
    splits = load_splits(config)
    stream = config_stream(config)
    seen = {}
    for record, split in stream:
        seen[record.source] = split
    assert stream.mix == splits.mix
    assert {s for s, split in seen.items() if split == "test"} == {r.source for r in splits.test}
    assert {s for s, split in seen.items() if split == "validation"} == {r.source for r in splits.validation}
    assert {s for s, split in seen.items() if split == "train"} == {r.source for r in splits.train}
    unused = {s for s, split in seen.items() if split == "unused"}
    assert bool(unused) == (weights[1] < 1.0)
    if weights[1] < 1.0:
        assert [m["sampling"].split(":")[0] for m in stream.mix] == \
            ["without replacement", "without replacement", "with replacement (records repeat)"]
        assert [m["replacement"] for m in stream.mix] == [False, False, True]
