"""``tunelab sweep``: several trainings of one config over a grid of overrides, then one comparison.

Each combination trains and evaluates (``eval.after_training``) in its own ``tunelab train`` process, one at a
time, in ``train.output_dir/<combination>``: a crash or an out-of-memory stays in its run, and peak memory is that
run's own. Every combination shares the data section, so the train/validation/test split is the same records
(``data.seed``); the test split is what every model is scored on.

Written to ``train.output_dir``: ``sweep.json`` and ``sweep.md`` (one row per run: trainable parameters, peak memory,
tokens/s, wall time, validation and test loss, task metrics), ``configs/<combination>.yaml`` (what each run
trained with), ``columns/`` (each run's fine-tuned eval folder, labelled with the combination) and ``report/``
(:func:`tunelab.evaluate.compare.compare_evals`: the base model of the first run, then every run).
A finished run (its ``summary.json`` and evaluation exist) is reused when the sweep is started again.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.config.load import dump_config, load_config, parse_override
from tunelab.config.schema import TunelabConfig
from tunelab.errors import ConfigError
from tunelab.models.load import check_attention, resolve_dtype
from tunelab.models.methods import check_method

__all__ = ["SweepRun", "parse_grid", "plan_sweep", "run_sweep", "sweep_table"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class SweepRun:
    name: str
    overrides: dict[str, str]
    """The grid's assignments for this run, as written on the command line."""
    config: TunelabConfig
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.config.train.output_path


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["method.name=lora,dora"]`` -> ``[("method.name", ["lora", "dora"])]`` (values split on commas)."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, _ = parse_override(item)
        values = [v.strip() for v in item.partition("=")[2].split(",")]
        if not all(values):
            raise ConfigError(f"--grid {item}: expected KEY=V1,V2,... with no empty value")
        if key == "train.output_dir":
            raise ConfigError("--grid train.output_dir: each run gets train.output_dir/<combination>; set the "
                              "sweep's folder with train.output_dir=DIR")
        if any(key == seen for seen, _ in grid):
            raise ConfigError(f"--grid {key}: given twice; list all its values in one --grid")
        grid.append((key, values))
    if not grid:
        raise ConfigError("--grid: at least one, e.g. --grid method.name=lora,dora,full")
    return grid


BASE_CACHE = "base-evals"  # runs on the same base and split share its evaluation instead of repeating it


def plan_sweep(config_path: str | None, overrides: Sequence[str], grid_items: Sequence[str]) -> list[SweepRun]:
    """Every combination's validated config, checked before any model loads (all problems of one run at once)."""
    grid = parse_grid(grid_items)
    root = load_config(config_path, overrides).train.output_path
    runs: list[SweepRun] = []
    for values in itertools.product(*(v for _, v in grid)):
        assignment = dict(zip((k for k, _ in grid), values, strict=True))
        name = _unique(_combination_name(assignment), {r.name for r in runs})
        config = load_config(config_path, [*overrides, *(f"{k}={v}" for k, v in assignment.items()),
                                           "eval.after_training=true", f"train.output_dir={root / name}",
                                           f"eval.base_cache_dir={root / BASE_CACHE}"])
        try:
            resolve_dtype(config.model.dtype)
            check_attention(config.model.attn_implementation)
            check_method(config)
        except ConfigError as exc:
            raise ConfigError(f"sweep run {name}: {exc}") from None
        runs.append(SweepRun(name, assignment, config))
    return runs


def _combination_name(assignment: dict[str, str]) -> str:
    """``{"method.name": "lora", "model.name_or_path": "Qwen/Qwen2.5-0.5B"}`` -> ``lora_Qwen2.5-0.5B``."""
    parts = [Path(v).name if "/" in v else v for v in assignment.values()]
    return _UNSAFE.sub("-", "_".join(parts)).strip("-") or "run"


def _unique(name: str, taken: set[str]) -> str:
    candidate, copy = name, 1
    while candidate in taken:
        copy += 1
        candidate = f"{name}-{copy}"
    return candidate


def train_in_subprocess(arguments: list[str]) -> int:
    """``tunelab ARGUMENTS`` in a fresh Python process; its exit code."""
    return subprocess.call([sys.executable, "-m", "tunelab.cli", *arguments])


def run_sweep(
    config_path: str | None, overrides: Sequence[str], grid_items: Sequence[str], console: Console,
    runner: Callable[[list[str]], int] | None = None,
) -> tuple[list[SweepRun], Path]:
    """Train and evaluate every combination in turn, then write the table and the comparison report.

    Returns the runs (each with its table row) and the sweep folder. A failed run is recorded (``status``,
    ``exit_code``) and the sweep goes on. ``runner`` runs one ``tunelab train`` command line (default:
    :func:`train_in_subprocess`).
    """
    runner = runner or train_in_subprocess
    runs = plan_sweep(config_path, overrides, grid_items)
    root = runs[0].folder.parent
    (root / "configs").mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]sweep[/]: {len(runs)} runs in {root}: {', '.join(r.name for r in runs)}")
    for index, run in enumerate(runs, start=1):
        config_file = root / "configs" / f"{run.name}.yaml"
        dump_config(run.config, config_file)
        if _finished(run.folder):
            console.print(f"[bold]sweep {index}/{len(runs)}[/] {run.name}: finished earlier, reusing {run.folder}")
            run.row = sweep_row(run, status="reused")
            continue
        command = ["train", str(config_file)]
        if run.folder.exists() and any(run.folder.iterdir()):
            command.append("train.resume=true")
        console.print(f"[bold]sweep {index}/{len(runs)}[/] {run.name}: " + " ".join(
            f"{k}={v}" for k, v in run.overrides.items()))
        code = runner(command)
        run.row = sweep_row(run, status="ok" if code == 0 else "failed", exit_code=code)
    write_sweep_files(runs, root)
    _compare(runs, root, console)
    return runs, root


