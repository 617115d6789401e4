"""Command line: argv -> pipeline functions. No logic of its own beyond wiring and error reporting."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from rich.console import Console

from tunelab import __version__
from tunelab.errors import ConfigError, TunelabError

console = Console(stderr=True)
_N = TypeVar("_N", int, float)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune open LLMs, measure them, ship them.")
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model from a YAML config")
    _config_arguments(train)
    train.set_defaults(handler=cmd_train)

    data = commands.add_parser("data", help="inspect and prepare data")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    preview = data_commands.add_parser("preview", help="show rendered samples with the supervised spans marked")
    _config_arguments(preview)
    preview.add_argument("--n", type=int, default=3, help="how many samples (default 3)")
    preview.set_defaults(handler=cmd_data_preview)
    tokenize = data_commands.add_parser("tokenize", help="write tokenized training samples as JSONL")
    _config_arguments(tokenize)
    tokenize.add_argument("-o", "--output", required=True, help="output JSONL file")
    tokenize.set_defaults(handler=cmd_data_tokenize)
    _data_quality_commands(data_commands)

    evaluate = commands.add_parser(
        "eval", help="generate on a test file and score the answers",
        description="Evaluate one model into the eval folder -o; or, with --base and/or --adapter NAME=PATH (or "
                    "several --adapter), the base and each adapter into -o/base and -o/NAME with the base weights "
                    "loaded once, compared in -o/report.")
    evaluate.add_argument("--model", required=True, help="base model: hub id or folder (or a full-tuning run folder)")
    evaluate.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                          help="LoRA adapter folder or LoRA run folder (its config.yaml decides the template); "
                               "repeat as NAME=PATH for one column each")
    evaluate.add_argument("--base", action="store_true", help="add a column for the base model (adapters disabled)")
    evaluate.add_argument("--data", required=True, help="test file (any supported format)")
    evaluate.add_argument("--template",
                          help="prompt template for every column (default: each run's, else the tokenizer's)")
    evaluate.add_argument("-o", "--output", required=True,
                          help="eval folder to write; with columns, the folder that holds one per column and report/")
    evaluate.add_argument("--label", help="column name in comparisons (single-model form only)")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, default=256)
    evaluate.add_argument("--temperature", type=_non_negative_float, default=0.0,
                          help="0 (default) decodes greedily; above 0 samples at this temperature")
    evaluate.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling mass (with --temperature)")
    evaluate.add_argument("--answer-kind", choices=["auto", "json", "label", "text"], default="auto",
                          help="score every answer as this kind (default: decided per sample from its reference)")
    evaluate.add_argument("--exact-match", choices=["normalized", "strict"], default="normalized",
                          help="normalized ignores whitespace runs, case and full/half-width forms (default)")
    evaluate.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature)")
    evaluate.add_argument("--stop", action="append", default=[], metavar="STR",
                          help="end an answer at this string (repeatable); the template's end of turn always does")
    evaluate.add_argument("--batch-size", type=_positive_int, default=8)
    evaluate.add_argument("--max-samples", type=_positive_int)
    evaluate.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    evaluate.add_argument("--embedding-model", metavar="PATH",
                          help="local sentence-transformers folder: adds embedding_cosine to text answers")
    evaluate.add_argument("--judge-url", help="OpenAI-compatible API base of an LLM judge, e.g. http://127.0.0.1:8000/v1")
    evaluate.add_argument("--judge-model", help="model name the judge server expects")
    evaluate.add_argument("--judge-key-env", metavar="ENV",
                          help="environment variable holding the judge's API key (default OPENAI_API_KEY)")
    evaluate.add_argument("--judge-rubric", metavar="FILE", help="rubric template (default: the bundled one)")
    evaluate.set_defaults(handler=cmd_eval)

    compare = commands.add_parser("compare", help="side-by-side report of several eval or run folders")
    compare.add_argument("paths", nargs="+", help="eval folders or run folders; the first is the baseline")
    compare.add_argument("-o", "--output", required=True, help="report folder")
    compare.add_argument("--seed", type=int, default=0)
    compare.set_defaults(handler=cmd_compare)

    sweep = commands.add_parser(
        "sweep", help="train and evaluate a config over a grid of overrides, then compare the runs",
        description="One training + evaluation per combination of --grid values, one at a time, each in "
                    "train.output_dir/<combination>; then sweep.md/sweep.json (trainable parameters, peak memory, "
                    "tokens/s, wall time, validation/test loss, task metrics) and report/comparison.md.")
    _config_arguments(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a config field and its values, e.g. method.name=lora,dora,full (repeat for more fields)")
    sweep.set_defaults(handler=cmd_sweep)

    _ship_commands(commands)

    demo = commands.add_parser("demo", help="the whole path on embedded data: build, train, evaluate, compare")
    demo.add_argument("--workdir", default="tunelab-demo", help="where to write (default ./tunelab-demo)")
    demo.add_argument("--model", help="run the demo on a real model (hub id or folder) instead of a tiny one")
    demo.set_defaults(handler=cmd_demo)
    return parser


def _positive_int(text: str) -> int:
    value = _number(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(float, text, "a number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _probability(text: str) -> float:
    value = _number(float, text, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _shard_size(text: str) -> str:
    """``--max-shard-size``: a size as transformers' ``save_pretrained`` reads it (checked here, not after a merge)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number and a unit, such as 500MB, 2GB or 5GiB, got "
                                         f"{text!r}") from None
    return text


