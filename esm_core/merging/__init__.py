"""Merge methods: the shared context and helpers, the registry, one file per method, merged outputs."""
