"""Merge methods, one small file each; importing this package registers them all.

Each file defines one ``MergeMethod`` (name, pretty name, paper, URL, parameters, function) and
calls ``esm_core.merge.register``. The registry fills the app's select boxes and the CLI's
``--method`` choices.
"""

from . import average, es  # noqa: F401
