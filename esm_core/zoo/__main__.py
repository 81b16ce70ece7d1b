"""``python -m esm_core.zoo <build|skills|results|demo-data>``: the same as ``python -m esm_core zoo ...``."""

import sys

from .cli import main

sys.exit(main())
