"""`tunelab eval`: adapters sharing one base, generation options, embedding and judge metrics, resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import arithmetic_rows, write_jsonl
from loopback import JsonHandler, loopback_server
from tunelab.cli import main
from tunelab.config.load import load_config
from tunelab.evaluate import run_eval
from tunelab.evaluate.metrics import embedding
from tunelab.train.run import run_training

TEXT_ROWS = [
    {"instruction": "Q-NINE Describe the red hoodie.", "output": "A warm red hoodie in size L."},
    {"instruction": "Q-FOUR 这款运动鞋还有货吗？", "output": "有货，今天下单明天发货。"},
    {"instruction": "Q-RAMBLE What is the price of the black jacket?", "output": "The black jacket costs 59."},
    {"instruction": "Q-MISSING Add two blue hoodies to my cart.", "output": "Added two blue hoodies in size M."},
]


def read_rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text("utf-8").splitlines()]


def read_metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text("utf-8"))


def eval_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--data", str(data), "-o", str(out), "--max-new-tokens", "4", *extra]


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA run folders on the tiny model, trained 3 steps at learning rates 10x apart."""
    root = tmp_path_factory.mktemp("adapters")
    data = write_jsonl(root / "train.jsonl", arithmetic_rows(24))
    runs = {}
    for name, lr in (("slow", "3e-3"), ("fast", "3e-2")):
        config = load_config(None, [
            f"model.name_or_path={tiny_model}", f"data.datasets=[{{path: '{data}'}}]",
            f"train.output_dir={root / name}", f"train.learning_rate={lr}",
            "method.name=lora", "method.lora.rank=4", "method.lora.dropout=0.0", "train.max_steps=3",
            "train.per_device_train_batch_size=8", "train.report_to=none", "train.save_steps=1000",
        ])
        runs[name] = run_training(config).output_dir
    return runs


@pytest.fixture
def test_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "test.jsonl", arithmetic_rows(6, seed=1))


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "text.jsonl", TEXT_ROWS)


# ---------------------------------------------------------------------------------------------------- columns


def test_columns_load_the_base_once_and_match_separate_evaluations(
    tiny_model, adapters, test_file, tmp_path, monkeypatch, capsys
):
    from transformers import AutoModelForCausalLM

    loads: list[str] = []
    original = AutoModelForCausalLM.from_pretrained

    def counting_from_pretrained(source, *args, **kwargs):
        loads.append(str(source))
        return original(source, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting_from_pretrained)
    out = tmp_path / "cols"
    code = main(eval_args(tiny_model, test_file, out, "--base", "--adapter", f"slow={adapters['slow']}",
                          "--adapter", f"fast={adapters['fast']}"))
    assert code == 0
    assert loads == [str(tiny_model)]
    for name in ("base", "slow", "fast"):
        assert len(read_rows(out / name)) == 6 and read_metrics(out / name)["label"] == name
    assert read_metrics(out / "fast")["adapter"] == str(adapters["fast"])
    comparison = json.loads((out / "report" / "comparison.json").read_text("utf-8"))
    assert [c["label"] for c in comparison["columns"]] == ["base", "slow", "fast"]
    assert comparison["baseline"] == "base" and (out / "report" / "comparison.md").is_file()
    shown = json.loads(capsys.readouterr().out)
    assert [column["label"] for column in shown] == ["base", "slow", "fast"]

    # The same models evaluated one at a time, each loading its own base.
    assert main(eval_args(tiny_model, test_file, tmp_path / "plain")) == 0
    assert main(eval_args(tiny_model, test_file, tmp_path / "fast-alone", "--adapter", str(adapters["fast"]))) == 0
    assert len(loads) == 3
    base, plain = read_rows(out / "base"), read_rows(tmp_path / "plain")
    assert [r["prediction"] for r in base] == [r["prediction"] for r in plain]
    assert [r["ref_loss"] for r in base] == pytest.approx([r["ref_loss"] for r in plain], abs=1e-6)
    fast, alone = read_rows(out / "fast"), read_rows(tmp_path / "fast-alone")
    assert [r["ref_loss"] for r in fast] == pytest.approx([r["ref_loss"] for r in alone], abs=1e-6)
    losses = [read_metrics(out / name)["ref_loss"] for name in ("base", "slow", "fast")]
    assert min(abs(a - b) for a, b in ((losses[0], losses[1]), (losses[0], losses[2]), (losses[1], losses[2]))) > 1e-4


