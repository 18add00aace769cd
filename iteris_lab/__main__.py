"""`python -m iteris_lab` is the `iteris-lab` command."""
import sys

from .cli import main

sys.exit(main())
