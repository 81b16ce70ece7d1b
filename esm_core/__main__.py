"""``python -m esm_core``: see esm_core/cli.py."""

import sys

from .cli import main

sys.exit(main())
