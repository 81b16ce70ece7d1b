"""Merge methods, one small file each; importing this package registers them all.

Each file defines one ``MergeMethod`` (name, pretty name, paper, URL, parameters, function) and
calls ``esm_core.merge.register``. The registry fills the app's select boxes and the CLI's
``--method`` choices. ``_ops`` and ``_learn`` hold helpers shared by several methods.
"""

from . import average, es  # noqa: F401
from . import consensus, dare, emr, pcb, task_arithmetic, ties  # noqa: F401
from . import adamerging, finetune  # noqa: F401
