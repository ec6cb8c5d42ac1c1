"""`.bin` (pickle) checkpoints are refused naming `genserve convert`, which writes safetensors that load to the
same logits."""

from __future__ import annotations

import pytest
import torch
import transformers
from model_helpers import TINY, build_metadata, load_native, run_model

from genserve.server.cli import main


@pytest.mark.parametrize("shard_size", [None, "20KB"], ids=["one-file", "sharded"])
def test_bin_checkpoints_are_refused_then_converted(tmp_path, shard_size, capsys):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=True)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.config.architectures = ["LlamaForCausalLM"]
    state = hf.state_dict()
    if shard_size is None:
        hf.config.save_pretrained(tmp_path)
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        import json

        names = list(state)
        halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        hf.config.save_pretrained(tmp_path)
        for file, part in halves.items():
            torch.save({n: state[n] for n in part}, tmp_path / file)
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    with pytest.raises(ValueError, match="only .bin \\(pickle\\) weights.*genserve convert"):
        load_native(tmp_path)
    assert main(["convert", str(tmp_path)]) == 0
    assert "every tensor read back and equal" in capsys.readouterr().out
    model = load_native(tmp_path)
    with torch.no_grad():
        expected = hf(torch.tensor([[1, 5, 9, 3]])).logits[0]
    actual = run_model(model, [1, 5, 9, 3], list(range(4)), build_metadata(prefill_contexts=[(list(range(4)), 4)]))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
