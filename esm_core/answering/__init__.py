"""Answers of a model to few-shot prompts: the prompts, one model at a time (reference), many at once (fast)."""
