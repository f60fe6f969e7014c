"""Configuration of the lmblocks Qwen2 family: LLaMA's, with the defaults of transformers' `Qwen2Config` (a Hub file
that leaves a key out gets the same value there and here) and its sliding-window fields."""

from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict

from .configuration_llama import LLAMA_PRESETS, LmbLlamaConfig

_QWEN25 = dict(vocab_size=151936, max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151643,
               tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
QWEN2_PRESETS: dict[str, dict[str, Any]] = {
    # Qwen2.5 base models (2024-09), as Qwen/Qwen2.5-0.5B and -1.5B on the Hub.
    "0.5B": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_window_layers=24),
    "1.5B": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, max_position_embeddings=131072, max_window_layers=28),
    # Small shapes for CPU runs and tests: LLaMA's, with Qwen2's tied embeddings.
    **{name: dict(LLAMA_PRESETS[name], tie_word_embeddings=True) for name in ("small", "tiny")},
}
LAYER_TYPES = ("full_attention", "sliding_attention")


@strict
class LmbQwen2Config(LmbLlamaConfig):
    """Qwen2 (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen; `qwen2` config files load as they are): LLaMA with q/k/v
    biases (`attention_bias`) and `layer_types`, each layer `full_attention` or `sliding_attention` (over the last
    `sliding_window` tokens). The released checkpoints turn the window off; `sliding_window` then reads None."""

    model_type = "lmb_qwen2"
    presets: ClassVar[dict[str, dict[str, Any]]] = QWEN2_PRESETS
    foreign_model_type: ClassVar[str] = "qwen2"
    # transformers' rule: with the window on, the layers from `max_window_layers` on attend through it.
    derived_fields = {**LmbLlamaConfig.derived_fields, "layer_types": (
        ("num_hidden_layers", "use_sliding_window", "sliding_window", "max_window_layers"),
        lambda c: [LAYER_TYPES[bool(c.use_sliding_window and c.sliding_window) and i >= c.max_window_layers]
                   for i in range(c.num_hidden_layers)])}

    vocab_size: int = 151936
    intermediate_size: int = 22016
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    attention_bias: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        if not self.use_sliding_window:
            self.sliding_window = None  # as transformers: no reader (masks, caches, vLLM) sees a window that is off
        super().__post_init__(**kwargs)

    def validate_sliding_window(self):
        windowed = self.use_sliding_window or "sliding_attention" in self.layer_types
        if not set(self.layer_types) <= set(LAYER_TYPES) or windowed and not (self.sliding_window or 0) > 0:
            raise ValueError(f"layer_types may name only {LAYER_TYPES}, sliding ones with a positive sliding_window: "
                             f"got {self.layer_types}, sliding_window={self.sliding_window}.")


__all__ = ["LmbQwen2Config", "QWEN2_PRESETS"]
