"""The `iteris-lab` command: merge, models, demo, bench (one module per subcommand).

Building the parser imports no torch: `iteris-lab --help` and `--version` answer at once; each subcommand
imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import IterisError
from . import bench, compare, merge, models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iteris-lab", description="Merge LoRA adapters with IterIS.",
                                     epilog="`iteris-lab COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"iteris-lab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    merge.add_parser(sub)
    models.add_parser(sub)
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
