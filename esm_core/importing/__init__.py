"""Importing published specialists: LoRA adapters as their authors ship them, written as clean PEFT folders.

Real specialists are rarely stock PEFT folders. Mol-LLaMA keeps its LoRA inside a full model
checkpoint (keys ``llm.base_model.model.model.layers.N....lora_A.default.weight``) next to graph
encoders, a Q-Former and a projector; Prot2Text-V2 ships PEFT folders with ``modules_to_save`` or
whole pickled ``.pt`` state dicts (docs/METHOD.md section 9). An import reads such a source tensor
by tensor and writes one folder that both ``esm_core.adapters.read_adapter`` and stock
``peft.PeftModel.from_pretrained`` load:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA factors under stock keys
  (``base_model.model.model.layers.N.<module>.lora_A.weight``), with the source's own r and alpha;
- ``extra_weights.safetensors``: what else the source carries that a merge must not touch
  (encoders, projectors, ``modules_to_save`` such as ``adapter.fc1``), kept under their own keys;
- ``import_report.json``: what was found, converted, kept and left out (counts and key examples),
  r, alpha and scaling, and the base-compatibility verdict.

    report = import_specialist("ckpt/mol-llama", "imported/mol", alpha=32)
    verdicts = check_bases("models/llama-3.1-8b", {"mol": "imported/mol", "cell": "models/cell"})

Modules: ``compat`` (base-compatibility verdicts from config files only), ``sources`` (finding and
reading the tensors: safetensors files and shards, pickles on request), ``lora`` (sorting the keys,
checking the factors, the written config), ``importer`` (the import itself and its report);
``extract`` derives a LoRA from a full fine-tune instead (``python -m esm_core extract-lora``).
"""

from esm_core.importing.compat import BaseFacts, CompatVerdict, check_bases, compare_bases, read_base_facts
from esm_core.importing.importer import FORMATS, import_specialist, report_rows

__all__ = ["BaseFacts", "CompatVerdict", "FORMATS", "check_bases", "compare_bases", "import_specialist",
           "read_base_facts", "report_rows"]
