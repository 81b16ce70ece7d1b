#!/usr/bin/env bash
# Reproduce bench/results/: every merge method x every task with data here (>= 200 test rows) on the demo zoo.
# Run from the repository root; needs assets/zoo/run.yaml and ../shared/data (or --data-dir / $ESM_DATA_DIR).
# AdaMerging and task fine-tuning run with fewer steps than their defaults (10 and 30) to fit the 2-core CPU;
# each learns per task from 64 few-shot prompts built from that task's training rows.
set -euo pipefail
python -m esm_core compare --config assets/zoo/run.yaml --tasks all --min-test-rows 200 \
  --n 200 --seed 0 --split-seed 0 --k 5 --n-boot 1000 --threads 2 \
  --methods all --train-prompts 64 --data-scope task \
  --param adamerging.steps=10 --param finetune.steps=30 \
  --no-progress --out bench/results "$@"