def _finished(folder: Path) -> bool:
    return (folder / "summary.json").is_file() and (folder / "eval" / "finetuned" / "metrics.json").is_file()


def sweep_row(run: SweepRun, *, status: str, exit_code: int | None = None) -> dict[str, Any]:
    """One table row from the run's ``summary.json`` and its fine-tuned evaluation (``None`` where missing)."""
    summary = _read_json(run.folder / "summary.json")
    evaluation = _read_json(run.folder / "eval" / "finetuned" / "metrics.json")
    overall = evaluation.get("overall", {})
    gpu = summary.get("peak_gpu_allocated_mb")
    trainable, total = summary.get("trainable_parameters"), summary.get("total_parameters")
    return {
        "name": run.name,
        "overrides": run.overrides,
        "method": run.config.method.name,
        "model": run.config.model.name_or_path,
        "status": status,
        "exit_code": exit_code,
        "folder": str(run.folder),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": round(100 * trainable / total, 4) if trainable and total else None,
        "peak_memory_mb": gpu if gpu is not None else summary.get("peak_cpu_rss_mb"),
        "peak_memory_kind": "gpu_allocated" if gpu is not None else "cpu_rss",
        "tokens_per_s": summary.get("tokens_per_s"),
        "wall_time_s": summary.get("wall_time_s"),
        "steps": summary.get("steps"),
        "final_train_loss": summary.get("final_loss"),
        "validation_loss": summary.get("final_eval_loss"),
        "test_loss": evaluation.get("ref_loss"),
        "metrics": {k: v for k, v in overall.items() if k not in ("n", "ci95") and isinstance(v, int | float)},
    }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}


def write_sweep_files(runs: Sequence[SweepRun], root: Path) -> None:
    rows = [run.row for run in runs]
    (root / "sweep.json").write_text(json.dumps({"runs": rows}, ensure_ascii=False, indent=2) + "\n", "utf-8")
    (root / "sweep.md").write_text(sweep_table(rows), "utf-8")


def sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of a sweep: one row per run, task metrics as the last columns."""
    metrics = sorted({m for row in rows for m in row["metrics"]})
    kind = {row["peak_memory_kind"] for row in rows if row["peak_memory_mb"] is not None}
    memory = "peak GPU MB" if kind == {"gpu_allocated"} else "peak MB (RSS on CPU)"
    head = ["run", "status", "trainable params", "trainable %", memory, "tokens/s", "wall s", "validation loss",
            "test loss", *metrics]
    lines = ["# Sweep", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], row["status"], _fmt(row["trainable_parameters"], ","), _fmt(row["trainable_percent"]),
                 _fmt(row["peak_memory_mb"], ".0f"), _fmt(row["tokens_per_s"], ".0f"), _fmt(row["wall_time_s"], ".1f"),
                 _fmt(row["validation_loss"]), _fmt(row["test_loss"]),
                 *(_fmt(row["metrics"].get(m)) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Validation loss needs `data.val_size`; test loss and metrics come from each run's "
              "`eval/finetuned` on the shared test split. Comparison with the base model and between runs, with "
              "confidence intervals: `report/comparison.md`.", ""]
    return "\n".join(lines)


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and spec == ".4f":
        spec = ","
    return format(value, spec)


def _compare(runs: Sequence[SweepRun], root: Path, console: Console) -> None:
    """The comparison report: the first run's base model, then each run's fine-tuned model, named by run."""
    from tunelab.evaluate.compare import compare_evals

    done = [run for run in runs if (run.folder / "eval" / "finetuned" / "metrics.json").is_file()]
    if not done:
        console.print("[yellow]sweep[/]: no run finished its evaluation; no comparison report")
        return
    columns = root / "columns"
    shutil.rmtree(columns, ignore_errors=True)
    folders = [_relabelled(done[0].folder / "eval" / "base", columns / "base", "base")]
    folders += [_relabelled(run.folder / "eval" / "finetuned", columns / run.name, run.name) for run in done]
    compare_evals(folders, root / "report")
    console.print(f"[bold]sweep report[/]: {root / 'sweep.md'} and {root / 'report' / 'comparison.md'}")


def _relabelled(source: Path, target: Path, label: str) -> Path:
    """A copy of an eval folder whose column label is ``label`` (the run folders themselves stay as written)."""
    shutil.copytree(source, target)
    metrics = json.loads((target / "metrics.json").read_text("utf-8"))
    metrics["label"] = label
    (target / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2), "utf-8")
    return target
