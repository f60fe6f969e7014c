"""Configuration of the lmblocks BERT family (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding").

Field names follow transformers' `BertConfig` (`hidden_size`, `num_hidden_layers`, `type_vocab_size`, ...), so a
`config.json` written by the built-in BERT (`model_type: "bert"`, the layout of `bert-base-uncased`) loads here too:
`from_dict` translates it and refuses the BERT variants this implementation does not have (decoder mode,
cross-attention, relative position embeddings).
"""

from __future__ import annotations

from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict

from .configuration_common import LmbPretrainedConfig

BERT_PRESETS: dict[str, dict[str, Any]] = {
    # The two sizes of the paper: BERT-base ≈110M and BERT-large ≈340M parameters (vocabulary 30522, 512 positions).
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    # Two of the "BERT miniatures" of Turc et al. 2019 (L=4/H=512 and L=2/H=128), for CPU runs and tests.
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "tiny": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                 max_position_embeddings=128),
}


@strict
class LmbBertConfig(LmbPretrainedConfig):
    """BERT: learned absolute position and token-type (segment) embeddings, post-LayerNorm encoder blocks with
    bidirectional attention, GELU MLP of width `intermediate_size` (default 4·`hidden_size`), a tanh pooler on the
    first token, and an MLM decoder tied to the word embeddings.

    `type_vocab_size` is the number of segment ids (2 for sentence A / sentence B); `classifier_dropout` defaults to
    `hidden_dropout_prob` in the classification heads.

    Example: `LmbBertConfig.from_preset("base")` or `LmbBertConfig(hidden_size=256, num_hidden_layers=4,
    num_attention_heads=4)`.
    """

    model_type = "lmb_bert"
    presets: ClassVar[dict[str, dict[str, Any]]] = BERT_PRESETS
    # transformers' BertConfig files (bert-base-uncased, sentence-transformers models) load here; decoder mode,
    # cross-attention and relative position embeddings change the computation and are refused.
    foreign_model_type: ClassVar[str] = "bert"
    fixed_keys: ClassVar[dict[str, Any]] = {
        "is_decoder": False,
        "add_cross_attention": False,
        "position_embedding_type": "absolute",
    }
    derived_fields = {"intermediate_size": (("hidden_size",), lambda c: 4 * c.hidden_size)}

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    classifier_dropout: float | int | None = None
    pad_token_id: int | None = 0
    # The tokenizer's special ids (`config_kwargs_from_tokenizer` fills them); [CLS] opens every input and the
    # pooler reads it, [SEP] closes each segment, [MASK] replaces masked tokens in pretraining.
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    mask_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True

    def validate_architecture(self):
        """Checks shapes that would otherwise fail deep inside a forward pass."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}): each head gets hidden_size / num_attention_heads dimensions."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}.")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size}).")


__all__ = ["LmbBertConfig", "BERT_PRESETS"]
