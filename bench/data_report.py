#!/usr/bin/env python
"""Time ``tunelab data report`` (no ``--model``) on N synthetic Alpaca records; print records/s and peak memory.

Records are zh/en instructions of a few hundred characters built from random vocabulary, with about 5 % exact
duplicates, 5 % near-duplicates (a few characters changed) and a 10 % test file, so every detector has work.
The report runs in a child process so its peak RSS and CPU time are measured alone (``getrusage`` of the
children; the CPU time stays meaningful when other work shares the machine).

    python bench/data_report.py --records 100000
    python bench/data_report.py --records 1000000 --workdir /tmp/bench1m
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

EN_VERBS = ["Explain", "Write", "Summarize", "Translate", "List", "Describe", "Compare", "Classify", "Give", "Rewrite"]
ZH_VERBS = ["解释", "写一篇", "总结", "翻译", "列出", "描述", "比较", "分类", "给出", "改写"]


def _words(rng: random.Random) -> tuple[list[str], list[str]]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    en = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    zh = [chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(6000)]
    return en, zh


def _text(rng: random.Random, en: list[str], zh: list[str], chinese: bool, chars: int) -> str:
    if chinese:
        body = "".join(rng.choice(zh) for _ in range(chars))
        return "，".join(body[i : i + 20] for i in range(0, len(body), 20)) + "。"
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(en))
    return " ".join(out).capitalize() + "."


def generate(path: Path, test_path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    en, zh = _words(rng)
    recent: list[dict] = []
    with path.open("w", encoding="utf-8") as train, test_path.open("w", encoding="utf-8") as test:
        for i in range(n):
            roll = rng.random()
            if recent and roll < 0.05:
                row = dict(rng.choice(recent))  # exact duplicate
            elif recent and roll < 0.10:
                row = dict(rng.choice(recent))
                out = row["output"]
                cut = rng.randrange(len(out))
                row["output"] = out[:cut] + rng.choice("xyz的了") + out[cut + 1 :]  # near-duplicate
            else:
                chinese = rng.random() < 0.5
                verb = rng.choice(ZH_VERBS if chinese else EN_VERBS)
                row = {"instruction": f"{verb}{'' if chinese else ' '}{_text(rng, en, zh, chinese, 40)}",
                       "input": _text(rng, en, zh, chinese, rng.randint(0, 120)) if rng.random() < 0.5 else "",
                       "output": _text(rng, en, zh, chinese, rng.randint(80, 400))}
            recent = (recent + [row])[-1000:]
            (test if i % 10 == 9 else train).write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=Path("bench-data-report"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    train, test = args.workdir / f"train_{args.records}.jsonl", args.workdir / f"test_{args.records}.jsonl"
    if not train.exists():
        started = time.perf_counter()
        generate(train, test, args.records)
        print(f"generated {args.records} records in {time.perf_counter() - started:.1f}s "
              f"({(train.stat().st_size + test.stat().st_size) / 1e6:.0f} MB)")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    command = [sys.executable, "-m", "tunelab.cli", "data", "report", str(train), str(test),
               "-o", str(args.workdir / f"report_{args.records}")]
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
    # CPU time as well as wall time: on a shared machine the wall clock measures the neighbours too.
    cpu = usage.ru_utime + usage.ru_stime
    report = json.loads((args.workdir / f"report_{args.records}" / "report.json").read_text("utf-8"))
    print(json.dumps({"records": report["records"], "wall_s": round(wall, 1),
                      "records_per_s": round(report["records"] / wall), "cpu_s": round(cpu, 1),
                      "records_per_cpu_s": round(report["records"] / cpu), "peak_rss_mb": round(peak_mb),
                      "exact_removable": report["duplicates"]["exact"]["removable"],
                      "near_removable": report["duplicates"]["near"]["removable"],
                      "leaked": report["leakage"]["leaked"], "topics": report["diversity"]["topics"]["k"],
                      # Other jobs share the machine: the 1-minute load average before and after says how much.
                      "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1),
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
