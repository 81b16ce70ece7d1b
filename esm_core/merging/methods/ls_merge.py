"""LS-Merge (merging in a learned latent space of weights; the baseline of the paper's Table 1).

A small transformer VAE is trained, per merge, on the specialists' own weights cut into chunks:

- **chunks** follow the tensors (layer-aware: a chunk never straddles two factors). Each factor is
  flattened and cut into chunks of ``chunk`` values (the last one zero-padded). Each chunk is
  divided by its RMS (kept aside), and read as ``chunk / token`` tokens of ``token`` values. Every
  token gets a position embedding and an embedding of its factor's kind (module and A/B);
- **encoder**: linear token embedding, ``layers`` transformer layers, then the posterior's mean and
  log-variance (``latent`` dims) from the tokens' states side by side;
- **decoder**: the latent mapped to one state per token position (plus both embeddings), ``layers``
  transformer layers, linear back to ``token`` values;
- **training**: MSE reconstruction + ``kl`` x KL(q || N(0, I)), Adam, ``steps`` steps of ``batch``
  chunks drawn from all specialists (seeded);
- **merge**: each specialist's chunks are encoded to their posterior means. The means are averaged
  with ``weights`` (default 1/K), decoded, and rescaled by the same average of the chunk RMS values.

Reported in ``info``: each specialist's reconstruction error ||decode(encode(theta)) - theta|| /
||theta|| and the loss trace. With identical specialists the merge IS the reconstruction of their
adapter (the averaged code is that adapter's code), so it is off by exactly the reconstruction error.

Differences from the paper (Lee et al. 2026 cite LS-Merge, ICLR 2026): one training stage (the
paper first learns a high-capacity code, then distils it to a compact one), and no projection or
optimal-transport alignment. That alignment is for models of different sizes, and the specialists
here share one shape. The defaults are CPU-sized. The paper's appendix A.3 settings were not
available to this implementation, so there is no "paper" preset of them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from esm_core.merging.base import MergeMethod, MergeOutput, Param
from esm_core.merging.methods._ops import parse_weights


class _VAE(nn.Module):
    def __init__(self, n_tokens: int, token: int, d: int, latent: int, layers: int, heads: int, kinds: int):
        super().__init__()
        self.inp = nn.Linear(token, d)
        self.pos = nn.Parameter(torch.randn(n_tokens, d) * 0.02)
        self.kind = nn.Embedding(kinds, d)
        enc = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        dec = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(enc, layers, enable_nested_tensor=False)
        self.dec = nn.TransformerEncoder(dec, layers, enable_nested_tensor=False)
        self.post = nn.Linear(n_tokens * d, 2 * latent)
        self.up = nn.Linear(latent, n_tokens * d)
        self.n_tokens, self.d = n_tokens, d
        self.out = nn.Linear(d, token)

    def encode(self, x: torch.Tensor, kind: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.enc(self.inp(x) + self.pos + self.kind(kind).unsqueeze(1))
        mu, logvar = self.post(h.flatten(1)).chunk(2, dim=-1)
        return mu, logvar.clamp(-10, 10)

    def decode(self, z: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        h = self.up(z).view(-1, self.n_tokens, self.d) + self.pos + self.kind(kind).unsqueeze(1)
        return self.out(self.dec(h))


def _chunks(tensors: dict, keys, chunk: int, token: int):
    """[n, chunk/token, token] RMS-normalised chunks, their RMS, kind ids and the layout to undo it."""
    kinds = {kk: i for i, kk in enumerate(sorted({(k.module, k.ab) for k in keys}))}
    xs, rms, kind, layout = [], [], [], []
    for k in keys:
        flat = tensors[k].float().flatten()
        n = math.ceil(flat.numel() / chunk)
        pad = torch.zeros(n * chunk)
        pad[:flat.numel()] = flat
        c = pad.view(n, chunk)
        r = c.pow(2).mean(1).sqrt().clamp_min(1e-12)
        xs.append(c / r.unsqueeze(1))
        rms.append(r)
        kind.append(torch.full((n,), kinds[(k.module, k.ab)], dtype=torch.long))
        layout.append((k, n, tuple(tensors[k].shape), flat.numel()))
    return torch.cat(xs).view(-1, chunk // token, token), torch.cat(rms), torch.cat(kind), layout, len(kinds)


def _unchunk(x: torch.Tensor, layout) -> dict:
    out, i = {}, 0
    flat = x.reshape(x.shape[0], -1)
    for k, n, shape, numel in layout:
        out[k] = flat[i:i + n].flatten()[:numel].view(shape)
        i += n
    return out


def _run(ctx, params) -> MergeOutput:
    chunk, token = int(params["chunk"]), int(params["token"])
    if chunk % token:
        from esm_core.errors import ESMError

        raise ESMError(f"LS-Merge: chunk={chunk} is not a multiple of token={token}.",
                       fix="choose a chunk size that the token size divides (e.g. 32 and 4).")
    torch.manual_seed(int(ctx.seed))
    keys = ctx.keys
    per = {n: _chunks(ctx.tensors[n], keys, chunk, token) for n in ctx.names}
    first = per[ctx.names[0]]
    n_kinds = first[4]
    vae = _VAE(chunk // token, token, int(params["width"]), int(params["latent"]), int(params["layers"]),
               int(params["heads"]), n_kinds)
    X = torch.cat([p[0] for p in per.values()])
    KIND = torch.cat([p[2] for p in per.values()])
    opt = torch.optim.Adam(vae.parameters(), lr=float(params["lr"]))
    g = torch.Generator().manual_seed(int(ctx.seed))
    trace = []
    steps, batch, kl_w = int(params["steps"]), int(params["batch"]), float(params["kl"])
    for step in range(steps):
        idx = torch.randint(X.shape[0], (min(batch, X.shape[0]),), generator=g)
        x, kd = X[idx], KIND[idx]
        mu, logvar = vae.encode(x, kd)
        z = mu + torch.randn(mu.shape, generator=g) * (0.5 * logvar).exp()
        rec = (vae.decode(z, kd) - x).pow(2).mean()
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
        loss = rec + kl_w * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            trace.append(float(rec.detach()))
        if ctx.progress:
            ctx.progress(f"LS-Merge: training the VAE ({step + 1}/{steps})", (step + 1) / steps)
    vae.eval()
    w = parse_weights(params["weights"], ctx.names) if params["weights"].strip() else torch.full((len(ctx.names),),
                                                                                              1.0 / len(ctx.names))
    codes, recon = {}, {}
    with torch.no_grad():
        for n, (x, r, kd, layout, _) in per.items():
            mu = torch.cat([vae.encode(x[s:s + 4096], kd[s:s + 4096])[0] for s in range(0, x.shape[0], 4096)])
            codes[n] = mu
            dec = torch.cat([vae.decode(mu[s:s + 4096], kd[s:s + 4096]) for s in range(0, mu.shape[0], 4096)])
            back = _unchunk(dec * r.view(-1, 1, 1), layout)
            num = sum(float((back[k] - ctx.tensors[n][k].float()).pow(2).sum()) for k in keys)
            den = sum(float(ctx.tensors[n][k].float().pow(2).sum()) for k in keys)
            recon[n] = math.sqrt(num / den) if den > 0 else 0.0
        z = sum(float(w[i]) * codes[n] for i, n in enumerate(ctx.names))
        r = sum(float(w[i]) * per[n][1] for i, n in enumerate(ctx.names))
        kd, layout = first[2], first[3]
        dec = torch.cat([vae.decode(z[s:s + 4096], kd[s:s + 4096]) for s in range(0, z.shape[0], 4096)])
    merged = _unchunk(dec * r.view(-1, 1, 1), layout)
    info = {"reconstruction_error": recon, "loss_trace": trace, "chunks": int(X.shape[0]),
            "vae_parameters": sum(p.numel() for p in vae.parameters())}
    return MergeOutput(merged, coefficients=None, info=info)


METHOD = MergeMethod(
    name="ls_merge",
    pretty="LS-Merge",
    paper="LS-Merge: Merging Language Models in Latent Space (ICLR 2026).",
    url="https://openreview.net/forum?id=VSDV0SWwOC",
    params=(
        Param("weights", "", "Weights of the specialists' latent codes, comma-separated (empty = 1/K each).", kind="str"),
        Param("chunk", 32, "Values per chunk (chunks never cross a factor).", kind="int", min=2, max=65536),
        Param("token", 4, "Values per token of a chunk (divides chunk).", kind="int", min=1, max=4096),
        Param("latent", 48, "Latent dimensions per chunk.", kind="int", min=1, max=4096),
        Param("width", 64, "Transformer width.", kind="int", min=8, max=4096),
        Param("layers", 2, "Transformer layers in the encoder and in the decoder.", kind="int", min=1, max=24),
        Param("heads", 4, "Attention heads (divides width).", kind="int", min=1, max=64),
        Param("steps", 600, "Training steps of the VAE.", kind="int", min=1, max=1_000_000),
        Param("batch", 256, "Chunks per training step.", kind="int", min=1, max=1_000_000),
        Param("lr", 2e-3, "Adam learning rate.", min=1e-6, max=1.0),
        Param("kl", 1e-4, "Weight of the KL term.", min=0.0, max=10.0),
    ),
    fn=_run,
    summary="A transformer VAE trained on the specialists' weight chunks; posterior means averaged, decoded.",
)
