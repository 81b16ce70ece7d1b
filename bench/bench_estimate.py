"""Benchmark: full ES coefficient estimation vs a naive implementation of the same numbers.

Ours: one base copy carrying K adapters, batched forward with block hooks, unit-wise |grad| by hooks
and one backward per batch (layer-local via detached block inputs), SWD for all sets at once.
Naive, as the authors' code is structured: K+1 model copies (a base and one PEFT model per
specialist, each with its own base weights); an embedding pass of every copy over the probes; then,
per specialist, a base forward and a specialist forward per unit of probes (a mini-batch of 2 in the
reference preset, one probe in the paper preset) and one ``torch.autograd.grad`` call per layer (and
per modality) and per unit; one POT call per (specialist, modality, layer) set after sklearn's
StandardScaler.

Both run in fresh subprocesses (so peak memory is each one's own) on the same probes and must give
the same coefficients; the bench prints both times, their ratio and the peak memory of each.

    python bench/bench_estimate.py                      # ~4M-parameter LLaMA, 330 probes, reference
    python bench/bench_estimate.py --preset paper       # per-sample Frobenius signal, all modalities
    python bench/bench_estimate.py --shape llama8b --device cuda --skip-naive   # real scale on a GPU

Target: >= 3x faster than naive; peak memory = one base copy + adapters + activations.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # ~3.6M parameters: the size whose timings were measured on the 2-core development machine
    "small": dict(layers=6, hidden=192, intermediate=768, heads=6, kv_heads=6),
    # LLaMA-3.1-8B's layout (32 blocks, GQA 4:1, MLP 3.5x) at 1/16 of its width
    "mini": dict(layers=32, hidden=256, intermediate=896, heads=8, kv_heads=2),
    # LLaMA-3.1-8B and -70B shapes (random weights built in the worker, bf16): for a GPU run
    "llama8b": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    "llama70b": dict(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256),
}
IN_MEMORY = ("llama8b", "llama70b")  # too large to save a random base first: built on the device


def peak_memory(device) -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if str(device).startswith("cuda"):
        import torch

        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ------------------------------------------------------------------------------------ world
def make_samples(n: int, seed: int = 0) -> dict[str, list[str]]:
    """Real molecules and cells from ../shared/data/registry when present, else synthetic; proteins synthetic."""
    import random

    rng = random.Random(seed)
    reg = ROOT.parent / "shared" / "data" / "registry"
    mols, cells = [], []
    if (reg / "molecules" / "chembl_drugs.csv").is_file():
        mols = [l.strip() for l in (reg / "molecules" / "chembl_drugs.csv").read_text().splitlines()[1:] if l.strip()]
        mols = [m for m in mols if len(m) <= 60]
    if (reg / "singlecell" / "pbmc68k_reduced_top50.tsv").is_file():
        cells = [l.split("\t")[-1] for l in (reg / "singlecell" / "pbmc68k_reduced_top50.tsv").read_text().splitlines()[1:]]
    if len(mols) < n:
        mols = ["C" * rng.randint(2, 12) + "O" for _ in range(n)]
    if len(cells) < n:
        genes = [f"G{i}" for i in range(500)]
        cells = [" ".join(rng.sample(genes, 50)) for _ in range(n)]
    aa = "ACDEFGHIKLMNPQRSTVWY"
    prots = ["M" + "".join(rng.choice(aa) for _ in range(rng.randint(60, 300))) for _ in range(n)]
    return {"molecule": rng.sample(mols, n), "protein": prots, "cell": rng.sample(cells, n)}


def build_world(d: Path, shape: str, rank: int) -> dict:
    from esm_core.tiny import build_tiny_base, make_lora_adapter

    s = SHAPES[shape]
    base = build_tiny_base(d / "base", layers=s["layers"], hidden=s["hidden"], intermediate=s["intermediate"],
                           heads=s["heads"], kv_heads=s["kv_heads"])
    ads = {n: str(make_lora_adapter(base, d / n, seed=i + 1, r=rank, alpha=2 * rank, scale=0.05))
           for i, n in enumerate(["mol", "prot", "cell"])}
    return {"base": str(base), "adapters": ads}


def build_world_random(d: Path, shape: str, rank: int) -> dict:
    """Adapters of a large shape written directly (the random base is built in the worker)."""
    import torch
    from safetensors.torch import save_file

    s = SHAPES[shape]
    h, inter, kvd = s["hidden"], s["intermediate"], s["hidden"] // s["heads"] * s["kv_heads"]
    dims = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kvd), "self_attn.v_proj": (h, kvd),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
            "mlp.down_proj": (inter, h)}
    ads = {}
    for i, n in enumerate(["mol", "prot", "cell"]):
        g = torch.Generator().manual_seed(i + 1)
        sd = {}
        for l in range(s["layers"]):
            for mod, (din, dout) in dims.items():
                pre = f"base_model.model.model.layers.{l}.{mod}"
                sd[f"{pre}.lora_A.weight"] = (torch.randn(rank, din, generator=g) * 0.01).to(torch.bfloat16)
                sd[f"{pre}.lora_B.weight"] = (torch.randn(dout, rank, generator=g) * 0.01).to(torch.bfloat16)
        (d / n).mkdir(parents=True)
        save_file(sd, str(d / n / "adapter_model.safetensors"))
        (d / n / "adapter_config.json").write_text(json.dumps(dict(
            peft_type="LORA", r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])))
        ads[n] = str(d / n)
    return {"base": None, "adapters": ads}


def spec_for(world: dict, preset: str, n: int, projections: int, device: str, tokens: int = 144):
    from esm_core.config import MethodConfig
    from esm_core.runspec import ModalitySpec, RunSpec, SpecialistSpec

    per = tokens // 3  # the probe's length in tokens, shared by the three modalities
    mods = [ModalitySpec("molecule", "Molecule: ", "smiles", max_tokens=per),
            ModalitySpec("protein", "Protein: ", "protein", max_tokens=per),
            ModalitySpec("cell", "Cell: ", "genes", max_tokens=per)]
    specs = [SpecialistSpec(k, v, m) for (k, v), m in zip(world["adapters"].items(), ["molecule", "protein", "cell"])]
    method = MethodConfig.from_preset(preset, probes_per_modality=n, n_projections=projections, device=device,
                                      batch_size=16, max_modality_tokens=per)
    return RunSpec(base=world["base"] or "random", specialists=specs, modalities=mods, method=method)


def load_sset(world: dict, spec, shape: str):
    import torch

    from esm_core.models import SpecialistSet

    if shape not in IN_MEMORY:
        return None
    from transformers import LlamaConfig, LlamaForCausalLM

    from esm_core.tiny import char_tokenizer

    s = SHAPES[shape]
    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      max_position_embeddings=8192, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    dev = torch.device(spec.method.device if spec.method.device != "auto" else "cuda")
    torch.manual_seed(0)
    with torch.device(dev):
        lm = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return SpecialistSet.from_model(lm, tok, list(world["adapters"].items()),
                                    modalities=[s.modality for s in spec.specialists], base_path="random")


# ------------------------------------------------------------------------------------ workers
def run_ours(world, spec, samples, shape) -> dict:
    import torch

    from esm_core.cost import device_peak
    from esm_core.pipeline import Workspace, estimate

    dev = spec.method.device if spec.method.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_name, peak_flops = device_peak(torch.device(dev))  # on a CPU: a matmul measured here, first
    t0 = time.perf_counter()
    ws = Workspace.from_spec(spec, samples=samples, sset=load_sset(world, spec, shape))
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = estimate(ws)
    t_est = time.perf_counter() - t1
    mem = peak_memory(ws.sset.device)
    sizes = dict(base_mb=sum(p.numel() * p.element_size() for n, p in ws.sset.model.named_parameters()
                             if "lora_" not in n) / 2**20,
                 adapters_mb=sum(p.numel() * p.element_size() for n, p in ws.sset.model.named_parameters()
                                 if "lora_" in n) / 2**20)
    return dict(load_s=t_load, estimate_s=t_est, timings=res.timings, lam=res.lam, probes=res.probe_summary,
                flops=res.cost["flops"], ideal_s=res.cost["ideal_seconds"], device=device_name,
                peak_flops=peak_flops, **mem, **sizes)


def run_naive(world, spec, samples, shape) -> dict:
    """The authors' structure, written plainly (see module docstring)."""
    import numpy as np
    import ot
    import torch
    from peft import PeftModel
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoModelForCausalLM

    from esm_core.coefficients import combine, element_coefficients, layer_coefficients, modality_weights
    from esm_core.pipeline import Workspace
    from esm_core.signals.swd import projections

    cfg = spec.method
    t0 = time.perf_counter()
    ws = Workspace.from_spec(spec, samples=samples)  # only for identical probe inputs
    batcher = ws.batcher(cfg)
    base = AutoModelForCausalLM.from_pretrained(world["base"]).eval()  # copy 1
    specs = {}
    for name, path in world["adapters"].items():  # copies 2..K+1
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["base"]), path, is_trainable=True)
        pm.eval()
        specs[name] = pm
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()

    def blocks_of(m):
        lm = m.get_base_model() if hasattr(m, "get_base_model") else m
        return lm, lm.model.layers

    def forward(m, x, mask, final_norm=False):
        lm, layers = blocks_of(m)
        outs = [None] * len(layers)
        hs = [layers[l].register_forward_hook(lambda mod, a, o, l=l: outs.__setitem__(l, o)) for l in range(len(layers))]
        o = lm.model(inputs_embeds=x, attention_mask=mask, output_hidden_states=final_norm)
        for h in hs:
            h.remove()
        if final_norm:  # the authors' element signal reads output_hidden_states, normalised at block L
            outs[-1] = o.hidden_states[-1]
        return [x, *outs]

    mods = batcher.probes.modalities
    L = len(blocks_of(base)[1])
    N = batcher.probes.n_probes
    names = list(specs)
    unit = cfg.element_group
    units = [list(range(s, min(N, s + unit))) for s in range(0, N, unit)]
    # 1) embedding pass: every model copy over every unit of probes, hooks on the blocks
    pooled = {m: np.zeros((len(names) + 1, L + 1, N, batcher.sset.hidden_size)) for m in mods}
    for mi, model in enumerate([base, *specs.values()]):
        for idx in units:
            batch = batcher.batch(idx)
            with torch.no_grad():
                hs = forward(model, batch.inputs_embeds.detach(), batch.attention_mask)
            for m in mods:
                mk = batch.masks[m].float().unsqueeze(-1)
                for l in range(L + 1):
                    pooled[m][mi, l, idx] = ((hs[l] * mk).sum(1) / mk.sum(1)).numpy()
    # 2) element pass, one specialist at a time: base forward + specialist forward per unit, then
    #    one autograd.grad per layer (and per modality) w.r.t. that layer's LoRA parameters
    layer_params = {n: {l: [(k, p) for k, p in specs[n].named_parameters() if "lora_" in k and f"layers.{l}." in k]
                        for l in range(L)} for n in names}
    scores = {n: {k: torch.zeros_like(p) for k, p in specs[n].named_parameters() if "lora_" in k} for n in names}
    for ki, n in enumerate(names):
        el_mods = [spec.specialists[ki].modality] if cfg.element_modalities == "own" else mods
        for idx in units:
            batch = batcher.batch(idx)
            x = batch.inputs_embeds.detach()
            fn = cfg.element_last_block == "final_norm"
            with torch.no_grad():
                hb = forward(base, x, batch.attention_mask, fn)
            hk = forward(specs[n], x, batch.attention_mask, fn)
            for m in el_mods:
                mask = batch.masks[m]
                for l in range(1, L + 1):
                    diff = hk[l] - hb[l]
                    if cfg.element_signal == "frobenius":
                        loss = sum(diff[b][mask[b]].norm() for b in range(diff.shape[0]))
                    else:
                        loss = diff[mask].pow(2).mean()
                    ps = layer_params[n][l - 1]
                    grads = torch.autograd.grad(loss, [p for _, p in ps], retain_graph=True)
                    for (k, _), g in zip(ps, grads):
                        scores[n][k] += g.abs()
    t_pass = time.perf_counter() - t1
    t2 = time.perf_counter()
    P0 = projections(batcher.sset.hidden_size, cfg.n_projections, cfg.seed).numpy()
    stream = np.random.RandomState(cfg.seed)  # the authors' per-pair draws (swd_projections=per_pair_stream)
    D = np.zeros((len(names), len(mods), L + 1))
    for ki in range(len(names)):
        for mi, m in enumerate(mods):
            for l in range(L + 1):
                P = P0
                if cfg.swd_projections == "per_pair_stream" and l > 0:
                    raw = stream.randn(cfg.n_projections, batcher.sset.hidden_size)
                    P = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).T
                X, Y = pooled[m][0, l], pooled[m][ki + 1, l]
                if cfg.standardize:
                    sc = StandardScaler().fit(np.vstack([X, Y]))
                    X, Y = sc.transform(X), sc.transform(Y)
                D[ki, mi, l] = ot.sliced_wasserstein_distance(X.astype(np.float32), Y.astype(np.float32),
                                                              projections=P.astype(np.float32), p=cfg.swd_p)
    t_swd = time.perf_counter() - t2
    # coefficients from the raw numbers (the formulas of docs/METHOD.md sections 2-4; cheap either way)
    from esm_core.adapters import parse_peft_key

    g = {parse_peft_key(k)[0]: torch.stack([scores[n][k].float() for n in names]) for k in scores[names[0]]}
    w = modality_weights(mods, [s.modality for s in spec.specialists], cfg.other_modality_weight)
    ls = layer_coefficients(torch.from_numpy(D).float(), cfg, w)
    es = element_coefficients(g, cfg)
    lam = combine(ls.alpha, es.beta, cfg.mode)
    return dict(load_s=t_load, estimate_s=time.perf_counter() - t1, pass_s=t_pass, swd_s=t_swd, lam=lam,
                **peak_memory("cpu"))


