"""Any encoder-decoder LM transformers can load (T5, BART, ...), run over batches of requests.

A request's prompt is the encoder input; its generated tokens are the decoder's, after the decoder
start token. The encoder runs once per request (prompts that complete in the same step are encoded
together, right-padded with a mask). Each request keeps its encoder output and its cross-attention K/V;
the cross-attention K/V of a batch are right-padded to its longest prompt and masked by the encoder mask.

Layout of a batched cache (`DecoderRows`), one row per request:

    self-attention:   [ pad d0 d1 ]           left-padded to the longest decoder past (d0: decoder start token)
                      [ d0  d1 d2 ]           new tokens go on the right, every row the same count
    cross-attention:  [ e0 e1 e2 pad pad ]    right-padded to the longest prompt; encoder_mask marks the real ones

Left padding needs a decoder whose positions are relative to the query (T5's relative position bias
is shift-invariant). BART-like decoders add learned positions counted from the cache length and take
no position ids, so their rows share a forward only at equal decoder lengths (no padding at all).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from genserve.server.models.hf_fallback import check_safetensors_headers

# decoders whose self-attention positions are relative (shift-invariant): rows may be left-padded
RELATIVE_POSITION_DECODERS = frozenset({"t5", "mt5"})


def is_encoder_decoder(hf_config) -> bool:
    return bool(getattr(hf_config, "is_encoder_decoder", False))


@dataclass(slots=True)
class DecoderRows:
    """One batched decoder cache; row r belongs to request_ids[r]."""
    cache: EncoderDecoderCache
    request_ids: list[str]
    encoder_states: torch.Tensor  # [B, S, hidden], right-padded
    encoder_mask: torch.Tensor  # [B, S] long, 1 on real prompt tokens
    lengths: list[int]  # each row's decoder tokens in the cache, at its right end

    @property
    def width(self) -> int:
        return self.cache.self_attention_cache.get_seq_length()

    def encoder_length(self, row: int) -> int:
        return int(self.encoder_mask[row].sum())


def gather_decoder_rows(sources: list[tuple[DecoderRows, int]]) -> tuple[EncoderDecoderCache, torch.Tensor, torch.Tensor]:
    """A new batched cache (+ encoder states and mask) whose row i is row sources[i][1] of sources[i][0],
    its decoder past left-padded to the longest one."""
    prompt_lengths = [rows.encoder_length(r) for rows, r in sources]
    past = [rows.lengths[r] for rows, r in sources]
    past_width = max(past)
    width = max(prompt_lengths)
    first = sources[0][0]
    states = first.encoder_states.new_zeros((len(sources), width, first.encoder_states.shape[-1]))
    mask = torch.zeros((len(sources), width), dtype=torch.long, device=first.encoder_mask.device)
    for i, ((rows, r), length) in enumerate(zip(sources, prompt_lengths, strict=True)):
        states[i, :length] = rows.encoder_states[r, :length]
        mask[i, :length] = 1
    self_layers, cross_layers = [], []
    for index in range(len(first.cache.self_attention_cache.layers)):
        template = first.cache.self_attention_cache.layers[index]
        padded = []
        for name in ("keys", "values"):
            like = getattr(template, name)
            tensor = like.new_zeros((len(sources), like.shape[1], past_width, like.shape[-1]))
            for i, ((rows, r), length) in enumerate(zip(sources, past, strict=True)):
                src = getattr(rows.cache.self_attention_cache.layers[index], name)
                tensor[i, :, past_width - length:] = src[r, :, src.shape[-2] - length:]
            padded.append(tensor)
        self_layers.append(tuple(padded))
        template = first.cache.cross_attention_cache.layers[index]
        padded = []
        for name in ("keys", "values"):
            like = getattr(template, name)
            tensor = like.new_zeros((len(sources), like.shape[1], width, like.shape[-1]))
            for i, ((rows, r), length) in enumerate(zip(sources, prompt_lengths, strict=True)):
                tensor[i, :, :length] = getattr(rows.cache.cross_attention_cache.layers[index], name)[r, :, :length]
            padded.append(tensor)
        cross_layers.append(tuple(padded))
    # a non-empty cross-attention cache marks every layer updated: the decoder reads it instead of recomputing
    cache = EncoderDecoderCache(DynamicCache(ddp_cache_data=self_layers), DynamicCache(ddp_cache_data=cross_layers))
    return cache, states, mask


class TransformersSeq2SeqLM:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 load_format: str = "auto", trust_remote_code: bool = False):
        if load_format == "dummy":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForSeq2SeqLM.from_config(
                    AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code),
                    dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
        else:
            check_safetensors_headers(model_dir)
            model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=dtype or "auto",
                                                          trust_remote_code=trust_remote_code)
        self.model = model.to(device).eval()
        self.config = self.model.config
        self.device = torch.device(device)
        start = getattr(self.config, "decoder_start_token_id", None)
        if start is None:
            start = getattr(self.model.generation_config, "decoder_start_token_id", None)
        if start is None:
            raise ValueError(f"{type(self.model).__name__}: the config sets no decoder_start_token_id")
        self.decoder_start_token_id = int(start)
        # transformers renamed `past_key_values` to `cache` during 5.x
        self.pads_decoder = self.config.model_type in RELATIVE_POSITION_DECODERS
        self.cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def encode(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompts through the encoder -> (hidden states [B, S, hidden], mask [B, S])."""
        width = max(len(p) for p in prompts)
        input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, :len(prompt)] = torch.tensor(prompt)
            mask[row, :len(prompt)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        states = self.model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return states, mask

    @torch.inference_mode()
    def decode(self, chunks: list[list[int]], cache: EncoderDecoderCache, past_lengths: list[int],
               encoder_states: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
        """Feed each row's new decoder tokens (all rows the same count) on top of its past in `cache`
        (left-padded, grown in place) -> float32 logits of each row's last token [B, V]."""
        width, kwargs = cache.self_attention_cache.get_seq_length(), {}
        if any(length != width for length in past_lengths):
            mask = torch.zeros((len(chunks), width + len(chunks[0])), dtype=torch.long)
            for row, length in enumerate(past_lengths):
                mask[row, width - length:] = 1
            kwargs["decoder_attention_mask"] = mask.to(self.device)
        out = self.model(decoder_input_ids=torch.tensor(chunks, device=self.device), **kwargs,
                         encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                         attention_mask=encoder_mask, use_cache=True, **{self.cache_kwarg: cache})
        return out.logits[:, -1].float()

    @staticmethod
    def new_cache() -> EncoderDecoderCache:
        return EncoderDecoderCache(DynamicCache(), DynamicCache())
