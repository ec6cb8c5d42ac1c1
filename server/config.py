"""Engine configuration: one dataclass, filled from the CLI (TGI launcher flag names)."""

from __future__ import annotations

from dataclasses import dataclass

LOAD_FORMATS = ("auto", "safetensors", "dummy")
SCHEDULING_POLICIES = ("fcfs", "priority")
ACTIVATION_QUANTIZATIONS = (None, "", "none", "int8")


def parse_batch_sizes(spec: str) -> list[int]:
    """`--cuda-graphs`: comma-separated batch sizes, or 0 for none."""
    try:
        sizes = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        sizes = [-1]
    if any(size < 0 for size in sizes) or (0 in sizes and len(sizes) > 1):
        raise ValueError(f"`--cuda-graphs` must be comma-separated batch sizes (e.g. 1,2,4,8) or 0; got {spec!r}")
    return sorted(set(sizes) - {0})


@dataclass(slots=True)
class EngineConfig:
    model_id: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    quantize: str | None = None
    # int8: round activations to 8 bits (blocks of 32, llama.cpp's Q8_0) for 4/8-bit grouped weights' integer
    # dot products on CPU; faster decode, outputs close to (not equal to) the float activations'
    activation_quantization: str | None = None
    num_shard: int = 1
    # request limits (TGI: --max-input-tokens, --max-total-tokens, ...); None = derived from the model
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_stop_sequences: int = 4
    max_best_of: int = 2
    max_top_n_tokens: int = 5
    # batching (TGI semantics)
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    # TGI defaults to 0.3 because its prefill is a separate forward that stalls every decode; here a
    # prompt chunk rides in the same step as the decodes, so holding arrivals back only adds TTFT
    waiting_served_ratio: float = 0.0
    max_waiting_tokens: int = 20
    # paged KV cache
    block_size: int = 16
    kv_cache_memory_fraction: float = 0.9
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    use_transformers_fallback: bool = False
    # transformers' trust_remote_code: run a checkpoint's own modelling code (its config's `auto_map`)
    trust_remote_code: bool = False
    # TGI's flag: refuse `grammar` / `response_format` instead of constraining decoding
    disable_grammar_support: bool = False
    # vLLM's --load-format: "dummy" fills the weights at random (the folder needs only config + tokenizer)
    load_format: str = "auto"
    # TGI's --speculate: n-gram draft tokens verified per decode step of greedy requests (0: off)
    speculate: int = 0
    # vLLM's --num-scheduler-steps: greedy decode steps run back to back in one native call where the model's
    # fused CPU decode can (docs/quantization.md); tokens then stream in bursts of this many (1: off)
    num_scheduler_steps: int = 1
    # TGI's --cuda-graphs: decode batch sizes captured as CUDA graphs (None: 1,2,4,8,16,32 on CUDA; "0": off)
    cuda_graphs: str | None = None
    # TGI's --kv-cache-dtype: fp8_e4m3fn | fp8_e5m2 K/V storage (None / auto: the model dtype)
    kv_cache_dtype: str | None = None
    # TGI's --rope-scaling / --rope-factor: linear position scaling over the checkpoint's context
    rope_scaling: str | None = None
    rope_factor: float | None = None
    # TGI's --tokenizer-config-path: a tokenizer_config.json whose chat_template replaces the model's
    tokenizer_config_path: str | None = None
    # vLLM's --scheduling-policy: fcfs, or priority (waiting requests by their `priority`, lowest first)
    scheduling_policy: str = "fcfs"
    # TGI's --lora-adapters: name=path or Hub ids, comma-separated (docs/lora.md); vLLM's limits beside it
    lora_adapters: str | None = None
    max_loras: int = 4
    max_lora_rank: int = 64
    enable_lora_runtime_updates: bool = False

    def __post_init__(self) -> None:
        from genserve.server.model_overrides import validate_rope_flags

        validate_rope_flags(self.rope_scaling, self.rope_factor)
        if self.kv_cache_dtype not in (None, "", "auto", "fp8", "fp8_e4m3fn", "fp8_e5m2"):
            raise ValueError("`--kv-cache-dtype` must be auto, fp8_e4m3fn or fp8_e5m2 (fp8 = fp8_e4m3fn); "
                             f"got {self.kv_cache_dtype!r}")
        if self.activation_quantization not in ACTIVATION_QUANTIZATIONS:
            raise ValueError("`--activation-quantization` must be none or int8; got "
                             f"{self.activation_quantization!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"`--load-format` must be one of {', '.join(LOAD_FORMATS)}; got {self.load_format!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"`--scheduling-policy` must be one of {', '.join(SCHEDULING_POLICIES)}; "
                             f"got {self.scheduling_policy!r}")
        if self.speculate < 0:
            raise ValueError(f"`--speculate` must be >= 0; got {self.speculate}")
        if self.num_scheduler_steps < 1:
            raise ValueError(f"`--num-scheduler-steps` must be >= 1; got {self.num_scheduler_steps}")
        if self.num_scheduler_steps > 1 and self.speculate:
            raise ValueError("`--num-scheduler-steps` > 1 and `--speculate` both make a step sample several tokens; "
                             "choose one")
        if self.cuda_graphs is not None:
            parse_batch_sizes(self.cuda_graphs)
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("`--max-loras` and `--max-lora-rank` must be >= 1")
        if self.enable_lora_runtime_updates and self.num_shard > 1:
            raise ValueError("`--enable-lora-runtime-updates` needs --num-shard 1: the other ranks read adapters "
                             "from --lora-adapters only")

    @property
    def is_lora_enabled(self) -> bool:
        return bool(self.lora_adapters) or self.enable_lora_runtime_updates

    def resolve_limits(self, max_position_embeddings: int) -> None:
        """Fill the limits left unset, the way TGI's launcher derives them."""
        if self.max_total_tokens is None:
            self.max_total_tokens = min(max_position_embeddings, 4096)
        if self.max_input_tokens is None:
            self.max_input_tokens = self.max_total_tokens - 1
        if self.max_batch_prefill_tokens is None:
            self.max_batch_prefill_tokens = max(self.max_input_tokens + 50, 512)
        if self.max_batch_size is None:
            self.max_batch_size = 256
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("`max_input_tokens` must be < `max_total_tokens`")
        if self.max_total_tokens > max_position_embeddings:
            raise ValueError(
                f"`max_total_tokens` ({self.max_total_tokens}) exceeds the model's "
                f"max_position_embeddings ({max_position_embeddings})"
            )
        if self.max_batch_prefill_tokens < self.block_size:
            raise ValueError("`max_batch_prefill_tokens` must be at least the KV block size")
        if self.waiting_served_ratio < 0:
            raise ValueError("`waiting_served_ratio` must be >= 0")
