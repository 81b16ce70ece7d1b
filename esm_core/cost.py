"""What an estimation will cost, before it runs: FLOPs, memory, and the time they imply on this device.

From the base's config (no weights loaded), the adapters' rank and the probe lengths:

- FLOPs of one forward of the decoder (no LM head) per token and block: the projections
  ``2·(2d² + 2·d·d_kv + 3·d·I)``, causal attention ``2·T·d``, and the LoRA factors; an estimation
  runs the base once and each specialist forward + block-local backward (about one more forward:
  the base weights are frozen, only activation gradients and the LoRA factors' are formed), so
  ``(1 + 2K)`` forwards of every probe;
- memory: the weights once (one base copy + K adapters), and per batch the block outputs kept for
  pooling (base and the current specialist, no graph) plus one block's autograd graph (streaming);
- time: FLOPs over the device's peak (a table of known GPUs at bf16, or a matmul measured on this
  CPU), so the figure is a lower bound that the run's manifest sets beside the measured time.

For LLaMA-3.1-8B, 3 specialists and 330 probes of ~450 tokens this gives ~1.5e16 FLOP, ~15 s at
the ~990 TFLOP/s of an H100/H200 (docs/METHOD.md section 9).

    est = estimate_cost(base_config, n_specialists=3, rank=8, n_targets=7, n_probes=330,
                        mean_tokens=450, batch_size=16, dtype_bytes=2)
    print(est.summary())
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

# Dense bf16 peak of known accelerators (FLOP/s); used for the lower-bound time only.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "RTX 4090": 165e12, "V100": 125e12, "T4": 65e12}


@dataclass
class Cost:
    flops: float  # whole estimation
    forward_flops_per_token: float
    weight_bytes: float
    activation_bytes_per_batch: float
    device: str
    peak_flops: float | None  # of the device, FLOP/s (None: unknown)

    @property
    def ideal_seconds(self) -> float | None:
        return self.flops / self.peak_flops if self.peak_flops else None

    def summary(self) -> str:
        t = self.ideal_seconds
        return (f"{self.flops:.2e} FLOP, weights {self.weight_bytes / 2**30:.2f} GiB, activations "
                f"{self.activation_bytes_per_batch / 2**30:.2f} GiB per batch; on {self.device}"
                + (f" at {_rate(self.peak_flops)}: at least {t:.1f} s" if t else " (peak unknown)"))

    def record(self) -> dict:
        d = asdict(self)
        d["ideal_seconds"] = self.ideal_seconds
        return d


def _rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.0f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.0f} GFLOP/s"


def _get(cfg, *names, default=None):
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


_CPU_PEAK: dict[int, float] = {}  # measured once per process and thread count


def device_peak(device: torch.device) -> tuple[str, float | None]:
    """(name, peak FLOP/s) of a device: a known GPU's bf16 peak, or a 1024² float32 matmul timed here."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        return name, peak
    threads = torch.get_num_threads()
    if threads not in _CPU_PEAK:
        a = torch.randn(1024, 1024)
        a @ a  # warm-up
        reps, t0 = 4, time.perf_counter()
        for _ in range(reps):
            a @ a
        _CPU_PEAK[threads] = reps * 2 * 1024**3 / (time.perf_counter() - t0)
    return f"CPU ({threads} threads)", _CPU_PEAK[threads]


def estimate_cost(base_config, *, n_specialists: int, rank: int, n_targets: int, n_probes: int, mean_tokens: float,
                  batch_size: int, dtype_bytes: int, device: torch.device | None = None,
                  peak_flops: float | None = None) -> Cost:
    """Cost of one estimation (see the module doc). ``base_config``: a transformers config or its dict."""
    d = int(_get(base_config, "hidden_size", "n_embd"))
    L = int(_get(base_config, "num_hidden_layers", "n_layer"))
    inter = int(_get(base_config, "intermediate_size", default=4 * d))
    heads = int(_get(base_config, "num_attention_heads", default=1))
    kv = int(_get(base_config, "num_key_value_heads", default=heads))
    vocab = int(_get(base_config, "vocab_size", default=0))
    d_kv = d // heads * kv
    T = float(mean_tokens)
    proj = 2 * (2 * d * d + 2 * d * d_kv + 3 * d * inter)
    lora = 2 * rank * n_targets * (2 * d)  # r*(in+out) per module, roughly 2d for every target
    per_token = L * (proj + 2 * T * d + lora)
    flops = (1 + 2 * n_specialists) * n_probes * T * per_token
    params = L * (2 * d * d + 2 * d * d_kv + 3 * d * inter + 2 * d) + 2 * vocab * d
    adapters = n_specialists * L * n_targets * rank * 2 * d
    b = min(batch_size, n_probes)
    kept = 2 * (L + 1) * b * T * d * 4  # block outputs of base and specialist, float32 for pooling
    graph = b * T * (8 * d + 4 * inter) * dtype_bytes + b * heads * T * T * dtype_bytes  # one block's graph
    if device is None:
        device = torch.device("cpu")
    name, peak = device_peak(device) if peak_flops is None else (str(device), peak_flops)
    return Cost(flops, per_token, (params + adapters) * dtype_bytes, kept + graph, name, peak)
