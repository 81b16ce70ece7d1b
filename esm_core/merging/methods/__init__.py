"""Merge methods, one small file each (``METHOD``, or ``LINEAR``/``TIES`` for DARE), listed by
esm_core/merging/registry.py. Each file defines a MergeMethod: name, pretty name, paper, URL,
parameters (which fill the app's widgets and the CLI's ``--param``) and the function. ``_ops`` and
``_learn`` hold helpers shared by several methods. Methods never import the registry.
"""
