"""The demo zoo: a tiny base LLM and three LoRA specialists trained here on real biological data.

A faithful miniature of the paper's setting (a base + molecule, protein and cell specialists with
all-module LoRA of one rank; the molecule specialist with its own soft-token encoder), committed
under ``assets/zoo/`` and loaded by the same loaders as any real model. Build, measure, compare:

    python -m esm_core zoo build --out /tmp/zoo      # reproduce the zoo (esm_core/zoo/build.py)
    python -m esm_core zoo skills                    # held-out skill accuracies, base vs specialists
    python -m esm_core zoo results                   # retention table of ES / average -> RESULTS.md

From Python (the app): esm_core/zoo/load.py (the committed zoo through the ordinary loaders).
Where it lies: esm_core/paths.py (ZOO_DIR, DEMO_DIR).
"""
