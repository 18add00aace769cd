"""The `iteris-lab` command: merge, demo, bench (one module per subcommand)."""
from __future__ import annotations

import argparse
import sys

from ..errors import IterisError
from . import bench, compare, merge


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iteris-lab", description="Merge LoRA adapters with IterIS.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge.add_parser(sub)
    bench.add_parsers(sub)
    compare.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (IterisError, OSError) as err:  # bad input, or a file that cannot be read or written: no traceback
        print(f"iteris-lab {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