def _device(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N that this machine has (checked before the model loads)."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is visible on this machine; use cpu or auto")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA GPU(s), cuda:0 to "
                                             f"cuda:{count - 1}")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _number(kind: Callable[[str], _N], text: str, what: str) -> _N:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=50")


def _load(args: argparse.Namespace):
    from tunelab.config.load import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from tunelab.train.run import is_main_process, run_training
    from tunelab.workflow import evaluate_after_training

    config = _load(args)
    _preload_allocator(args, config.train.cpu_allocator)
    result = run_training(config, console)
    if result.interrupted_by is not None:
        console.print(f"[yellow]stopped by signal {result.interrupted_by}; checkpoint saved in "
                      f"{result.output_dir}. Continue with: tunelab train {args.config} train.resume=true[/]")
        return 128 + result.interrupted_by
    s = result.summary
    if not is_main_process():
        return 0
    console.print(f"[green]done[/]: {s['steps']} steps, loss {s['first_loss']} -> {s['final_loss']}, "
                  f"{s['tokens_per_s']} tokens/s; run folder {result.output_dir}")
    if config.eval.after_training:
        evaluate_after_training(config, console, result.train_records)
    return 0


def _preload_allocator(args: argparse.Namespace, choice: str) -> None:
    """Restart this command once with ``train.cpu_allocator``'s library preloaded (tunelab.train.allocator says
    why). Only from a real command line: inside a Python caller's process (tests, notebooks) it would replace that
    process."""
    if args.from_command_line:
        from tunelab.train.allocator import reexec_with_allocator

        reexec_with_allocator(choice)


def _examples(args: argparse.Namespace):
    from tunelab.data.build import load_splits, tokenize_splits
    from tunelab.data.template import build_template
    from tunelab.models.load import add_new_tokens, load_tokenizer

    config = _load(args)
    tokenizer = load_tokenizer(config.model)
    add_new_tokens(tokenizer, config.model.new_special_tokens)  # as training does: they tokenize as one id each
    template = build_template(config.data.template, tokenizer, config.data.custom_template)
    data = tokenize_splits(load_splits(config.data), template, tokenizer, config.data)
    return config, tokenizer, data


def cmd_data_preview(args: argparse.Namespace) -> int:
    from tunelab.data.preview import print_preview

    config, tokenizer, data = _examples(args)
    out = Console()
    print_preview(out, data.train[: args.n], tokenizer, config.data.cutoff_len)
    out.print(f"train: {data.stats['train'].describe()}")
    return 0


def cmd_data_tokenize(args: argparse.Namespace) -> int:
    from tunelab.data.preview import write_tokenized

    _, _, data = _examples(args)
    count = write_tokenized(Path(args.output), data.train)
    console.print(f"wrote {count} samples to {args.output}; {data.stats['train'].describe()}")
    return 0


