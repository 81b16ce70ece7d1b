"""Benchmark: merging in the factor space (Eq. 1) vs the delta space, on the demo zoo's skill retention.

    python bench/bench_merge_space.py                 # writes bench/results/merge_space.md
    python bench/bench_merge_space.py --per-label 20  # quicker

ES-Merging (reference preset, combined), plain average and TIES (density 0.5) are merged in both
spaces (``merge_space`` factors / delta; delta re-factorised at the sum of the input ranks) and
scored on every held-out skill set of the zoo by label likelihood, next to the base and the
specialists. For each merge it also prints what the merged update keeps of each specialist's own
update and the cross-term energy (esm_core/merging/space.py), the numbers that explain the
retention. Retention of modality m = (merged - base) / (specialist_m - base) on m.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = (("es", {}), ("average", {}), ("ties", {"density": 0.5}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-label", type=int, default=40, help="questions per label and skill")
    ap.add_argument("--k", type=int, default=1, help="in-context examples per question")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "merge_space.md"))
    ap.add_argument("--results-md", default=str(ROOT / "assets" / "zoo" / "RESULTS.md"),
                    help="the zoo's RESULTS.md whose '## Merge space' section is replaced (appended when absent); "
                         "'' leaves it alone")
    args = ap.parse_args()

    from esm_core.merging.base import MergeContext
    from esm_core.merging.output import update_report
    from esm_core.merging.registry import get_method
    from esm_core.pipeline import Workspace, estimate
    from esm_core.zoo.load import load_skill_sets, load_zoo
    from esm_core.zoo.results import retention_table
    from esm_core.zoo.skills import MODALITIES

    spec, sset, _ = load_zoo()
    ws = Workspace.from_spec(spec, sset=sset)
    t0 = time.perf_counter()
    res = estimate(ws)
    print(f"estimation {time.perf_counter() - t0:.1f} s", flush=True)
    template = sset.adapters[sset.names[0]]
    merged, shares = [], {}
    for space in ("factors", "delta"):
        for name, params in METHODS:
            ctx = MergeContext.from_specialists(sset, workspace=ws, es_result=res, seed=spec.method.seed, space=space)
            out = get_method(name).run(ctx, params)
            tag = f"{name}-{space}"
            sset.add_adapter(tag, out.tensors, out.adapter_config(template, sset.base_path, ctx.folded))
            merged.append(tag)
            shares[tag] = update_report(out, ctx, ctx.folded)["summary"]
            print(f"{tag}: " + ", ".join(f"{k} {v:.3f}" for k, v in shares[tag].items())
                  + (f"; SVD residual max {out.info['residual_max']:.1e}" if space == "delta" else ""), flush=True)
    sets = load_skill_sets(k=args.k, per_label=args.per_label)
    from esm_core.zoo.scoring import measure_skills

    t1 = time.perf_counter()
    rep = measure_skills(sset, ws.encoders, sets, [None, *sset.names, *merged], methods=("likelihood",))
    print(f"scoring {time.perf_counter() - t1:.1f} s", flush=True)
    table = retention_table(rep, merged, "likelihood")
    names = sset.names
    share_rows = ["| merge | " + " | ".join(f"share {n}" for n in names) + " | cross energy |",
                  "|---|" + "---|" * (len(names) + 1)]
    for tag, s in shares.items():
        share_rows.append(f"| {tag} | " + " | ".join(f"{s[f'share {n}']:.3f}" for n in names)
                          + f" | {100 * s['cross energy']:.1f} % |")
    n_q = sum(r["n"] for r in rep.rows if r["model"] == "base")
    text = "\n".join([
        "# Merge space on the demo zoo: factors (Eq. 1) vs delta (updates, re-factorised)",
        "",
        "Produced by `python bench/bench_merge_space.py`; numbers as measured. ES-Merging (reference preset,",
        "combined mode), plain average and TIES (density 0.5), each merged on the LoRA factors (`factors`,",
        "Eq. 1) and on the updates s*B*A re-factorised by SVD at the sum of the input ranks (`delta`).",
        f"{n_q} held-out questions over {len(sets)} skills ({args.k} in-context example, label likelihood).",
        "",
        "## What each merged update keeps (mean over the modules)",
        "",
        "*share k*: least-squares weight of specialist k's own update in the merged update (1 = kept whole);",
        "*cross energy*: share of the merged update's energy outside the span of the specialists' updates.",
        "",
        *share_rows,
        "",
        "## Skill retention (label likelihood)",
        "",
        table,
        "",
        f"Modalities: {', '.join(MODALITIES)}.",
        "",
    ])
    Path(args.out).write_text(text)
    print(text)
    if args.results_md:
        put_section(Path(args.results_md), text)


SECTION = "## Merge space: factors (Eq. 1) vs delta"


def put_section(results_md: Path, text: str) -> None:
    """Replace (or append) the zoo RESULTS.md section that holds this benchmark's tables, atomically."""
    body = text.split("\n## ", 1)[1].replace("\n## ", "\n### ")
    section = "\n".join([
        SECTION, "",
        "From `python bench/bench_merge_space.py` (bench/results/merge_space.md; reference preset, ES combined,",
        "TIES density 0.5; delta re-factorised at the sum of the input ranks). `python -m esm_core zoo results`",
        "rewrites the sections above; this benchmark rewrites this one.", "",
        "### " + body.rstrip(), ""])
    old = results_md.read_text()
    head = old.split("\n" + SECTION, 1)[0].rstrip("\n")
    tmp = results_md.with_name(results_md.name + ".tmp")
    tmp.write_text(head + "\n\n" + section)
    tmp.replace(results_md)


if __name__ == "__main__":
    main()
