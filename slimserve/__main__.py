"""`python -m slimserve`: the CLI, for when the `slimserve` script is not on PATH."""

import sys

from slimserve.cli import main

sys.exit(main())
