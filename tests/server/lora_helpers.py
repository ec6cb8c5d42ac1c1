"""LoRA adapters made with peft on a base checkpoint (random weights, so they change the output), and the
reference: transformers with the adapter merged (`merge_and_unload`), greedy, float32."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

# different ranks and target modules (fused q|k|v and gate|up slices, row-parallel o/down), rsLoRA on one
ADAPTER_SPECS = {
    "sql": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]),
    "chat": dict(r=16, lora_alpha=32, use_rslora=True, target_modules=["k_proj", "gate_proj", "up_proj", "down_proj"]),
    "code": dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]),
}


def eos_ids(model_dir) -> set[int]:
    """The ids the engine stops on: generation_config's eos and the tokenizer's."""
    from transformers import AutoTokenizer, GenerationConfig

    eos = {AutoTokenizer.from_pretrained(model_dir).eos_token_id}
    gen_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    return eos | set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])


def load_base(model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_adapters(base: torch.nn.Module, out_dir: Path, specs: dict = ADAPTER_SPECS, seed: int = 0) -> dict[str, Path]:
    """Each spec saved as a PEFT folder under out_dir/<name>; init_lora_weights=False: A and B both random."""
    from peft import LoraConfig, get_peft_model

    folders = {}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **spec))
        folders[name] = out_dir / name
        model.save_pretrained(folders[name])
    return folders


def merged_greedy(base: torch.nn.Module, folder: Path | None, prompts: list[list[int]], max_new_tokens: int,
                  eos: set[int]) -> list[list[int]]:
    """Greedy ids of the base with `folder`'s adapter merged (None: the base), cut after the first EOS."""
    from peft import PeftModel

    model = base if folder is None else PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload()
    out = []
    with torch.no_grad():
        for ids in prompts:
            new = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(eos), pad_token_id=0)[0, len(ids):].tolist()
            stop = next((i for i, t in enumerate(new) if t in eos), None)
            out.append(new if stop is None else new[:stop + 1])
    return out
