"""The LLM benchmark: `iteris-lab bench --track llm` writing into the repository.

    ITERIS_PROFILE=cpu python benchmarks/llm.py --model minilm     # or smollm2; all options: iteris-lab bench --help
writes benchmarks/results/<model>.json (every number), <model>.md (the table) and docs/<model>_scores.png.
"""
import sys
from pathlib import Path

from iteris_lab.cli import main

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.exit(main(["bench", "--track", "llm", "--out", str(ROOT / "benchmarks" / "results"), "--figures",
                   str(ROOT / "docs"), *sys.argv[1:]]))
