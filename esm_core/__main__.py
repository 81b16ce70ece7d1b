"""``python -m esm_core``: see esm_core/cli.py."""

import sys

from esm_core.cli import main

sys.exit(main())
