"""The VLM benchmark: `iteris-lab bench --track vlm` writing into the repository, one torch thread by default.

    ITERIS_PROFILE=cpu python benchmarks/vlm.py --mask-ablation     # all options: iteris-lab bench --help
writes benchmarks/results/vlm.json (every number, settings, timings, sample captions) and vlm.md (the table).
"""
import sys
from pathlib import Path

from iteris_lab.cli import main

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.exit(main(["bench", "--track", "vlm", "--out", str(ROOT / "benchmarks" / "results"), "--threads", "1",
                   *sys.argv[1:]]))
