#!/usr/bin/env python
"""Write ``docs/config.md``, the config reference, from the schema (:func:`tunelab.config.docs.render_config_docs`).

Run it after changing ``src/tunelab/config/schema.py``; ``tests/unit/test_config_docs.py`` fails until you do.

Usage::

    python scripts/gen_config_docs.py            # write docs/config.md
    python scripts/gen_config_docs.py --out FILE # write somewhere else
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunelab.config.docs import render_config_docs

DOCS_PATH = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS_PATH, help=f"output file (default {DOCS_PATH})")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # newline="\n": the committed file must be byte-identical on every platform for the drift test.
    args.out.write_text(render_config_docs(), encoding="utf-8", newline="\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
