"""`genserve convert`: rewrite a folder's .bin (pickle) weights as safetensors, then read every tensor back and
check it equals the original, so the pickles can be deleted. torch.load runs with weights_only=True: the
restricted unpickler, which refuses the arbitrary code a hostile .bin could carry."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def add_parser(sub) -> None:
    parser = sub.add_parser("convert", help="rewrite .bin (pickle) weights as safetensors and check them",
                            description=__doc__)
    parser.add_argument("model_dir", type=Path, help="folder holding pytorch_model*.bin")
    parser.add_argument("--output", type=Path, default=None, help="folder to write (default: model_dir itself)")


def _safetensors_name(bin_name: str) -> str:
    return bin_name.replace("pytorch_model", "model").removesuffix(".bin") + ".safetensors"


def convert(model_dir: Path, output: Path | None = None) -> list[Path]:
    """Write one .safetensors per .bin (and the index of a sharded checkpoint); ValueError if a tensor differs."""
    import torch
    from safetensors.torch import load_file, save_file

    output = output or model_dir
    bins = sorted(model_dir.glob("*.bin"))
    if not bins:
        raise ValueError(f"no .bin files in {model_dir}")
    output.mkdir(parents=True, exist_ok=True)
    if output != model_dir:
        for file in model_dir.iterdir():
            if file.is_file() and not file.name.endswith(".bin") and not file.name.endswith(".bin.index.json"):
                shutil.copy(file, output / file.name)
    written, weight_map = [], {}
    for file in bins:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        # safetensors refuses tensors sharing memory (tied weights): each gets its own contiguous copy
        tensors = {name: t.detach().clone().contiguous() for name, t in state.items() if isinstance(t, torch.Tensor)}
        target = output / _safetensors_name(file.name)
        save_file(tensors, str(target), metadata={"format": "pt"})
        back = load_file(str(target))
        differing = [name for name, t in tensors.items()
                     if name not in back or back[name].dtype != t.dtype or not torch.equal(back[name], t)]
        if differing or back.keys() != tensors.keys():
            raise ValueError(f"{target}: tensors differ from {file} after conversion: {differing[:5]}")
        weight_map.update({name: target.name for name in tensors})
        written.append(target)
    index = model_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        saved = json.loads(index.read_text())
        saved["weight_map"] = weight_map
        (output / "model.safetensors.index.json").write_text(json.dumps(saved, indent=2))
    return written


def run(args: argparse.Namespace) -> int:
    for path in convert(args.model_dir, args.output):
        print(f"wrote {path} (every tensor read back and equal)")
    return 0