def _data_quality_commands(data_commands: argparse._SubParsersAction) -> None:
    from tunelab.data.quality.flags import FLAGS

    threshold = {"type": _threshold, "default": 0.8, "metavar": "J",
                 "help": "Jaccard similarity of 3-character shingles that makes two records near-duplicates "
                         "(default 0.8)"}
    report = data_commands.add_parser(
        "report", help="data quality report: duplicates, leakage, conflicts, diversity, flags, lengths",
        description="Report on a training config (its splits and mix) or data files (a file named *test*/*eval* is "
                    "test, *val*/*dev* validation, others train). Writes report.md, report.html and report.json.")
    report.add_argument("inputs", nargs="+", metavar="CONFIG.yaml [key=value ...] | FILE ...")
    report.add_argument("-o", "--output", required=True, help="report folder")
    report.add_argument("--model", help="model folder or hub id: token lengths vs cutoff, and answer difficulty")
    report.add_argument("--near-dup-threshold", **threshold)
    report.add_argument("--cutoff-len", type=_positive_int, help="default: the config's data.cutoff_len, else 1024")
    report.add_argument("--template", help="prompt template for token counts (default: the config's or tokenizer's)")
    report.add_argument("--difficulty-samples", type=_positive_int, default=1000,
                        help="records scored for difficulty with --model (an even sample; default 1000)")
    report.add_argument("--seed", type=int, default=0,
                        help="seeds the topic clustering's sample of records and its k-means (default 0)")
    report.set_defaults(handler=cmd_data_report)
    inputs = {"nargs": "+", "metavar": "CONFIG.yaml [key=value ...] | FILE ..."}
    clean = data_commands.add_parser(
        "clean", help="drop duplicates, conflicts and flagged records; write the rest",
        description="Clean data files, or every dataset of a training config (in its declared format), into one "
                    "JSONL file; every dropped row goes to OUT.rejects.jsonl with its reason.")
    clean.add_argument("inputs", **inputs)
    clean.add_argument("-o", "--output", required=True, help="cleaned JSONL; dropped rows go to OUT.rejects.jsonl")
    clean.add_argument("--dedup", action="store_true", help="drop exact duplicates (the first is kept)")
    clean.add_argument("--near-dedup", action="store_true", help="drop near-duplicates (the first is kept)")
    clean.add_argument("--drop-conflicts", dest="conflicts", action="store_const", const="drop", default="keep",
                       help="drop every record of a group with the same prompt and different answers")
    clean.add_argument("--conflicts", dest="conflicts", choices=["keep", "drop", "majority"],
                       help="conflict groups: keep them (default), drop them (= --drop-conflicts), or majority: keep "
                            "the records with the most common answer, drop the rest (a tie drops the group)")
    clean.add_argument("--drop-flags", metavar="FLAG,...", help=f"drop records with these flags: {', '.join(FLAGS)}")
    clean.add_argument("--min-chars", type=_positive_int, help="drop records whose prompt + answer is shorter")
    clean.add_argument("--max-chars", type=_positive_int, help="drop records whose prompt + answer is longer")
    clean.add_argument("--near-dup-threshold", **threshold)
    clean.set_defaults(handler=cmd_data_clean)
    split = data_commands.add_parser(
        "split", help="train/validation/test files; near-duplicates on one side",
        description="Split data files, or every dataset of a training config (in its declared format), together. "
                    "With a config, its data.val_size, data.test_size and data.seed are the defaults.")
    split.add_argument("inputs", **inputs)
    split.add_argument("-o", "--output", required=True, help="folder for train.jsonl, validation.jsonl, test.jsonl")
    split.add_argument("--val-size", type=_non_negative_float,
                       help=f"fraction < 1 or count (default: the config's, else {SPLIT_DEFAULTS['val_size']})")
    split.add_argument("--test-size", type=_non_negative_float,
                       help=f"fraction < 1 or count (default: the config's, else {SPLIT_DEFAULTS['test_size']})")
    split.add_argument("--seed", type=int, help=f"default: the config's, else {SPLIT_DEFAULTS['seed']}")
    split.add_argument("--near-dup-threshold", **threshold)
    split.set_defaults(handler=cmd_data_split)