def test_one_named_adapter_writes_its_folder_and_no_report(tiny_model, adapters, test_file, tmp_path):
    out = tmp_path / "one"
    assert main(eval_args(tiny_model, test_file, out, "--adapter", f"a={adapters['slow']}")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--base", "--label", "x"], "--label: only for a single model"),
        (["--adapter", "a={slow}", "--adapter", "a={fast}"], "a second column named 'a'"),
        (["--adapter", "base={slow}", "--adapter", "{fast}"], "the name 'base' is reserved"),
        (["--judge-url", "http://127.0.0.1:9/v1"], "--judge-model: required with --judge-url"),
        (["--judge-url", "127.0.0.1:9/v1", "--judge-model", "m"], "--judge-url: must start with http://"),
        (["--temperature", "-1"], "argument --temperature: must be 0 or more, got -1"),
        (["--max-new-tokens", "many"], "argument --max-new-tokens: expected an integer, got 'many'"),
    ],
)
def test_bad_eval_arguments_exit_2_before_any_model_loads(
    tiny_model, adapters, test_file, tmp_path, monkeypatch, capsys, extra, message
):
    monkeypatch.setattr("tunelab.evaluate.generate.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    args = [a.format(slow=adapters["slow"], fast=adapters["fast"]) for a in extra]
    try:
        code = main(eval_args(tiny_model, test_file, tmp_path / "out", *args))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- generation


def test_seeded_sampling_and_stop_strings(tiny_model, test_file, tmp_path):
    from transformers import AutoTokenizer

    sampling = ("--max-new-tokens", "8", "--temperature", "1.5", "--top-p", "0.95", "--seed", "3")
    assert main(eval_args(tiny_model, test_file, tmp_path / "greedy", "--max-new-tokens", "8")) == 0
    greedy = [r["prediction"] for r in read_rows(tmp_path / "greedy")]
    sampled = []
    for name in ("sample-1", "sample-2"):
        assert main(eval_args(tiny_model, test_file, tmp_path / name, *sampling)) == 0
        sampled.append([r["prediction"] for r in read_rows(tmp_path / name)])
    assert sampled[0] == sampled[1] != greedy
    generation = read_metrics(tmp_path / "sample-1")["generation"]
    assert (generation["do_sample"], generation["temperature"], generation["top_p"]) == (True, 1.5, 0.95)

    # The same samples cut at stop strings taken from them: one a single token (it becomes an end-of-sequence id),
    # one of several tokens (transformers' stop_strings). ASCII, so a stop is never half a character.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pieces = [p[i:j] for p in sampled[0] for i in range(1, len(p)) for j in range(i + 2, min(i + 4, len(p)) + 1)
              if p[i:j].isascii() and p[i:j].isalnum()]
    sizes = {piece: len(tokenizer.encode(piece, add_special_tokens=False)) for piece in pieces}
    stops = [next(p for p in pieces if sizes[p] == 1), next(p for p in pieces if sizes[p] > 1)]
    args = eval_args(tiny_model, test_file, tmp_path / "stop", *sampling, "--stop", stops[0], "--stop", stops[1])
    assert main(args) == 0
    cut = [r["prediction"] for r in read_rows(tmp_path / "stop")]
    expected = [p[: min((p.find(s) for s in stops if s in p), default=len(p))].strip() for p in sampled[0]]
    assert cut == expected != sampled[0]
    assert read_metrics(tmp_path / "stop")["generation"]["stop"] == stops


# ---------------------------------------------------------------------------------------------------- metrics


