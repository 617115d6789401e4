"""Command line: argv -> pipeline functions. No logic of its own beyond wiring and error reporting."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from tunelab import __version__
from tunelab.errors import TunelabError

console = Console(stderr=True)


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

    evaluate = commands.add_parser("eval", help="generate on a test file and score the answers")
    evaluate.add_argument("--model", required=True, help="base model: hub id or folder (or a full-tuning run folder)")
    evaluate.add_argument("--adapter", help="LoRA adapter folder or LoRA run folder")
    evaluate.add_argument("--data", required=True, help="test file (any supported format)")
    evaluate.add_argument("--template", help="prompt template (default: the run's, else the tokenizer's)")
    evaluate.add_argument("-o", "--output", required=True, help="eval folder to write")
    evaluate.add_argument("--label", help="column name in comparisons")
    evaluate.add_argument("--max-new-tokens", type=int, default=256)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-samples", type=int)
    evaluate.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    evaluate.set_defaults(handler=cmd_eval)

    compare = commands.add_parser("compare", help="side-by-side report of several eval or run folders")
    compare.add_argument("paths", nargs="+", help="eval folders or run folders; the first is the baseline")
    compare.add_argument("-o", "--output", required=True, help="report folder")
    compare.add_argument("--seed", type=int, default=0)
    compare.set_defaults(handler=cmd_compare)

    demo = commands.add_parser("demo", help="the whole path on embedded data: build, train, evaluate, compare")
    demo.add_argument("--workdir", default="tunelab-demo", help="where to write (default ./tunelab-demo)")
    demo.add_argument("--model", help="run the demo on a real model (hub id or folder) instead of a tiny one")
    demo.set_defaults(handler=cmd_demo)
    return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=50")


def _load(args: argparse.Namespace):
    from tunelab.config.load import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from tunelab.train.run import run_training
    from tunelab.workflow import evaluate_after_training

    config = _load(args)
    result = run_training(config, console)
    if result.interrupted_by is not None:
        console.print(f"[yellow]stopped by signal {result.interrupted_by}; checkpoint saved in "
                      f"{result.output_dir}. Continue with: tunelab train {args.config} train.resume=true[/]")
        return 128 + result.interrupted_by
    s = result.summary
    console.print(f"[green]done[/]: {s['steps']} steps, loss {s['first_loss']} -> {s['final_loss']}, "
                  f"{s['tokens_per_s']} tokens/s; run folder {result.output_dir}")
    if config.eval.after_training:
        evaluate_after_training(config, console)
    return 0


def _examples(args: argparse.Namespace):
    from tunelab.data.build import load_splits, tokenize_splits
    from tunelab.data.template import build_template
    from tunelab.models.load import load_tokenizer

    config = _load(args)
    tokenizer = load_tokenizer(config.model)
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


def cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.evaluate.generate import GenerationSettings, load_for_eval
    from tunelab.evaluate.run_eval import evaluate_model, read_test_records

    records = read_test_records(args.data, args.max_samples)
    loaded = load_for_eval(args.model, args.adapter, template=args.template, dtype=args.dtype, label=args.label)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    metrics = evaluate_model(loaded, records, Path(args.output), settings)
    Console().print_json(data={"label": metrics["label"], "n": metrics["n"], "overall": metrics["overall"],
                               "ref_loss": metrics["ref_loss"]})
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tunelab.evaluate.compare import run_compare

    report = run_compare(args.paths, args.output, seed=args.seed)
    console.print(f"report: {report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tunelab.demo.run import run_demo

    return run_demo(Path(args.workdir), model=args.model, console=console)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
