"""Any causal LM transformers can load, run over a padded batch of requests with one batched DynamicCache.

Layout of a batched cache (`KVRows`), one row per request, each row's real tokens contiguous:

    row 0:  [ pad pad | k0 k1 k2 k3 ]      past: left-padded to the longest row
    row 1:  [ k0 k1 k2 k3 k4 k5 ]          new tokens go on the right, right-padded to the longest chunk

so query i of a row sees its own past and new tokens causally; padded keys are masked out by the 2D
attention mask and padded queries sit after every real one, so they never leak into a real row.
"""

from __future__ import annotations

import inspect
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

MAX_SAFETENSORS_HEADER = 100 * 2**20  # the format's own cap (safetensors' MAX_HEADER_SIZE)


def load_hf_config(model_dir: str | Path, trust_remote_code: bool = False):
    """The model's transformers config, or a one-line ValueError naming what is wrong with it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_file = Path(model_dir) / "config.json"
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {config_file}: {str(exc).splitlines()[0]}") from None
    model_type, auto_map = raw.get("model_type"), raw.get("auto_map") or {}
    is_known = model_type in CONFIG_MAPPING
    if auto_map and not is_known and not trust_remote_code:
        raise ValueError(f"{config_file}: model_type {model_type!r} needs the checkpoint's own code "
                         f"({', '.join(sorted(auto_map))} in `auto_map`); pass --trust-remote-code to run it")
    if not is_known and not auto_map:
        raise ValueError(f"unknown architecture {raw.get('architectures')} (model_type {model_type!r}) in "
                         f"{config_file}: neither native in genserve nor known to transformers "
                         f"{_transformers_version()}")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load the config in {config_file}: {str(exc).splitlines()[0]}") from None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_safetensors_headers(model_dir: str | Path) -> None:
    """Read each *.safetensors header (8-byte length + JSON) before anything loads; a one-line ValueError
    names the first file that is not valid safetensors."""
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        size = file.stat().st_size
        with file.open("rb") as f:
            prefix = f.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            problem = None
            if not 0 < length <= min(MAX_SAFETENSORS_HEADER, size - 8):
                problem = f"header length {length} does not fit the file's {size} bytes"
            else:
                try:
                    header = json.loads(f.read(length))
                    assert isinstance(header, dict)
                    end = max((max(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"), default=0)
                    if end > size - 8 - length:
                        problem = f"tensor data ends at byte {end} past the file's data ({size - 8 - length} bytes)"
                except (ValueError, AssertionError, KeyError, TypeError):
                    problem = "its JSON header does not parse"
        if problem:
            raise ValueError(f"corrupted safetensors file {file}: {problem}")


@dataclass(slots=True)
class KVRows:
    """One batched cache; row r belongs to request_ids[r], its real tokens at [ends[r] - lengths[r], ends[r])."""
    cache: DynamicCache
    request_ids: list[str]
    lengths: list[int]
    ends: list[int]

    @property
    def is_aligned(self) -> bool:
        """Every row ends at the cache's end: the cache is already the left-padded past of a next step."""
        size = self.cache.get_seq_length()
        return all(end == size for end in self.ends)


def gather_rows(sources: list[tuple[KVRows, int] | None], past_lengths: list[int]) -> DynamicCache:
    """A new cache whose row i holds the last past_lengths[i] tokens of sources[i] (None: no past),
    left-padded with zeros to the longest past."""
    width = max(past_lengths)
    if width == 0:
        return DynamicCache()
    template = next(rows for rows in sources if rows is not None)[0].cache
    layers = []
    for index, layer in enumerate(template.layers):
        keys = layer.keys.new_zeros((len(sources), *layer.keys.shape[1:-2], width, layer.keys.shape[-1]))
        values = layer.values.new_zeros((len(sources), *layer.values.shape[1:-2], width, layer.values.shape[-1]))
        for row, (source, length) in enumerate(zip(sources, past_lengths, strict=True)):
            if length == 0:
                continue
            rows, r = source
            src = rows.cache.layers[index]
            end = rows.ends[r]
            keys[row, ..., width - length:, :] = src.keys[r, ..., end - length:end, :]
            values[row, ..., width - length:, :] = src.values[r, ..., end - length:end, :]
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers)