def _threshold(text: str) -> float:
    value = _number(float, text, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def cmd_data_report(args: argparse.Namespace) -> int:
    from tunelab.data.quality.report import ReportSettings, build_report, open_input, write_report

    stream, config = open_input(args.inputs)
    settings = ReportSettings(near_dup_threshold=args.near_dup_threshold, model=args.model,
                              cutoff_len=args.cutoff_len, template=args.template,
                              difficulty_samples=args.difficulty_samples, seed=args.seed)
    report = build_report(stream, settings, config, log=lambda line: console.print(line))
    paths = write_report(report, Path(args.output))
    d = report["duplicates"]
    console.print(f"{report['records']} records; {d['exact']['removable']} exact and {d['near']['removable']} near "
                  f"duplicates removable, {report['leakage']['leaked']} leaked into held-out splits, "
                  f"{report['conflicts']['groups']} conflict groups; report: {paths['html']}")
    return 0


def cmd_data_clean(args: argparse.Namespace) -> int:
    from tunelab.data.quality.clean import CleanOptions, clean_files, parse_flags, rejects_path
    from tunelab.data.quality.stream import read_inputs

    options = CleanOptions(dedup=args.dedup, near_dedup=args.near_dedup, conflicts=args.conflicts,
                           drop_flags=parse_flags(args.drop_flags), min_chars=args.min_chars,
                           max_chars=args.max_chars, near_dup_threshold=args.near_dup_threshold)
    out = Path(args.output)
    sources, _ = read_inputs(args.inputs)
    result = clean_files(sources, out, options)
    console.print(f"{result.describe()}; wrote {out} and {rejects_path(out)}")
    return 0


SPLIT_DEFAULTS = {"val_size": 0.05, "test_size": 0.1, "seed": 42}
"""``data split`` on files; on a config its ``data`` section's values are the defaults."""


def cmd_data_split(args: argparse.Namespace) -> int:
    from tunelab.data.quality.splitting import split_files
    from tunelab.data.quality.stream import read_inputs

    sources, config = read_inputs(args.inputs)
    sizes = {name: getattr(args, name) if getattr(args, name) is not None
             else getattr(config.data, name) if config is not None else default
             for name, default in SPLIT_DEFAULTS.items()}
    result = split_files(sources, Path(args.output), sizes["val_size"], sizes["test_size"], sizes["seed"],
                         args.near_dup_threshold)
    console.print(f"{result.describe()}; wrote {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.evaluate.generate import GenerationSettings, eval_columns, load_for_eval, split_adapter_argument
    from tunelab.evaluate.metrics.score import scoring_options
    from tunelab.evaluate.run_eval import evaluate_columns, evaluate_model, read_test_records
    from tunelab.workflow import embedding_scorer

    # One unnamed --adapter (or none) without --base is the single-model form: -o is the eval folder itself.
    single = not args.base and len(args.adapter) <= 1 and all(
        split_adapter_argument(a)[0] is None for a in args.adapter)
    if not single and args.label is not None:
        raise ConfigError("--label: only for a single model; columns are named by --adapter NAME=PATH (and 'base')")
    columns = None if single else eval_columns(args.adapter, args.base)
    judge = _judge_config(args)
    if args.temperature == 0 and args.top_p != 1.0:
        console.print("note: --top-p applies only when sampling (--temperature above 0); decoding greedily")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                  do_sample=args.temperature > 0, temperature=args.temperature, top_p=args.top_p,
                                  stop=tuple(args.stop), seed=args.seed)
    embedder = embedding_scorer(args.embedding_model, console)
    scoring = scoring_options(args.answer_kind, args.exact_match)
    records = read_test_records(args.data, args.max_samples)
    out = Path(args.output)
    if columns is None:
        adapter = args.adapter[0] if args.adapter else None
        loaded = load_for_eval(args.model, adapter, template=args.template, dtype=args.dtype, label=args.label)
        results = [evaluate_model(loaded, records, out, settings, embedder=embedder, judge=judge, scoring=scoring)]
        report = None
    else:
        results, report = evaluate_columns(args.model, columns, records, out, settings, template=args.template,
                                           dtype=args.dtype, embedder=embedder, judge=judge, console=console,
                                           scoring=scoring)
    shown = [{key: m[key] for key in ("label", "n", "overall", "ref_loss", "judge") if key in m} for m in results]
    Console().print_json(data=shown[0] if single else shown)
    if report is not None:
        console.print(f"report: {report}")
    return 0


def _judge_config(args: argparse.Namespace):
    """The judge from the --judge-* flags, checked (rubric included) before any model loads; ``None`` without one."""
    from pydantic import ValidationError

    from tunelab.evaluate.judge import JudgeConfig, load_rubric

    given = {flag: value for flag, value in (("--judge-url", args.judge_url), ("--judge-model", args.judge_model),
                                              ("--judge-key-env", args.judge_key_env),
                                              ("--judge-rubric", args.judge_rubric)) if value is not None}
    if not given:
        return None
    for flag in ("--judge-url", "--judge-model"):
        if flag not in given:
            raise ConfigError(f"{flag}: required with {', '.join(given)} (a judge needs --judge-url and --judge-model)")
    fields = {"base_url": args.judge_url, "model": args.judge_model}
    if args.judge_key_env is not None:
        fields["api_key_env"] = args.judge_key_env
    if args.judge_rubric is not None:
        fields["rubric"] = args.judge_rubric
    try:
        judge = JudgeConfig(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        flag = {"base_url": "--judge-url", "model": "--judge-model", "api_key_env": "--judge-key-env",
                "rubric": "--judge-rubric"}.get(str(error["loc"][0]), "--judge-*")
        raise ConfigError(f"{flag}: {error['msg'].removeprefix('Value error, ')}") from None
    load_rubric(judge.rubric)
    return judge


def cmd_sweep(args: argparse.Namespace) -> int:
    from tunelab.sweep import run_sweep

    runs, root = run_sweep(args.config, args.overrides, args.grid, console)
    failed = [run.name for run in runs if run.row["status"] == "failed"]
    Console().print((root / "sweep.md").read_text("utf-8"), markup=False, highlight=False)
    if failed:
        console.print(f"[red]sweep[/]: {len(failed)} run(s) failed: {', '.join(failed)} (see their output above)")
    return 1 if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tunelab.evaluate.compare import run_compare

    report = run_compare(args.paths, args.output, seed=args.seed)
    console.print(f"report: {report}")
    return 0


def _ship_commands(commands: argparse._SubParsersAction) -> None:
    """export, chat and serve: from a trained run to something that answers."""
    export = commands.add_parser(
        "export", help="merge an adapter into its base (or take a full run) and write a verified HF model folder",
        description="Writes sharded safetensors, config, tokenizer with a chat template that renders the run's "
                    "prompts, and a generation config; checks the merged logits against base + adapter and the "
                    "written folder against what was saved before it finishes.")
    export.add_argument("--adapter", required=True, metavar="RUN_OR_ADAPTER_DIR",
                        help="LoRA/DoRA run or adapter folder, or a full/freeze run folder")
    export.add_argument("--base", help="base model (default: the adapter's base_model_name_or_path)")
    export.add_argument("-o", "--output", required=True, help="folder to write (new or empty)")
    export.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    export.add_argument("--max-shard-size", default="2GB", type=_shard_size,
                        help="largest safetensors shard (default 2GB)")
    export.add_argument("--template", help="template to write as the chat template (default: the run's)")
    export.set_defaults(handler=cmd_export)

    chat = commands.add_parser("chat", help="streaming terminal chat (/reset, /exit), prompted as in training")
    _model_arguments(chat, adapter_help="LoRA adapter or run folder")
    chat.add_argument("--system", help="system prompt for the conversation")
    chat.add_argument("--max-new-tokens", type=_positive_int, default=512)
    chat.add_argument("--temperature", type=_non_negative_float, default=0.0,
                      help="0 (default) decodes greedily; above 0 samples at this temperature")
    chat.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling mass (with --temperature)")
    chat.add_argument("--stop", action="append", default=[], metavar="STR",
                      help="end an answer at this string (repeatable); the template's end of turn always does")
    chat.set_defaults(handler=cmd_chat)

    serve = commands.add_parser(
        "serve", help="OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health",
        description="Serves the base model and each --adapter (chosen by the request's model field) with one copy "
                    "of the base weights. Concurrent requests for the same model are decoded together in one batch "
                    "(continuous batching: a request joins the running batch at the next token, a finished or "
                    "abandoned one leaves it at once); requests for different adapters take turns in arrival "
                    "order. Needs pip install 'tunelab[serve]'.")
    _model_arguments(serve, adapter_help="NAME=PATH: serve this adapter as model NAME (repeatable)")
    serve.add_argument("--served-model-name", help="model id of the base (default: --model as given)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                                         "(default: $TUNELAB_API_KEY when set)")
    serve.add_argument("--max-concurrency", type=_positive_int, default=8,
                       help="requests generating at once, in one batch or in threads (default 8)")
    serve.add_argument("--max-batch-size", type=_positive_int, default=8,
                       help="rows decoded together in one forward pass; a request with n choices takes n rows "
                            "(default 8). 1: no batching, each request runs its own generate in a thread")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests waiting for a slot before new ones get 429 (default 64)")
    serve.add_argument("--max-tokens-limit", type=_positive_int, default=2048,
                       help="largest max_tokens a request may ask for (400 above); the default for requests")
    serve.add_argument("--max-request-bytes", type=_positive_int, default=1 << 20,
                       help="largest request body (413 above; default 1 MiB)")
    serve.add_argument("--engine", default="tunelab", choices=["tunelab", "vllm"],
                       help="vllm: hand serving to vLLM's OpenAI server (CUDA GPU and pip install vllm)")
    serve.add_argument("--threads", type=_positive_int,
                       help="CPU threads per generation step (torch.set_num_threads; default: torch's choice)")
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=cmd_serve)


def _model_arguments(parser: argparse.ArgumentParser, adapter_help: str) -> None:
    parser.add_argument("--model", required=True, help="base model: hub id or folder (or a full-tuning run folder)")
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH", help=adapter_help)
    parser.add_argument("--template", help="prompt template (default: the run's, else the tokenizer's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="auto", type=_device,
                        help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:1")


def cmd_export(args: argparse.Namespace) -> int:
    from tunelab.export import export_model

    report = export_model(args.adapter, args.output, base=args.base, dtype=args.dtype,
                          max_shard_size=args.max_shard_size, template=args.template,
                          log=lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True))
    console.print(f"[green]exported[/] {report.source} -> {report.output} ({report.dtype}, {report.shards} "
                  f"shard(s)); chat template: {report.chat_template}; {report.prompt_ids_match}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.evaluate.generate import load_for_eval
    from tunelab.serve.chat import run_chat
    from tunelab.serve.generation import SamplingOptions, place_model

    if len(args.adapter) > 1:
        raise ConfigError("--adapter: chat takes one adapter")
    loaded = load_for_eval(args.model, args.adapter[0] if args.adapter else None, template=args.template,
                           dtype=args.dtype)
    loaded.model = place_model(loaded.model, args.device)
    options = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              stop=tuple(args.stop))
    interactive = sys.stdin.isatty()
    console.print(f"chatting with {loaded.label} (template {loaded.template.name}); /reset clears the history, "
                  "/exit quits", markup=False, highlight=False)
    run_chat(loaded, options, system=args.system, input=sys.stdin, output=sys.stdout, notes=sys.stderr,
             interactive=interactive)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tunelab.serve.server import serve

    return serve(args, console)


def cmd_demo(args: argparse.Namespace) -> int:
    from tunelab.config.schema import TrainConfig
    from tunelab.demo.run import run_demo

    _preload_allocator(args, TrainConfig().cpu_allocator)
    return run_demo(Path(args.workdir), model=args.model, console=console)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.from_command_line = argv is None
    try:
        return args.handler(args)
    except TunelabError as exc:
        console.print(f"tunelab: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("tunelab: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