def test_missing_embedding_model_is_reported_once_and_leaves_the_metric_out(
    tiny_model, adapters, text_file, tmp_path, capsys
):
    out = tmp_path / "emb"
    assert main(eval_args(tiny_model, text_file, out, "--base", "--adapter", f"a={adapters['slow']}",
                          "--embedding-model", "/nonexistent")) == 0
    err = capsys.readouterr().err
    assert err.count("embedding_cosine left out: embedding model folder /nonexistent does not exist") == 1
    for name in ("base", "a"):
        assert read_metrics(out / name)["groups"]["text"]["n"] == 4
        assert "embedding_cosine" not in json.dumps(read_metrics(out / name))
        assert all("embedding_cosine" not in r["scores"] for r in read_rows(out / name))


def test_embedding_model_adds_cosine_to_text_answers(tiny_model, text_file, tmp_path, monkeypatch):
    def fake_loader(path):
        assert path == str(tmp_path)
        return embedding.EmbeddingScorer(lambda texts: [[1.0, float(len(t) % 3)] for t in texts]), ""

    monkeypatch.setattr(embedding, "load_embedding_scorer", fake_loader)
    out = tmp_path / "emb"
    assert main(eval_args(tiny_model, text_file, out, "--embedding-model", str(tmp_path))) == 0
    rows = read_rows(out)
    assert all(-1.0 <= r["scores"]["embedding_cosine"] <= 1.0 for r in rows)
    assert "embedding_cosine" in read_metrics(out)["groups"]["text"]


# ---------------------------------------------------------------------------------------------------- judge


class _JudgeHandler(JsonHandler):
    """An OpenAI-compatible /chat/completions: the reply is chosen by the first script token found in the prompt."""

    def do_POST(self) -> None:  # the name http.server dispatches to
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        server = self.server
        with server.lock:  # type: ignore[attr-defined]
            server.requests.append({"headers": dict(self.headers), "content": content})  # type: ignore[attr-defined]
        status, text = next(reply for token, reply in server.script.items() if token in content)  # type: ignore
        payload = ({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]} if status == 200
                   else {"error": {"message": text}})
        self.send_json(status, payload)


@pytest.fixture
def judge_server(monkeypatch) -> Iterator[ThreadingHTTPServer]:
    with loopback_server(_JudgeHandler, monkeypatch) as server:
        server.lock, server.requests = threading.Lock(), []  # type: ignore[attr-defined]
        server.script = {  # type: ignore[attr-defined]
            "Q-NINE": (200, "Correct.\nScore: 9"),
            "Q-FOUR": (200, "部分正确。\n评分：4"),
            "Q-RAMBLE": (200, "An interesting answer, hard to say."),
            "Q-MISSING": (400, "model 'judge-m' does not exist"),  # a 400 is not retried
        }
        yield server


def hits(server: ThreadingHTTPServer) -> dict[str, int]:
    requests = server.requests  # type: ignore[attr-defined]
    return {token: sum(token in r["content"] for r in requests) for token in server.script}  # type: ignore