class TransformersCausalLM:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 load_format: str = "auto", trust_remote_code: bool = False, hf_config=None):
        """hf_config: the engine's config, with launcher overrides (--rope-factor) applied; read from
        model_dir when None."""
        if hf_config is None:
            hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        if load_format == "dummy":
            # transformers' own random init (normal(0, initializer_range), norms 1), seeded: no weights read
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype or torch.float32,
                                                         trust_remote_code=trust_remote_code)
        else:
            check_safetensors_headers(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, config=hf_config, dtype=dtype or "auto",
                                                         trust_remote_code=trust_remote_code)
        self.model = model.to(device).eval()
        self.config = self.model.config
        self.device = torch.device(device)
        parameters = inspect.signature(self.model.forward).parameters
        # transformers renamed `past_key_values` to `cache` during 5.x
        self.cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        # rows share a cache only where positions are explicit and every layer is plain K/V (sliding layers
        # become full ones, the mask still applies the window); recurrent or other caches run one by one
        layer_types = {type(layer) for layer in DynamicCache(config=self.config).layers}
        self.can_batch = "position_ids" in parameters and layer_types <= {DynamicLayer, DynamicSlidingWindowLayer}

    def new_cache(self) -> DynamicCache:
        """A request's own cache when it runs alone: the layer types its config asks for."""
        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def forward_batch(self, chunks: list[list[int]], cache: DynamicCache, past_lengths: list[int],
                      logits_to_keep: int) -> torch.Tensor:
        """Feed each row's new tokens on top of its past in `cache` (left-padded, see the module doc)
        -> float32 logits [B, logits_to_keep, V] of the last `logits_to_keep` padded positions (0: all).

        The cache grows in place by the longest chunk; row i's new tokens sit at the left of that growth.
        """
        width, num_new = cache.get_seq_length(), max(len(c) for c in chunks)
        if len(chunks) == 1 and past_lengths[0] == width:  # alone, nothing padded: the model's own defaults
            out = self.model(input_ids=torch.tensor(chunks, device=self.device), use_cache=True,
                             logits_to_keep=logits_to_keep, **{self.cache_kwarg: cache})
            return out.logits.float()
        input_ids = torch.zeros((len(chunks), num_new), dtype=torch.long)
        mask = torch.zeros((len(chunks), width + num_new), dtype=torch.long)
        positions = torch.zeros((len(chunks), num_new), dtype=torch.long)
        for row, (chunk, past) in enumerate(zip(chunks, past_lengths, strict=True)):
            input_ids[row, :len(chunk)] = torch.tensor(chunk)
            mask[row, width - past:width + len(chunk)] = 1
            # padded queries continue the row's positions: in range, and never read by a real query
            positions[row] = torch.arange(past, past + num_new)
        max_position = getattr(self.config, "max_position_embeddings", None)
        if max_position is not None:
            positions.clamp_(max=max_position - 1)
        kwargs = {"position_ids": positions.to(self.device)} if self.can_batch else {}
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), use_cache=True,
                         logits_to_keep=logits_to_keep, **{self.cache_kwarg: cache}, **kwargs)
        return out.logits.float()

    def forward_request(self, token_ids_new: list[int], past: DynamicCache | None = None,
                        all_logits: bool = False) -> tuple[torch.Tensor, DynamicCache]:
        """One request alone -> (float32 logits of its last token [V], or of every new token [n, V] with
        `all_logits`; its cache, grown in place). past=None starts a new request."""
        cache = past if past is not None else self.new_cache()
        logits = self.forward_batch([token_ids_new], cache, [cache.get_seq_length()], 0 if all_logits else 1)[0]
        return (logits if all_logits else logits[-1]), cache
