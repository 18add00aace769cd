"""The diffusion benchmark: `iteris-lab bench --track diffusion` writing into the repository.

    ITERIS_PROFILE=cpu python benchmarks/diffusion.py     # all options: iteris-lab bench --help
writes benchmarks/results/diffusion.json (every number), diffusion.md (the table), docs/diffusion_scores.png and
docs/diffusion_grid.png. Threads: $ITERIS_THREADS, else 1.
"""
import os
import sys
from pathlib import Path

from iteris_lab.cli import main

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.exit(main(["bench", "--track", "diffusion", "--out", str(ROOT / "benchmarks" / "results"), "--figures",
                   str(ROOT / "docs"), "--threads", os.environ.get("ITERIS_THREADS", "1"), *sys.argv[1:]]))
