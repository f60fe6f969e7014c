"""What a model family is, in one place: its config and model classes (by the Auto class each answers to), its
training objective, its tokenizer kind and special tokens, its LoRA targets and its main-job settings.

Registration with transformers' Auto classes, the scripts, the tokenizer trainer and the tests all read `FAMILIES`;
add a family by adding an entry. (The modeling files hold the `AUTO_CLASSES` table themselves, because they also run
as a checkpoint's remote code where this module does not exist.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import transformers

from . import modeling_bert, modeling_gpt2, modeling_llama, modeling_qwen2, tokenization_trainer
from .configuration_bert import LmbBertConfig
from .configuration_gpt2 import LmbGPT2Config
from .configuration_llama import LmbLlamaConfig
from .configuration_qwen2 import LmbQwen2Config
from .integrations import register_peft_target_modules


@dataclass(frozen=True)
class FamilySpec:
    """One model family.

    `auto_classes` maps transformers' Auto class names to the family's classes; `pretraining_class_name` is the
    head `scripts/pretrain.py` trains; `objective` is "causal_lm" (next-token) or "mlm_nsp" (masked LM + next
    sentence). `tokenizer_kind` is the `kind` of `lmblocks.train_tokenizer` that fits the family, with its special
    tokens. `demo` holds the main job's settings: model sizes (`preset`, `overrides`, `quick_overrides`), step budget
    and learning rate (`steps`, `learning_rate`), sample `prompt`, and the roles it plays (`classifier`: the LoRA
    classifier's family; `quick_chat`: instruction-tuned in `--quick`; `in_main_job`: pretrained by default).
    """

    name: str
    config_class: type
    auto_classes: dict[str, type]
    objective: str
    pretraining_auto_class: str
    tokenizer_kind: str
    special_tokens: tuple[str, ...]
    lora_target_modules: tuple[str, ...]
    demo: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    @property
    def base_class(self) -> type:
        return self.auto_classes["AutoModel"]

    @property
    def pretraining_class(self) -> type:
        return self.auto_classes[self.pretraining_auto_class]

    @property
    def causal_lm_class(self) -> type | None:
        return self.auto_classes.get("AutoModelForCausalLM")

    @property
    def masked_lm_class(self) -> type | None:
        return self.auto_classes.get("AutoModelForMaskedLM")

    @property
    def seq_cls_class(self) -> type | None:
        return self.auto_classes.get("AutoModelForSequenceClassification")

    @property
    def model_classes(self) -> tuple[type, ...]:
        """Every model class of the family, the base model first."""
        return tuple(dict.fromkeys(self.auto_classes.values()))

    @property
    def is_decoder(self) -> bool:
        return self.objective == "causal_lm"

    def register(self) -> None:
        """Register the config and every model class with this process's Auto classes."""
        transformers.AutoConfig.register(self.model_type, self.config_class, exist_ok=True)
        for auto_class_name, model_class in self.auto_classes.items():
            getattr(transformers, auto_class_name).register(self.config_class, model_class, exist_ok=True)
        # peft's defaults from the family's module table (inherited by a family built on another).
        register_peft_target_modules(self.model_type, getattr(self.base_class, "peft_target_modules", None)
                                     or {"projections": self.lora_target_modules})


FAMILIES: dict[str, FamilySpec] = {
    "gpt2": FamilySpec(
        name="gpt2",
        config_class=LmbGPT2Config,
        auto_classes=modeling_gpt2.AUTO_CLASSES,
        objective="causal_lm",
        pretraining_auto_class="AutoModelForCausalLM",
        tokenizer_kind="gpt2",
        special_tokens=tokenization_trainer.GPT2_SPECIAL_TOKENS,
        lora_target_modules=modeling_gpt2.LORA_TARGET_MODULES,
        demo=dict(
            preset="small",
            overrides="n_embd=192,n_layer=3,n_head=3,n_positions=256",
            quick_overrides="n_embd=32,n_layer=1,n_head=2,n_positions=64",
            steps=500,
            learning_rate=3e-3,
            prompt="Alice was beginning to",
            classifier=dict(lm_loss_weight=0.5),  # the main job's LoRA classifier runs on this family
        ),
    ),
    "llama": FamilySpec(
        name="llama",
        config_class=LmbLlamaConfig,
        auto_classes=modeling_llama.AUTO_CLASSES,
        objective="causal_lm",
        pretraining_auto_class="AutoModelForCausalLM",
        tokenizer_kind="llama",
        special_tokens=tokenization_trainer.LLAMA_SPECIAL_TOKENS,
        lora_target_modules=modeling_llama.LORA_TARGET_MODULES,
        demo=dict(
            preset="tiny",
            overrides="hidden_size=192,intermediate_size=512,num_hidden_layers=3,num_attention_heads=3,"
            "num_key_value_heads=1",
            quick_overrides="hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
            "num_key_value_heads=1",
            steps=500,
            learning_rate=3e-3,
            prompt="It was the best of",
            quick_chat=True,  # --quick instruction-tunes this family's tiny model instead of SmolLM2
        ),
    ),
    # Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen: LLaMA's differences, with GPT-2's kind of tokenizer (byte-level BPE).
    "qwen2": FamilySpec(
        name="qwen2",
        config_class=LmbQwen2Config,
        auto_classes=modeling_qwen2.AUTO_CLASSES,
        objective="causal_lm",
        pretraining_auto_class="AutoModelForCausalLM",
        tokenizer_kind="gpt2",
        special_tokens=tokenization_trainer.GPT2_SPECIAL_TOKENS,
        lora_target_modules=modeling_qwen2.LORA_TARGET_MODULES,
        demo=dict(
            preset="tiny",
            overrides="hidden_size=256,intermediate_size=688,num_hidden_layers=4,num_attention_heads=4,"
            "num_key_value_heads=2",
            quick_overrides="hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
            "num_key_value_heads=1",
            steps=300,
            learning_rate=2e-3,
            prompt="It was the best of",
            in_main_job=False,  # `scripts/main.py --families qwen2` pretrains it; not by default
        ),
    ),
    "bert": FamilySpec(
        name="bert",
        config_class=LmbBertConfig,
        auto_classes=modeling_bert.AUTO_CLASSES,
        objective="mlm_nsp",
        pretraining_auto_class="AutoModelForPreTraining",
        tokenizer_kind="bert",
        special_tokens=tokenization_trainer.BERT_SPECIAL_TOKENS,
        lora_target_modules=modeling_bert.LORA_TARGET_MODULES,
        demo=dict(
            preset="tiny",
            overrides="hidden_size=128,intermediate_size=512,num_hidden_layers=2,num_attention_heads=2,"
            "max_position_embeddings=16",
            quick_overrides="hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
            "max_position_embeddings=64",
            steps=2400,
            learning_rate=2e-3,
            block_size=16,  # sentence pairs of 16 tokens, 128 to a batch, PyTorch's linear init: main.py's notes
            batch_size=128,
            linear_init="pytorch",
        ),
    ),
}

FAMILY_OF_MODEL_TYPE: dict[str, FamilySpec] = {spec.model_type: spec for spec in FAMILIES.values()}


def register_all() -> None:
    for spec in FAMILIES.values():
        spec.register()


__all__ = ["FamilySpec", "FAMILIES", "FAMILY_OF_MODEL_TYPE", "register_all"]
