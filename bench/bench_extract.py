"""Benchmark: LoRA extraction streams, so its peak memory is a few tensors, not a checkpoint.

Two random LLaMA-shaped checkpoints are written tensor by tensor in safetensors shards with an
index, by a subprocess (the base; a "fine-tune" = base + a rank-8 change + small full-rank noise on
every block linear, and 100 changed embedding rows). ``extract_to`` then runs in a fresh subprocess
per method (``svd``, ``gram``), so its peak RSS is its own (VmHWM: the high-water mark of its own
memory, which unlike ru_maxrss does not inherit the parent's); the bench prints the checkpoint sizes,
the largest tensor, the peak RSS after the imports and after the extraction, time and totals.

    python bench/bench_extract.py                        # 4 blocks, width 1024, 128k vocab: 2 x 1.1 GiB
    python bench/bench_extract.py --layers 2 --vocab 32000 --dtype bfloat16      # quicker
    python bench/bench_extract.py --device cuda --methods svd   # the SVDs on a GPU

Target: peak RSS well under one checkpoint (and under the largest tensor, the embedding, which is
compared in row chunks).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = ("float32", "bfloat16")


def _shapes(a) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv = a.hidden, a.intermediate, a.hidden // 4  # 4x grouped-query attention, as LLaMA-3
    out = [("model.embed_tokens.weight", (a.vocab, h))]
    for n in range(a.layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (a.vocab, h))]


def write_pair(a, base: Path, ft: Path) -> None:
    """Both checkpoints, shard by shard (never a whole model in memory)."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    limit = a.shard_mb * 2**20
    for d in (base, ft):
        d.mkdir(parents=True)
    shard, size, maps, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        n += 1
        for d, which in ((base, 0), (ft, 1)):
            save_file({k: v[which] for k, v in shard.items()}, str(d / f"model-{n:05d}.safetensors"),
                      metadata={"format": "pt"})
        maps.update({k: f"model-{n:05d}.safetensors" for k in shard})
        shard, size = {}, 0

    for name, shape in _shapes(a):
        w = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        f = w.clone()
        if "_proj" in name:
            f += (torch.randn(shape[0], 8, generator=g) @ torch.randn(8, shape[1], generator=g)) * 2e-3
            f += torch.randn(shape, generator=g) * 2e-4
        elif "embed" in name:
            f[-100:] += torch.randn(100, shape[1], generator=g) * 0.02  # "new tokens" trained
        shard[name] = (w.to(dtype), f.to(dtype))
        size += w.numel() * w.element_size()
        if size >= limit:
            flush()
    if shard:
        flush()
    for d in (base, ft):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": maps}))


def peak_rss_mb() -> float:
    """This process's own resident high-water mark (Linux VmHWM; elsewhere ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(a) -> None:
    """The extraction alone, in this fresh process."""
    import torch

    from esm_core.importing.extract import extract_to

    if a.threads:
        torch.set_num_threads(a.threads)
    after_imports = peak_rss_mb()
    t0 = time.perf_counter()
    ext, _ = extract_to(a.out, a.ft, a.base, a.rank, device=a.device, method=a.method)
    print(json.dumps(dict(seconds=time.perf_counter() - t0, rss_imports_mb=after_imports, peak_rss_mb=peak_rss_mb(),
                          threads=torch.get_num_threads(),
                          peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
                          totals=ext.report["totals"], not_extracted=ext.report["not_extracted"])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--shard-mb", type=int, default=400)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the extraction (0: torch's default).")
    p.add_argument("--methods", default="svd,gram", help="Comma-separated: svd, gram (one subprocess each).")
    p.add_argument("--workdir", default=None, help="Where the checkpoints go (default: a temporary folder).")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--ft", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    if a.write:
        return write_pair(a, Path(a.base), Path(a.ft))
    shape_args = [f"--{k}={getattr(a, k.replace('-', '_'))}" for k in
                  ("layers", "hidden", "intermediate", "vocab", "dtype", "shard-mb")]
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        base, ft = Path(tmp) / "base", Path(tmp) / "ft"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write", "--base", str(base), "--ft", str(ft), *shape_args],
                       check=True)
        gb = [sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**30 for d in (base, ft)]
        elem = 4 if a.dtype == "float32" else 2
        largest = max(((n, s) for n, s in _shapes(a) if len(s) == 2), key=lambda x: x[1][0] * x[1][1])
        largest_lin = max((s for n, s in _shapes(a) if "_proj" in n), key=lambda s: s[0] * s[1])
        print(f"checkpoints: base {gb[0]:.2f} GiB, fine-tune {gb[1]:.2f} GiB ({a.dtype}, {a.layers} blocks, "
              f"width {a.hidden}, vocab {a.vocab}; written in {time.perf_counter() - t0:.0f}s)")
        print(f"largest tensor: {largest[0]} {list(largest[1])} = "
              f"{largest[1][0] * largest[1][1] * elem / 2**20:.0f} MiB; largest extracted linear {list(largest_lin)} "
              f"= {largest_lin[0] * largest_lin[1] * elem / 2**20:.1f} MiB")
        for method in a.methods.split(","):
            cmd = [sys.executable, __file__, "--child", "--ft", str(ft), "--base", str(base), "--rank", str(a.rank),
                   "--out", str(Path(tmp) / f"lora-{method}"), "--device", a.device, "--method", method,
                   "--threads", str(a.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(r.stderr)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            t = res["totals"]
            print(f"[{method}] {t['modules']} modules at rank {a.rank} in {res['seconds']:.1f}s on {a.device} "
                  f"({res['threads']} threads); "
                  f"relative residual {t['rel_residual']:.4f}, one rank for 1 %: {t['uniform_rank_for_1pct']}; "
                  f"not extracted but different: {[d['name'] for d in res['not_extracted']]}")
            print(f"[{method}] peak RSS {res['peak_rss_mb']:.0f} MiB ({res['rss_imports_mb']:.0f} MiB of it after "
                  f"the imports) vs {gb[0] * 1024:.0f} MiB per checkpoint, {(gb[0] + gb[1]) * 1024:.0f} MiB both"
                  + (f"; peak GPU {res['peak_gpu_mb']:.0f} MiB" if res["peak_gpu_mb"] is not None else ""))


if __name__ == "__main__":
    main()
