"""Embedding-space signals: SWD per layer, per-unit absolute gradients, and the pass that collects them."""
