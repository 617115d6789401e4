"""bench/sft_vs_peers.py keeps its block of bench/RESULTS.md up to date: tables, versions and run facts."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import sft_vs_peers  # noqa: E402


def report(marker: str) -> dict:
    row = {"tool": "tunelab", "versions": {"torch": "2.13.0", "transformers": "5.24.0"}}
    peer = {"tool": "trl", "versions": {"trl": "0.24.0", "torch": "2.13.0"}}
    return {"started": "2026-11-26T14:28:00", "finished": "2026-11-26T15:20:00", "device": "x86_64, 2 cores",
            "load_average_before": [1.8, 1.5, 1.0], "load_average_after": [2.0, 2.0, 1.9], "tunelab_rev": "abc1234",
            "threads": 1, "parallel": True, "command": "bench/sft_vs_peers.py --steps 30", "data": {"samples": 2000},
            "tables": {"lora": {"rows": [row, peer], "markdown": f"**lora**\n\n| table {marker} |"}}}


def test_the_block_goes_under_the_heading_then_is_replaced_in_place(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## `bench/sft_vs_peers.py` — Peer benchmark (CPU)\n\nHand-written "
                       "prose.\n\n## another section\n", "utf-8")
    sft_vs_peers.write_results_md(results, report("one"))
    first = results.read_text("utf-8")
    assert first.index("Peer benchmark (CPU)") < first.index("| table one |") < first.index("Hand-written prose")
    assert "tunelab: torch 2.13.0, transformers 5.24.0; trl: torch 2.13.0, trl 0.24.0" in first
    assert "load average (1/5/15 min) 1.8, 1.5, 1.0 before and 2.0, 2.0, 1.9 after" in first
    assert "tunelab abc1234" in first and "the configurations side by side" in first

    sft_vs_peers.write_results_md(results, report("two"))
    second = results.read_text("utf-8")
    assert "| table one |" not in second and second.count(sft_vs_peers.RESULTS_BEGIN) == 1
    assert second.replace("| table two |", "| table one |") == first  # nothing else moved
    assert second.endswith("## another section\n")


def test_a_file_without_the_section_gets_one_at_the_end(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## something else\n", "utf-8")
    sft_vs_peers.write_results_md(results, report("one"))
    text = results.read_text("utf-8")
    assert text.index("## something else") < text.index("## `bench/sft_vs_peers.py`") < text.index("| table one |")


def test_an_older_report_renders_and_a_lone_marker_is_refused(tmp_path):
    import pytest

    old = report("old")
    del old["threads"], old["parallel"]  # results.json of runs before those fields existed
    results = tmp_path / "RESULTS.md"
    sft_vs_peers.write_results_md(results, old)
    assert "? torch thread(s) per run." in results.read_text("utf-8")
    results.write_text(f"# Benchmark results\n\n{sft_vs_peers.RESULTS_BEGIN}\n", "utf-8")
    with pytest.raises(SystemExit, match="one of the markers"):
        sft_vs_peers.write_results_md(results, report("one"))