def worker(args) -> None:
    from safetensors.torch import save_file

    world = json.loads(Path(args.world).read_text())
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    samples = json.loads(Path(args.samples).read_text())
    spec = spec_for(world, args.preset, args.probes, args.projections, args.device, args.tokens)
    fn = run_ours if args.worker == "ours" else run_naive
    out = fn(world, spec, samples, args.shape)
    save_file({str(k): v.contiguous() for k, v in out.pop("lam").items()}, args.result + ".safetensors")
    Path(args.result + ".json").write_text(json.dumps(out, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--preset", choices=["reference", "paper"], default="reference")
    ap.add_argument("--probes", type=int, default=330)
    ap.add_argument("--projections", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=144, help="probe length cap in tokens (shared by the modalities)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in both workers (0: torch's default)")
    ap.add_argument("--worker", choices=["ours", "naive"])
    ap.add_argument("--world")
    ap.add_argument("--samples")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from safetensors.torch import load_file

    d = Path(tempfile.mkdtemp(prefix="esm_bench_"))
    world = build_world_random(d, args.shape, args.rank) if args.shape in IN_MEMORY else build_world(d, args.shape, args.rank)
    (d / "world.json").write_text(json.dumps(world))
    (d / "samples.json").write_text(json.dumps(make_samples(args.probes)))
    results = {}
    for which in ["ours"] + ([] if args.skip_naive else ["naive"]):
        cmd = [sys.executable, __file__, "--worker", which, "--world", str(d / "world.json"), "--samples",
               str(d / "samples.json"), "--result", str(d / which), "--shape", args.shape, "--preset", args.preset,
               "--probes", str(args.probes), "--projections", str(args.projections), "--device", args.device,
               "--threads", str(args.threads), "--tokens", str(args.tokens)]
        print(f"running {which} ...", flush=True)
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        results[which] = json.loads((d / f"{which}.json").read_text())
        results[which]["lam"] = load_file(str(d / f"{which}.safetensors"))
    o = results["ours"]

    print(f"\nshape={args.shape} preset={args.preset} probes={o['probes'].get('n_probes')} "
          f"projections={args.projections} specialists=3 rank={args.rank} device={args.device} "
          f"threads={args.threads or torch.get_num_threads()}")
    print(f"base copy {o['base_mb']:.1f} MB, adapters {o['adapters_mb']:.2f} MB")
    print(f"{'':8} {'estimate s':>11} {'load s':>8} {'peak RSS MB':>12} {'peak GPU MB':>12}")
    for k, r in results.items():
        print(f"{k:8} {r['estimate_s']:11.2f} {r['load_s']:8.2f} {r['peak_rss_mb']:12.0f} "
              f"{r.get('peak_gpu_mb', float('nan')):12.0f}")
    print(f"ours breakdown: forward {o['timings'].get('forward_s', 0):.2f}s, backward {o['timings'].get('backward_s', 0):.2f}s, "
          f"SWD {o['timings'].get('swd_s', 0):.2f}s")
    if "naive" in results:
        n = results["naive"]
        print(f"naive breakdown: passes {n['pass_s']:.2f}s, SWD (POT per set) {n['swd_s']:.2f}s")
        diff = max(float((results['ours']['lam'][k] - n['lam'][k]).abs().max()) for k in n["lam"])
        print(f"max |lambda_ours - lambda_naive| = {diff:.2e}")
        print(f"SPEEDUP (naive / ours) = {n['estimate_s'] / o['estimate_s']:.2f}x   (target >= 3x)")
        print(f"memory ratio (naive / ours, peak RSS) = {n['peak_rss_mb'] / o['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