def test_judge_scores_each_column_counts_the_rest_and_is_not_asked_twice(
    tiny_model, adapters, text_file, tmp_path, judge_server
):
    url = f"http://127.0.0.1:{judge_server.server_address[1]}/v1"
    out = tmp_path / "judged"
    command = [sys.executable, "-m", "tunelab.cli", *eval_args(
        tiny_model, text_file, out, "--base", "--adapter", f"a={adapters['slow']}",
        "--judge-url", url, "--judge-model", "judge-m", "--judge-key-env", "TUNELAB_TEST_JUDGE_KEY")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELAB_TEST_JUDGE_KEY": "sk-test"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert hits(judge_server) == {"Q-NINE": 2, "Q-FOUR": 2, "Q-RAMBLE": 2, "Q-MISSING": 2}
    assert judge_server.requests[0]["headers"]["Authorization"] == "Bearer sk-test"  # type: ignore[attr-defined]
    expected = {"mean_score": pytest.approx(0.65), "n_samples": 4, "n_scored": 2, "n_unparsable": 1, "n_failed": 1,
                "model": "judge-m", "max_score": 10}
    for name in ("base", "a"):
        assert read_metrics(out / name)["judge"] == expected
        assert read_metrics(out / name)["overall"]["judge"] == pytest.approx(0.65)
        rows = read_rows(out / name)
        assert [r["scores"].get("judge") for r in rows] == [0.9, 0.4, None, None]
        assert [r["judge"]["status"] for r in rows] == ["scored", "scored", "unparsable", "failed"]
    assert [c["label"] for c in json.loads(first.stdout)] == ["base", "a"]
    assert "judge" in json.loads((out / "report" / "comparison.json").read_text("utf-8"))["metrics"]

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    # Stored verdicts are kept; only the failed calls are asked again.
    assert hits(judge_server) == {"Q-NINE": 2, "Q-FOUR": 2, "Q-RAMBLE": 2, "Q-MISSING": 4}
    assert read_metrics(out / "a")["judge"] == expected


# ---------------------------------------------------------------------------------------------------- resume


def test_an_interrupted_eval_generates_only_the_missing_samples(tiny_model, test_file, tmp_path, monkeypatch):
    records = run_eval.read_test_records(str(test_file))
    out = tmp_path / "resumed"
    assert main(eval_args(tiny_model, test_file, out)) == 0  # a first run: the same model and settings
    kept = [{"index": i, "source": records[i].source, "prompt": records[i].prompt_turns[-1].content,
             "reference": records[i].answer, "prediction": f"kept-{i}"} for i in range(2)]
    cut_line = json.dumps({"index": 2, "source": records[2].source, "prompt": "x"})[:30]  # died mid-write
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + cut_line, "utf-8")
    calls = []
    original = run_eval.generate_answers

    def recording_generate_answers(loaded, prompts, settings, **kwargs):
        calls.append(([r.source for r in prompts], kwargs["first_index"]))
        return original(loaded, prompts, settings, **kwargs)

    monkeypatch.setattr(run_eval, "generate_answers", recording_generate_answers)
    assert main(eval_args(tiny_model, test_file, out)) == 0
    assert calls == [([r.source for r in records[2:]], 2)]
    rows = read_rows(out)
    assert [r["index"] for r in rows] == list(range(6))
    assert [r["source"] for r in rows] == [r.source for r in records]
    assert [r["prediction"] for r in rows[:2]] == ["kept-0", "kept-1"]
    assert all(not r["prediction"].startswith("kept-") and "scores" in r for r in rows[2:])
    assert read_metrics(out)["n"] == 6


def test_a_resumed_eval_never_keeps_predictions_of_another_model_or_other_data(tiny_model, adapters, test_file,
                                                                                tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(eval_args(tiny_model, test_file, out)) == 0
    base = read_rows(out)
    (out / "predictions.jsonl").write_text(
        "".join(json.dumps({**r, "prediction": "stale"}) + "\n" for r in base), "utf-8")
    capsys.readouterr()
    # another model into the same folder (or a run that trained on after its first evaluation): starts over
    assert main(eval_args(tiny_model, test_file, out, "--adapter", str(adapters["fast"]))) == 0
    assert "made by another model or settings than this evaluation's; starting over" in capsys.readouterr().err
    assert all(r["prediction"] != "stale" for r in read_rows(out))
    assert read_metrics(out)["adapter"] == str(adapters["fast"])
    # the same test file path and line count, other questions: refused, not scored against the old references
    rows = [json.loads(line) for line in test_file.read_text("utf-8").splitlines()]
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps({**r, "instruction": r["instruction"] + "？"}, ensure_ascii=False) + "\n"
                               for r in rows), "utf-8")
    moved = tmp_path / "moved"
    assert main(eval_args(tiny_model, test_file, moved)) == 0
    (moved / "predictions.jsonl").write_text((moved / "predictions.jsonl").read_text("utf-8").replace(
        str(test_file), str(changed)), "utf-8")
    assert main(eval_args(tiny_model, changed, moved)) == 1
    assert "holds predictions for other test data (line 1" in capsys.readouterr().err


def test_answer_kind_json_with_a_reference_that_is_not_json_stops_before_generating(tiny_model, test_file, tmp_path,
                                                                                     capsys):
    assert main(eval_args(tiny_model, test_file, tmp_path / "eval", "--answer-kind", "json")) == 1
    assert f"{test_file}:1: reference: --answer-kind json: not a JSON object or array" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "predictions.jsonl").exists()
