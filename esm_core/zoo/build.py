"""Build the demo zoo from the data: tokenizer, base LLM, three LoRA specialists, run.yaml.

    python -m esm_core zoo build --out /tmp/zoo            # full build (fixed seeds, tqdm progress)
    python -m esm_core zoo build --out /tmp/mini --tiny    # a miniature through the same path (tests)

Steps (each seeded from ``BuildConfig.seed``):

1. training pools: the train split of assets/demo, RDKit's NCI molecules, and (read in place, never
   written) the protein sequences of ``public/dti`` and ``public/cyp``;
2. a BPE tokenizer trained on the corpus (tokenizer.py);
3. the base: a small ``LlamaForCausalLM`` pretrained on raw modality strings (alone and in the
   probe layout), generic text, and generic few-shot binary tasks in the docs/METHOD.md section 7
   format (generic.py) -- no biological question is ever asked of the base;
4. the specialists, PEFT LoRA adapters with one rank on q, k, v, o, gate, up, down of every block,
   trained on skill prompts (skills.py) with 0-1 in-context examples, half of them mixed (the query
   holds a molecule, a protein and a cell) and half single-modality, with a term that keeps the
   other modalities' token states as the base's: molecule first, jointly with its soft-token encoder
   (Morgan fingerprint -> MLP -> tokens), then protein and cell (text tokens), which see molecules
   through the trained, frozen molecule encoder;
5. run.yaml (a RunSpec for the zoo), build.json (config, timings, losses, data hashes) and
   SKILLS.md (held-out skill accuracies of the base and each specialist, measured on the written
   files through the ordinary loaders).

The output is written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esm_core.answering.prompts import Example, Item, few_shot_prompt
from esm_core.encoders import SoftTokenEncoder, SoftTokenProjector, morgan_fingerprint
from esm_core.errors import ESMError
from esm_core.io import Input, package_versions, reserve_output
from esm_core.models import prepare_transformers
from esm_core.paths import DEMO_DIR
from esm_core.zoo import data as zdata
from esm_core.zoo.composite import CONDITION
from esm_core.zoo.composite import PAIRS as COMPOSITE_PAIRS
from esm_core.zoo.generic import (
    GENERIC_TASKS,
    RULES,
    SYSTEMS,
    composite_question,
    generic_composite,
    generic_sentence,
    icl_prompt_fields,
)
from esm_core.zoo.load import load_zoo
from esm_core.zoo.report import failed_checks, skills_markdown
from esm_core.zoo.scoring import measure_skills
from esm_core.zoo.skills import (
    MODALITIES,
    PREFIX,
    SEPARATOR,
    contrast_pools,
    demo_pools,
    heldout_skill_sets,
    raw_of,
    sample_question,
    shown_text,
    skills_of,
)
from esm_core.zoo.tokenizer import train_tokenizer
from esm_core.zoo.train import SoftModality, Tokens, sample_from_segments, train_loop

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class BuildConfig:
    """Everything that shapes the zoo; the defaults are the committed zoo."""

    seed: int = 0
    # tokenizer
    vocab_size: int = 8192
    tokenizer_docs: int = 20000
    # base model
    # 8 blocks (the layer signal needs depth to show where each specialist works), 64 wide: on this 2-core
    # machine the estimation's cost is mostly per-block overhead, and 8 x 64 keeps the default estimation
    # within 15 s (bench/bench_zoo_estimate.py; 8 x 96 took 20 s, 8 x 128 more)
    hidden: int = 64
    layers: int = 8
    heads: int = 4
    intermediate: int = 192
    # room for k = 5 examples with windowed proteins (esm_core.benchmark.harness.fit_prompt)
    max_positions: int = 2048
    base_steps: int = 550
    base_batch: int = 32
    base_lr: float = 3e-3
    base_lm_frac: float = 0.3
    # shares of the base's pretraining documents (base_document); the rest is generic sentences
    base_mix: dict = field(default_factory=lambda: {"generic": 0.3, "icl": 0.25, "composite": 0.15, "raw": 0.12,
                                                    "joint": 0.08})
    # untied input/output embeddings, as LLaMA-3.1-8B has them. Tied, the next-residue LM loss (nearly
    # uniform over the 20 amino acids) pulled the residue tokens' shared vectors together (mean cosine
    # 0.87), and no protein question could be learned from them (answer loss flat at ln 2).
    tie_embeddings: bool = False
    # specialists
    lora_r: int = 8
    lora_alpha: int = 16
    # the whole build within 45 min on this 2-core machine: 23 min measured with the CPU to itself (a specialist
    # step takes 0.38-0.43 s; with another process on the cores 2-thread steps slowed to several seconds)
    spec_steps: dict = field(default_factory=lambda: {"molecule": 750, "protein": 1500, "cell": 400})
    spec_batch: int = 16
    spec_lr: float = 2e-3  # 5e-3 diverged to a constant answer in pilot runs, 1e-3 learned slowly
    encoder_lr: float = 1e-3
    encoder_pretrain_steps: int = 300
    encoder_pretrain_lr: float = 3e-3
    # weight of the loss keeping the other modalities' token states (mixed prompts) as the base's: a
    # specialist that never saw them would leave them alone (docs/METHOD.md section 8, Fig. 2)
    keep_weight: float = 1.0
    # share of training questions whose query holds only the asked modality. All-mixed training stayed
    # at chance on protein questions for hundreds of steps (the residues are 80 of ~290 tokens);
    # single-modality prompts let the specialist find the residues first
    single_frac: dict = field(default_factory=lambda: {"molecule": 0.5, "protein": 0.75, "cell": 0.5})
    # share of specialist training samples that are the base's own raw documents in the probe layout
    # ("Molecule: ...\nProtein: ...\nCell: ..."), no question: they add only the keep term, so the other
    # modalities' states also stay where the base has them at the start of a sequence, not only inside
    # a question's query (the cell specialist moved molecule tokens most without them)
    keep_doc_frac: float = 0.2
    # share of those keep documents laid out like the reference preset's probes: the user turn of the chat
    # template, the protein cut to its first probe_max_tokens residues and the cell to its first genes
    keep_probe_frac: float = 0.5
    # weight of the keep term on the mean-pooled states (train.batch_loss): the layer signal compares pooled
    # points, whose spread is far smaller than the tokens'; without it the molecule specialist moved the pooled
    # protein states further than its own (Fig. 2, reference preset: 0.431 vs 0.384 at the last block)
    keep_pool_weight: float = 1.0
    # share of specialist training samples that are the OTHER modalities' questions, answered as the base
    # answers them (KL to the base's answer distribution): without them the cell specialist answered molecule
    # questions 8 points better than the base (a specialist should be within 5 points elsewhere). The protein
    # specialist had none while its skills were the slowest to learn; with the contrast warm-up it learned them
    # sooner and answered cell questions 8.3 points better than the base (measured), so it has them too
    other_frac: dict = field(default_factory=lambda: {"molecule": 0.1, "protein": 0.1, "cell": 0.1})
    # contrast warm-up (skills.contrast_pools): the first contrast_questions own questions of a specialist whose
    # skills ask for one residue are drawn, with a share falling linearly from 1 to 0, from rows in which that
    # residue is absent or frequent (probability ~ contrast_rate per position). Without it, the protein LoRA sat at
    # ln 2 on some bases: the committed base left it after ~350 of 1000 steps, a base built with the same seeds on
    # another CPU never did (1000 steps; another seed, 2x learning rate, 2x LoRA scale, short crops, no examples:
    # all stuck). With it, both bases learned from step ~200 (README, "The demo zoo")
    contrast_questions: dict = field(default_factory=lambda: {"protein": 4800})
    contrast_rate: float = 0.15
    max_examples: int = 1
    mol_tokens: int = 8
    mol_hidden: int = 256
    morgan_bits: int = 2048
    # evaluation written with the zoo
    eval_per_label: int = 40
    eval_k: int = 1
    eval_skills: tuple | None = None  # None = every skill
    # label likelihood only: generation + parsing doubles the measurement's time (the build stays within 45
    # min); `python -m esm_core zoo skills --how likelihood,generation` measures both
    eval_methods: tuple = ("likelihood",)
    # probe caps written into run.yaml
    probe_max_tokens: dict = field(default_factory=lambda: {"protein": 40, "cell": 50})
    # probes per forward/backward batch written into run.yaml (a pass setting: same coefficients up to
    # round-off; 64 instead of 16 took the estimation from 31 s to 20 s at 8 x 96)
    probe_batch: int = 64
    use_public: bool = True
    max_pool: int | None = None  # keep at most this many training rows per modality (miniature builds)
    threads: int = 2

    @classmethod
    def tiny(cls) -> "BuildConfig":
        """A miniature for tests: same path, minutes -> seconds."""
        return cls(vocab_size=700, tokenizer_docs=600, hidden=32, layers=2, heads=2, intermediate=64,
                   max_positions=1024, base_steps=6, base_batch=4, spec_steps={"molecule": 3, "protein": 3, "cell": 3},
                   spec_batch=2, lora_r=2, lora_alpha=4, mol_tokens=2, mol_hidden=16, morgan_bits=256,
                   eval_per_label=2, eval_k=0, eval_skills=("mol_logp", "prot_charge", "cell_b"),
                   eval_methods=("likelihood",), use_public=False,
                   max_pool=300)


# ------------------------------------------------------------------------------------ pools
def training_pools(demo, cfg: BuildConfig, data_dir=None, log=print):
    """Train pools: demo train split + RDKit NCI molecules + public proteins (read in place)."""
    held_seqs = set(demo.proteins_heldout["sequence"])
    held_smiles = set(demo.molecules_heldout["smiles"])
    extra = {"molecule": [], "protein": []}
    nci = [s for s in zdata.rdkit_nci_smiles() if s not in held_smiles]
    seen = set(demo.molecules_train["smiles"])
    for s in nci:
        if s not in seen:
            seen.add(s)
            extra["molecule"].append({"smiles": s, "source": "rdkit_nci"})
    if cfg.use_public:
        prots = zdata.public_training_proteins(data_dir, exclude=held_seqs)
        extra["protein"] = [{"sequence": s[:zdata.PROTEIN_SHOWN], "source": "public"} for s in prots]
    log(f"training pools: +{len(extra['molecule'])} NCI molecules, +{len(extra['protein'])} public proteins")
    pools = demo_pools(demo, "train", extra)
    if cfg.max_pool:
        for m, rows in pools.rows.items():
            random.Random(f"{cfg.seed}:pool:{m}").shuffle(rows)
            del rows[cfg.max_pool:]
    return pools


# ------------------------------------------------------------------------------------ base corpus
def _generic_prompt(rng: random.Random, pools) -> tuple[list, str]:
    task = rng.choice(GENERIC_TASKS)
    param = task.param(rng) if task.param else None

    exs = []
    for _ in range(rng.randint(0, 4)):
        f, lab = task.sample(rng, param)
        exs.append(Example(list(f), lab))
    f, lab = task.sample(rng, param)
    fields = list(f)
    for _ in range(rng.choice((0, 0, 1, 2, 3))):  # distractor fields the question does not ask about
        if rng.random() < 0.7:
            m = rng.choice(MODALITIES)
            row = rng.choice(pools.rows[m])
            raw = row["smiles"] if m == "molecule" else row["sequence"] if m == "protein" else row["genes"]
            fields.insert(rng.randint(0, len(fields)), (PREFIX[m][:-2], Item(m, raw)))
        else:
            fields.insert(rng.randint(0, len(fields)), ("Note", generic_sentence(rng)))
    p = few_shot_prompt(rng.choice(SYSTEMS), task.question.format(p=param), list(task.labels), exs,
                        Example(fields))
    return p.segments, lab


def _raw_segments(rng: random.Random, pools, joint: bool) -> list:
    def raw(m):
        row = rng.choice(pools.rows[m])
        return row["smiles"] if m == "molecule" else row["sequence"] if m == "protein" else row["genes"]

    if joint:  # the probe layout: "Molecule: X\nProtein: Y\nCell: Z"
        segs = []
        for j, m in enumerate(MODALITIES):
            segs.append(PREFIX[m] if j == 0 else "\n" + PREFIX[m])
            segs.append(Item(m, raw(m)))
        return segs
    m = rng.choice(MODALITIES)
    return [PREFIX[m], Item(m, raw(m))]


def keep_document(rng: random.Random, pools, cfg: "BuildConfig") -> list:
    """Segments of one keep document of a specialist: the base's raw probe layout ("Molecule: ...\nProtein:
    ...\nCell: ..."), in a share ``keep_probe_frac`` of cases as the reference preset's probes have it: the
    user turn of the chat template, the protein cut to its first probe_max_tokens residues and the cell to its
    first genes."""
    segs = _raw_segments(rng, pools, joint=True)
    if rng.random() >= cfg.keep_probe_frac:
        return segs
    out = []
    for s in segs:
        if isinstance(s, Item) and s.modality == "protein":
            s = Item("protein", s.raw[: cfg.probe_max_tokens["protein"]])
        elif isinstance(s, Item) and s.modality == "cell":
            s = Item("cell", " ".join(s.raw.split()[: cfg.probe_max_tokens["cell"] // 3]))
        out.append(s)
    return ["User: " + out[0], *out[1:], "\nAssistant:"]


def _as_prompt(rng: random.Random, pools, question, labels, examples, query, answer) -> tuple[list, str]:
    """Segments of a generic few-shot prompt; Protein / Cell fields become modality items, and the query may
    get distractor fields as in _generic_prompt."""
    item = lambda name, v: Item(name.lower(), v) if name in ("Protein", "Cell") else v  # noqa: E731
    exs = [Example([(n, item(n, v)) for n, v in f], lab) for f, lab in examples]
    fields = [(n, item(n, v)) for n, v in query]
    if rng.random() < 0.3:
        m = rng.choice(MODALITIES)
        fields.insert(rng.randint(0, len(fields)), (PREFIX[m][:-2], Item(m, raw_of(m, rng.choice(pools.rows[m])))))
    p = few_shot_prompt(rng.choice(SYSTEMS), question, list(labels), exs, Example(fields))
    return p.segments, answer


def _icl_rows(pools) -> dict:
    if "_icl" not in pools._index:
        pools._index["_icl"] = {"protein": [r["sequence"] for r in pools.rows["protein"]],
                                "cell": [r["genes"] for r in pools.rows["cell"]]}
    return pools._index["_icl"]


def base_document(rng: random.Random, pools, cfg: "BuildConfig | None" = None) -> tuple[list, str | None]:
    """(segments, answer text or None) of one pretraining document.

    Shares (``BuildConfig.base_mix``): generic few-shot questions, in-context tasks (the answer only follows
    from the examples), two-fact composite questions on generic facts, raw modality strings alone and in the
    probe layout, generic sentences. No biological question is ever asked of the base.
    """
    mix = (cfg or BuildConfig()).base_mix
    u = rng.random()
    edges = []
    acc = 0.0
    for name in ("generic", "icl", "composite", "raw", "joint"):
        acc += mix.get(name, 0.0)
        edges.append((acc, name))
    kind = next((n for e, n in edges if u < e), "text")
    if kind == "generic":
        segs, lab = _generic_prompt(rng, pools)
        return segs, f" {lab}\n"
    if kind == "icl":
        segs, lab = _as_prompt(rng, pools, *icl_prompt_fields(rng, _icl_rows(pools)))
        return segs, f" {lab}\n"
    if kind == "composite":
        segs, lab = _as_prompt(rng, pools, *generic_composite(rng))
        return segs, f" {lab}\n"
    if kind == "raw":
        return _raw_segments(rng, pools, joint=False), None
    if kind == "joint":
        return _raw_segments(rng, pools, joint=True), None
    return ["\n".join(generic_sentence(rng) for _ in range(rng.randint(2, 8)))], None


def _segments_text(segs: list) -> str:
    return "".join(s if isinstance(s, str) else shown_text(s.modality, s.raw) for s in segs)


def tokenizer_corpus(pools, cfg: BuildConfig) -> list[str]:
    rng = random.Random(f"{cfg.seed}:tokenizer")
    lines = []
    for _ in range(cfg.tokenizer_docs):
        segs, ans = base_document(rng, pools, cfg)
        lines.append(_segments_text(segs) + (ans or ""))
    # every sample of the pools once (genes, SMILES, sequences), with its field name
    for m in MODALITIES:
        for row in pools.rows[m]:
            raw = row["smiles"] if m == "molecule" else row["sequence"] if m == "protein" else row["genes"]
            lines.append(PREFIX[m] + shown_text(m, raw))
    # skill prompts' fixed text (questions, system lines) so that they tokenize compactly
    for m in MODALITIES:
        for s in skills_of(m):
            for _ in range(3):
                p = sample_question(s, pools, rng, k=1)
                lines.append(_segments_text(p.segments) + f" {p.answer}\n")
    # the composite questions' text (esm_core.zoo.composite), asked of merged models
    for (an, bn) in COMPOSITE_PAIRS:
        for rule in RULES:
            lines.append(composite_question(rule, CONDITION[an], CONDITION[bn]))
    if cfg.tokenizer_docs < 1000:  # miniature: keep it small
        rng.shuffle(lines)
        lines = lines[: cfg.tokenizer_docs * 3]
    return lines


# ------------------------------------------------------------------------------------ stages
def _sha_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def build_base(out: Path, pools, cfg: BuildConfig, progress=True, log=print) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM


    t0 = time.perf_counter()
    tok = train_tokenizer(tokenizer_corpus(pools, cfg), vocab_size=cfg.vocab_size)
    t_tok = time.perf_counter() - t0
    log(f"tokenizer: {len(tok)} tokens in {t_tok:.1f}s")
    torch.manual_seed(cfg.seed)
    mc = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                     max_position_embeddings=cfg.max_positions, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=cfg.tie_embeddings,
                     rms_norm_eps=1e-5)
    lm = LlamaForCausalLM(mc)
    toks = Tokens(tok)

    def sample_fn(rng):
        segs, ans = base_document(rng, pools, cfg)
        return sample_from_segments(toks, segs, ans, eos=ans is None)

    t1 = time.perf_counter()
    hist = train_loop(lm, list(lm.parameters()), sample_fn, steps=cfg.base_steps, lr=cfg.base_lr, soft={},
                      batch_size=cfg.base_batch,
                      lm_frac=cfg.base_lm_frac, seed=cfg.seed + 1, desc="base", warmup=100, weight_decay=0.01,
                      progress=progress, log=log)
    t_train = time.perf_counter() - t1
    d = out / "base"
    lm.save_pretrained(d, max_shard_size="8MB")  # untied 8k x 128 embeddings: keep each file under 10 MB
    tok.save_pretrained(d)
    return {"tokenizer_s": t_tok, "base_train_s": t_train, "base_history": hist, "vocab": len(tok),
            "base_parameters": sum(p.numel() for p in lm.parameters())}


def _fresh_base(out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer


    prepare_transformers()
    lm = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out / "base", local_files_only=True)
    return lm, tok


def _morgan(cfg: BuildConfig):
    return lambda s: morgan_fingerprint(s, radius=2, n_bits=cfg.morgan_bits)


def build_specialist(out: Path, modality: str, pools, cfg: BuildConfig, progress=True, log=print) -> dict:
    """Train one LoRA specialist (molecule: jointly with its soft-token encoder); save it under out."""
    from peft import LoraConfig, get_peft_model


    lm, tok = _fresh_base(out)
    for p in lm.parameters():
        p.requires_grad_(False)
    seed = cfg.seed + 100 * (1 + MODALITIES.index(modality))
    torch.manual_seed(seed)
    feat = _morgan(cfg)
    if modality == "molecule":
        proj = SoftTokenProjector(cfg.morgan_bits, cfg.mol_hidden, cfg.mol_tokens, cfg.hidden)
        _match_scale(proj, lm.get_input_embeddings().weight, pools, feat)
        enc_info = pretrain_molecule_encoder(proj, pools, feat, cfg, seed, log=log)
        trainable_proj = True
    else:
        enc = SoftTokenEncoder.load(out / "molecule_encoder", expect_d_model=cfg.hidden)
        proj = enc.projector
        trainable_proj = False
    for p in proj.parameters():
        p.requires_grad_(trainable_proj)
    soft = {"molecule": SoftModality(proj, feat)}
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(ALL_TARGETS), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(lm, lcfg)
    inner = pm.get_base_model()
    params = [p for n, p in pm.named_parameters() if p.requires_grad]
    toks = Tokens(tok)
    skills = skills_of(modality)
    others = tuple(m for m in MODALITIES if m != modality)

    other_skills = [s for m in others for s in skills_of(m)]
    n_contrast = cfg.contrast_questions.get(modality, 0)
    contrast = (contrast_pools(pools, skills, random.Random(f"{cfg.seed}:contrast:{modality}"), cfg.contrast_rate)
                if n_contrast else pools)
    asked = [0]

    def own_pools(rng):
        """The pools an own question is drawn from: contrast rows with a share 1 -> 0 over n_contrast questions."""
        asked[0] += 1
        share = max(0.0, 1.0 - asked[0] / n_contrast) if n_contrast else 0.0
        return contrast if rng.random() < share else pools

    def sample_fn(rng):
        u = rng.random()
        if cfg.keep_weight > 0 and u < cfg.keep_doc_frac:
            return sample_from_segments(toks, keep_document(rng, pools, cfg), None, soft={"molecule"}, lm=False,
                                        keep=others)
        if u < cfg.keep_doc_frac + cfg.other_frac.get(modality, 0.0):  # another modality's question: answer it as the base does
            p = sample_question(rng.choice(other_skills), pools, rng, k=rng.randint(0, cfg.max_examples), mixed=True)
            return sample_from_segments(toks, p.segments, " " + p.answer, soft={"molecule"}, lm=False, keep=others,
                                        distill=True)
        s = rng.choice(skills)
        mixed = rng.random() >= cfg.single_frac[modality]
        p = sample_question(s, own_pools(rng), rng, k=rng.randint(0, cfg.max_examples), mixed=mixed)
        return sample_from_segments(toks, p.segments, " " + p.answer, soft={"molecule"}, lm=False, keep=others)

    extra = [{"params": list(proj.parameters()), "lr": cfg.encoder_lr, "weight_decay": 0.0}] if trainable_proj else None
    t0 = time.perf_counter()
    proj.train(trainable_proj)
    hist = train_loop(inner, params, sample_fn, steps=cfg.spec_steps[modality], lr=cfg.spec_lr, soft=soft,
                      batch_size=cfg.spec_batch,
                      lm_frac=0.0, seed=seed, desc=f"specialist {modality}", warmup=50, extra_groups=extra,
                      progress=progress, log=log, keep_weight=cfg.keep_weight, base_off=pm.disable_adapter,
                      keep_pool_weight=cfg.keep_pool_weight)
    proj.eval()
    t_train = time.perf_counter() - t0
    pm.save_pretrained(out / modality)
    _fix_adapter_config(out / modality)
    if trainable_proj:
        SoftTokenEncoder("morgan", {"radius": 2, "n_bits": cfg.morgan_bits}, proj, label="mol").save(
            out / "molecule_encoder")
    out_info = {f"{modality}_train_s": t_train, f"{modality}_history": hist}
    if trainable_proj:
        out_info["molecule_encoder_pretrain"] = enc_info
    return out_info


def pretrain_molecule_encoder(proj, pools, feat, cfg: BuildConfig, seed: int, log=print) -> dict:
    """Stage 1 of the molecule specialist (like Mol-LLaMA's projector pre-training): the projector learns
    soft tokens whose MEAN linearly predicts the molecule skills' facts (a linear head, masked BCE on the
    training pool; the head is thrown away). Stage 2 (the LoRA) then only has to learn to read them.
    """
    import numpy as np

    skills = skills_of("molecule")
    rows = pools.rows["molecule"]
    x = torch.from_numpy(np.stack([feat(r["smiles"]) for r in rows])).float()
    y = torch.full((len(rows), len(skills)), float("nan"))
    for j, s in enumerate(skills):
        for i, r in enumerate(rows):
            v = s.fact(r)
            if v is not None:
                y[i, j] = float(v)
    known = ~torch.isnan(y)
    y = torch.nan_to_num(y)
    head = torch.nn.Linear(proj.d_model, len(skills))
    opt = torch.optim.AdamW([*proj.parameters(), *head.parameters()], lr=cfg.encoder_pretrain_lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    scale = float(proj(x[:64]).pow(2).mean().sqrt().detach())  # keep the tokens at the embeddings' size
    for step in range(cfg.encoder_pretrain_steps):
        idx = torch.randint(0, len(rows), (256,), generator=g)
        tokens = proj(x[idx])
        logits = head(tokens.mean(1) / scale)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx], reduction="none")
        loss = (loss * known[idx]).sum() / known[idx].sum().clamp_min(1)
        size = (tokens.pow(2).mean().sqrt() / scale - 1).pow(2)
        opt.zero_grad(set_to_none=True)
        (loss + size).backward()
        opt.step()
    with torch.no_grad():
        pred = head(proj(x).mean(1) / scale) > 0
        acc = ((pred == y.bool()) & known).sum(0).float() / known.sum(0).clamp_min(1)
    info = {"steps": cfg.encoder_pretrain_steps, "seconds": time.perf_counter() - t0,
            "train_fact_accuracy": {s.name: round(float(a), 3) for s, a in zip(skills, acc)}}
    log("molecule encoder pre-training: fact accuracy on the training pool "
        + ", ".join(f"{k} {v:.2f}" for k, v in info["train_fact_accuracy"].items()))
    return info


def _match_scale(proj, emb_weight, pools, feat):
    """Scale the projector's last layer so soft tokens start at the size of the LLM's token embeddings."""
    rows = pools.rows["molecule"][:64]
    x = torch.from_numpy(__import__("numpy").stack([feat(r["smiles"]) for r in rows]))
    with torch.no_grad():
        y = proj(x)
        ratio = float(emb_weight.pow(2).mean().sqrt()) / max(1e-8, float(y.pow(2).mean().sqrt()))
        proj.fc2.weight.mul_(ratio)
        proj.fc2.bias.mul_(ratio)


def _fix_adapter_config(d: Path) -> None:
    p = d / "adapter_config.json"
    c = json.loads(p.read_text())
    c["base_model_name_or_path"] = "../base"
    if isinstance(c.get("target_modules"), list):  # PEFT writes a set: fix the order so rebuilds match
        c["target_modules"] = sorted(c["target_modules"])
    p.write_text(json.dumps(c, indent=2, sort_keys=True))
    readme = d / "README.md"
    if readme.exists():
        readme.unlink()


def write_run_yaml(out: Path, demo_dir: Path, cfg: BuildConfig, final_dir: Path | None = None) -> None:
    """run.yaml with paths relative to the zoo directory (final_dir: where the zoo will live)."""
    import yaml

    where = (final_dir or out).resolve()
    rel = lambda p: os.path.relpath(Path(p).resolve(), where)  # noqa: E731
    spec = {
        "base": "base",
        "specialists": [{"name": m, "adapter": m, "modality": m} for m in MODALITIES],
        "modalities": [
            {"name": "molecule", "prefix": PREFIX["molecule"], "kind": "smiles",
             "encoder": {"type": "soft_token", "path": "molecule_encoder"},
             "data": {"path": rel(demo_dir / "molecules_heldout.csv"), "column": "smiles"}},
            {"name": "protein", "prefix": PREFIX["protein"], "kind": "protein",
             "max_tokens": cfg.probe_max_tokens["protein"],
             "encoder": {"type": "text", "options": {"separator": SEPARATOR["protein"]}},
             "data": {"path": rel(demo_dir / "protein_windows_heldout.csv"), "column": "sequence"}},
            {"name": "cell", "prefix": PREFIX["cell"], "kind": "genes", "max_tokens": cfg.probe_max_tokens["cell"],
             "encoder": {"type": "text"}, "data": {"path": rel(demo_dir / "cells_heldout.csv"), "column": "genes"}},
        ],
        "method": {"preset": "reference", "batch_size": cfg.probe_batch},
    }
    head = ("# The demo zoo as an ES-Merging run (written by `python -m esm_core zoo build`).\n"
            "# Paths are relative to this file. Probe samples: the held-out demo CSVs (assets/demo).\n")
    (out / "run.yaml").write_text(head + yaml.safe_dump(spec, sort_keys=False))


# ------------------------------------------------------------------------------------ main
STAGES = ("base", *MODALITIES)
# what each stage depends on besides the data: the settings in BuildConfig it reads (a dict setting: its entry for
# the stage's modality). A stage taken from another zoo (build_zoo reuse=) must have been built with the same.
_BASE_FIELDS = ("seed", "vocab_size", "tokenizer_docs", "hidden", "layers", "heads", "intermediate", "max_positions",
                "base_steps", "base_batch", "base_lr", "base_lm_frac", "base_mix", "tie_embeddings", "use_public",
                "max_pool")
_SPEC_FIELDS = ("lora_r", "lora_alpha", "spec_steps", "spec_batch", "spec_lr", "keep_weight", "single_frac",
                "keep_doc_frac", "keep_probe_frac", "keep_pool_weight", "other_frac", "contrast_questions",
                "max_examples", "mol_tokens", "mol_hidden", "morgan_bits")
_MOLECULE_FIELDS = ("encoder_lr", "encoder_pretrain_steps", "encoder_pretrain_lr")
_PER_MODALITY = {"spec_steps", "single_frac", "other_frac", "contrast_questions"}


def _stage_settings(config: dict, stage: str) -> dict:
    """The settings one stage was built with, from a build.json config (dict fields reduced to the stage's entry;
    a setting the old build did not have is its neutral value: no contrast warm-up)."""
    fields = _BASE_FIELDS if stage == "base" else _SPEC_FIELDS + (_MOLECULE_FIELDS if stage == "molecule" else ())
    out = {}
    for f in fields:
        v = config.get(f, {} if f in _PER_MODALITY else None)
        out[f] = (v or {}).get(stage, 0) if f in _PER_MODALITY else v
    if stage != "base" and out["contrast_questions"]:
        out["contrast_rate"] = config.get("contrast_rate")
    return out


def check_reuse(reuse: Path, stages: tuple[str, ...], cfg: BuildConfig) -> dict:
    """Refuse (ESMError) a partial rebuild that would mix incompatible stages; returns the reused build.json."""
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ESMError(f"--stages {','.join(stages) or '(none)'}: name one or more of {', '.join(STAGES)}.")
    if "base" in stages:
        raise ESMError("--stages base: every specialist is trained on the base, so a new base is a new zoo; run "
                       "`zoo build` without --reuse.")
    if "molecule" in stages and set(stages) != set(MODALITIES):
        raise ESMError("--stages molecule: the protein and cell specialists see molecules through the molecule "
                       "encoder this stage retrains; rebuild them too (--stages molecule,protein,cell).")
    bj = reuse / "build.json"
    if not bj.is_file() or not (reuse / "base").is_dir():
        raise ESMError(f"--reuse {reuse}: not a zoo written by `zoo build` (no build.json or base/); give the "
                       "directory of a built zoo.")
    old = json.loads(bj.read_text())
    new = dataclasses.asdict(cfg)
    for stage in STAGES:
        if stage in stages:
            continue
        was, now = _stage_settings(old.get("config", {}), stage), _stage_settings(new, stage)
        diff = {k: (was.get(k), now[k]) for k in now if was.get(k) != now[k]}
        if diff:
            raise ESMError(f"--reuse {reuse}: its {stage} stage was built with other settings than this build's "
                           f"({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in diff.items())}); rebuild that stage "
                           "too or use the settings it was built with.")
    return old


# build.json entries about the whole build, not one stage (written afresh by every build)
_BUILD_WIDE = {"config", "pool_sizes", "reused", "build_s", "skills", "failed_checks", "eval_s", "data", "packages", "log"}


def _copy_stages(src: Path, dst: Path, stages: tuple[str, ...]) -> None:
    import shutil

    for stage in STAGES:
        if stage in stages:
            continue
        names = {"base": ["base"], "molecule": ["molecule", "molecule_encoder"]}.get(stage, [stage])
        for n in names:
            shutil.copytree(src / n, dst / n)


def build_zoo(out_dir: str | Path, cfg: BuildConfig | None = None, *, demo_dir: str | Path | None = None,
              data_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True,
              evaluate: bool = True, log=None, reuse: str | Path | None = None,
              stages: tuple[str, ...] | None = None) -> Path:
    """Build the whole zoo into out_dir (atomic); returns the directory.

    reuse + stages: rebuild only the named specialist stages and take every other stage from the zoo at reuse
    (read, never written; refused unless its other stages were built with this build's settings: check_reuse).
    build.json records what was taken from where.
    """

    cfg = cfg or BuildConfig()
    demo_dir = Path(demo_dir) if demo_dir else DEMO_DIR
    old = None
    if reuse is not None:
        reuse = Path(reuse).resolve()
        old = check_reuse(reuse, tuple(stages or ()), cfg)
    elif stages:
        raise ESMError("--stages needs --reuse ZOO: the zoo whose other stages this build takes.")
    todo = tuple(stages) if old is not None else STAGES
    inputs = [Input(str(demo_dir), "demo data directory")]
    if data_dir:
        inputs.append(Input(str(data_dir), "data directory"))
    if reuse is not None:
        inputs.append(Input(str(reuse), "reused zoo"))
    target = reserve_output(out_dir, kind="dir", overwrite=overwrite, inputs=inputs, command="zoo build",
                            log=log)
    out_final = target.path
    demo = zdata.load_demo(demo_dir)
    logs: list[str] = []

    def _log(msg: str):
        logs.append(msg)
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info: dict = {"config": dataclasses.asdict(cfg)}

    def write(tmp: Path):
        t0 = time.perf_counter()
        pools = training_pools(demo, cfg, data_dir, log=_log)
        info["pool_sizes"] = {m: len(v) for m, v in pools.rows.items()}
        if old is not None:
            _copy_stages(reuse, tmp, todo)
            info["reused"] = {"from": str(reuse), "stages": [s for s in STAGES if s not in todo],
                              "build_json_sha256": _sha_file(reuse / "build.json"),
                              "their_packages": old.get("packages")}
            # the reused stages' timings and histories; the stages built below overwrite their own entries
            info.update({k: v for k, v in old.items() if k not in _BUILD_WIDE})
            _log(f"stages {', '.join(info['reused']['stages'])} taken from {reuse}; building {', '.join(todo)}")
        if "base" in todo:
            info.update(build_base(tmp, pools, cfg, progress, _log))
        for m in MODALITIES:
            if m in todo:
                info.update(build_specialist(tmp, m, pools, cfg, progress, _log))
        write_run_yaml(tmp, demo_dir, cfg, final_dir=out_final)
        info["build_s"] = time.perf_counter() - t0
        if evaluate:
            # measured through the ordinary loaders on the files just written
            _write_run_for_eval(tmp, demo_dir, cfg)

            t1 = time.perf_counter()
            spec, sset, encoders = load_zoo(tmp)
            sets = heldout_skill_sets(demo, k=cfg.eval_k, per_label=cfg.eval_per_label,
                                      skills=list(cfg.eval_skills) if cfg.eval_skills else None)
            rep = measure_skills(sset, encoders, sets, [None, *MODALITIES], methods=tuple(cfg.eval_methods))
            (tmp / "SKILLS.md").write_text(skills_markdown(rep, cfg))
            info["skills"] = rep.rows
            info["failed_checks"] = failed_checks(rep)
            for msg in info["failed_checks"]:
                _log(f"CHECK FAILED: {msg}. The zoo is written; see SKILLS.md (README, 'The demo zoo': a "
                     f"rebuild on another CPU can land elsewhere).")
            info["eval_s"] = time.perf_counter() - t1
            write_run_yaml(tmp, demo_dir, cfg, final_dir=out_final)
        info["data"] = {f: _sha_file(demo_dir / f) for f in zdata.DEMO_FILES}
        info["packages"] = _versions()
        info["log"] = logs
        (tmp / "build.json").write_text(json.dumps(info, indent=1, default=str))

    try:
        with target:
            path = target.write_dir(write)
    finally:
        torch.set_num_threads(old_threads)
    _log(f"zoo written to {path} ({info.get('build_s', 0):.0f}s build, {_dir_mb(path):.1f} MB)")
    return path


def _write_run_for_eval(tmp: Path, demo_dir: Path, cfg: BuildConfig) -> None:
    write_run_yaml(tmp, demo_dir, cfg, final_dir=tmp)


def _dir_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20


def _versions() -> dict:
    return package_versions()

