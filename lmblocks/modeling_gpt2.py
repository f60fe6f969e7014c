"""GPT-2 (Radford et al. 2019) as a Hugging Face model.

Pre-LayerNorm decoder blocks with learned absolute positions; the attention math, KV cache and kernels come from
`layers.py`. Parameter names are those of the official checkpoints (`transformer.h.0.attn.c_attn.weight`, ...). The
official checkpoints (transformers' `GPT2*` classes, `model_type: "gpt2"`) store their projections in `Conv1D`
layout, (in, out), where lmblocks uses `nn.Linear`, (out, in): `from_pretrained` transposes them when it loads such a
checkpoint, and `export_to_transformers_gpt2` transposes them back. lmblocks' own checkpoints are plain state dicts.
"""

import math
import os

import torch
from huggingface_hub import save_torch_state_dict
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache
from transformers.core_model_loading import Transpose, WeightConverter
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging

from .compat import forget_load_conversions
from .configuration_gpt2 import LmbGPT2Config
from .heads import CausalLMHead, LastTokenClassifierHead, _normalise
from .integrations import register_peft_target_modules, weight_conversions_while_loading
from .layers import MultiHeadAttention
from .losses import linear_cross_entropy_sum
from .modeling_common import DecoderModel, LmbPreTrainedModel, register_for_auto_classes

logger = logging.get_logger(__name__)

# The projections the official checkpoints store in Conv1D layout (in, out), transposed to nn.Linear's (out, in).
CONV1D_PROJECTIONS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# peft's default targets for this family, by role (`LoraConfig()`, `IA3Config()`, ... without `target_modules`;
# integrations.register_peft_target_modules): LoRA and its relatives adapt the projections, IA3 scales the keys,
# values and feed-forward output, LN tuning trains the norms.
LORA_TARGET_MODULES = ("c_attn", "c_proj", "c_fc")
PEFT_TARGET_MODULES = {
    "projections": LORA_TARGET_MODULES,
    "ia3": ("c_attn", "mlp.c_proj"),
    "ia3_feedforward": ("mlp.c_proj",),
    "norms": ("ln_1", "ln_2", "ln_f"),
}
register_peft_target_modules(LmbGPT2Config.model_type, PEFT_TARGET_MODULES)


class LmbGPT2Attention(MultiHeadAttention):
    """Causal self-attention with one fused projection to queries, keys and values (`c_attn`)."""

    def __init__(self, config: LmbGPT2Config, layer_idx: int) -> None:
        head_dim = config.n_embd // config.n_head
        super().__init__(config, layer_idx, config.n_head, config.n_head, head_dim, config.attn_pdrop, is_causal=True)
        self.split_size = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.c_attn(hidden_states).split(self.split_size, dim=2)  # 3 × (B, T, C)

    def project_output(self, attn_output: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(self.c_proj(attn_output))


class LmbGPT2MLP(nn.Module):
    """Position-wise feed-forward: C -> n_inner -> C with GELU."""

    def __init__(self, config: LmbGPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        # "gelu_new" (GPT-2's tanh-approximated GELU) is transformers' NewGELUActivation: eight elementwise ops, six
        # tensors kept for backward. PyTorch's fused kernel computes the same function (within 1e-6) in one pass.
        act = "gelu_pytorch_tanh" if config.activation_function == "gelu_new" else config.activation_function
        self.act = ACT2FN[act]
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class LmbGPT2Block(GradientCheckpointingLayer):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: LmbGPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = LmbGPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = LmbGPT2MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.attn(self.ln_1(hidden_states), attention_mask, past_key_values, **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class LmbGPT2PreTrainedModel(LmbPreTrainedModel):
    config: LmbGPT2Config
    config_class = LmbGPT2Config
    peft_target_modules = PEFT_TARGET_MODULES  # a family built on this one inherits its peft defaults
    base_model_prefix = "transformer"
    _input_embed_layer = "wte"  # for get/set_input_embeddings
    _no_split_modules = ["LmbGPT2Block"]
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": LmbGPT2Block, "attentions": LmbGPT2Attention}
    # Causal-mask buffers that old GPT-2 checkpoints carry; masks are built per forward now.
    # Anchored at a module boundary: serving engines (vLLM) apply these patterns to every checkpoint key, where an
    # unanchored `attn\.bias$` would also drop `c_attn.bias`.
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)attn\.bias$", r"(^|\.)attn\.masked_bias$"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Loads lmblocks' GPT-2 checkpoints and also transformers' own (`model_type: "gpt2"`, the format of the
        official `gpt2` checkpoints), whose Conv1D-layout projections are transposed on the way in."""
        if _checkpoint_model_type(pretrained_model_name_or_path, kwargs) != "gpt2":
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        conv1d_to_linear = [WeightConverter(p, p, operations=[Transpose(0, 1)]) for p in CONV1D_PROJECTIONS]
        with weight_conversions_while_loading(LmbGPT2Config.model_type, conv1d_to_linear):
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        forget_load_conversions(model)  # lmblocks saves its own layout, not the one it loaded
        return model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # GPT-2 paper: scale the init of the projections that write into the residual stream by 1/√N, N = 2·n_layer
        # residual additions, so the stream's variance does not grow with depth.
        if isinstance(module, (LmbGPT2Attention, LmbGPT2MLP)):
            std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.c_proj.weight, mean=0.0, std=std)

    def get_position_embeddings(self) -> nn.Embedding:
        return self.base_model.wpe

    def resize_position_embeddings(self, new_num_position_embeddings: int) -> None:
        """Change the number of learned positions (`n_positions`): existing rows are kept, new rows are initialised
        like at construction, so a model can be fine-tuned on longer contexts than it was trained on."""
        old = self.base_model.wpe
        new = nn.Embedding(new_num_position_embeddings, old.embedding_dim, device=old.weight.device,
                           dtype=old.weight.dtype)
        self._init_weights(new)
        kept = min(old.num_embeddings, new_num_position_embeddings)
        with torch.no_grad():
            new.weight[:kept] = old.weight[:kept]
        self.base_model.wpe = new
        self.config.n_positions = new_num_position_embeddings


class LmbGPT2Model(DecoderModel, LmbGPT2PreTrainedModel):
    """The GPT-2 transformer: token + position embeddings, `n_layer` blocks, final LayerNorm."""

    def __init__(self, config: LmbGPT2Config) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([LmbGPT2Block(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def run_layers(
        self,
        inputs_embeds: torch.Tensor,
        causal_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        past_key_values: Cache | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))  # (B, T, C)
        for block in self.h:
            hidden_states = block(hidden_states, causal_mask, past_key_values, position_ids=position_ids, **kwargs)
        return self.ln_f(hidden_states)

    @property
    def learned_positions(self) -> int:
        return self.config.n_positions


class LmbGPT2LMHeadModel(CausalLMHead, LmbGPT2PreTrainedModel, GenerationMixin):
    """GPT-2 with the language-modelling head (tied to the token embeddings). `labels` gives the causal-LM loss,
    shifted inside; `-100` labels are ignored."""

    base_model_class = LmbGPT2Model
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}


class LmbGPT2ForSequenceClassification(LastTokenClassifierHead, LmbGPT2PreTrainedModel):
    """GPT-2 with a classification head on the last non-padding token (GPT paper, section 3.2).

    With `labels`, the loss is L = L_task + λ·L_LM where λ = `config.lm_loss_weight` and L_LM is the causal-LM loss
    of the input itself through the tied LM head: the auxiliary objective of GPT fine-tuning. Padding is left out of
    L_LM — by `attention_mask`, or else by `pad_token_id`. L_LM is each sequence's mean token loss averaged over the
    sequences, so both terms count sequences and the loss stays exact under Trainer's gradient accumulation (which
    counts one item per labelled sequence). L_LM needs `input_ids` as its targets: with `inputs_embeds` alone λ is
    not applied, and a warning says so.
    """

    base_model_class = LmbGPT2Model
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def add_head_modules(self, config: LmbGPT2Config) -> None:
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # tied: adds no parameters

    def auxiliary_loss(
        self, hidden_states: torch.Tensor, input_ids, attention_mask, num_items_in_batch
    ) -> torch.Tensor | None:
        if not self.config.lm_loss_weight:
            return None
        if input_ids is None:
            logger.warning_once(
                "lm_loss_weight is not applied: the input came as inputs_embeds without input_ids, so the auxiliary "
                "LM loss has no next-token targets. Pass input_ids to train with it."
            )
            return None
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask.to(input_ids.device).bool()
        elif self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            real = torch.ones_like(input_ids, dtype=torch.bool)
        targets = input_ids.masked_fill(~real, -100)[:, 1:].to(hidden_states.device)  # position t predicts t + 1
        counts = (targets != -100).sum(dim=1).clamp(min=1)  # a row with no target contributes 0
        # Row by row through the fused LM-head loss (losses.py): the (B, T, vocab) logits matrix is never built.
        per_sequence = torch.stack([
            linear_cross_entropy_sum(hidden_states[row, :-1], self.lm_head, targets[row], self.config.vocab_size)
            for row in range(targets.shape[0])
        ]) / counts
        return self.config.lm_loss_weight * _normalise(per_sequence.sum(), per_sequence.numel(), num_items_in_batch)


def export_to_transformers_gpt2(
    model: LmbGPT2PreTrainedModel, save_directory: str | os.PathLike, max_shard_size: str = "5GB"
) -> None:
    """Save `model` in the format of transformers' built-in GPT-2 (the format of the official `gpt2` checkpoints):
    a `GPT2Config` (`model_type: "gpt2"`) and safetensors weights with Conv1D-layout projections, which
    `GPT2Model` / `GPT2LMHeadModel` / `GPT2ForSequenceClassification.from_pretrained` load without lmblocks.

    The projections are transposed back to Conv1D layout; otherwise the tensors are those `save_pretrained` writes. `scripts/export_gpt2.py` is the command-line front end.
    """
    architecture = TRANSFORMERS_GPT2_ARCHITECTURES[type(model)]
    hf_config = model.config.to_transformers_gpt2()
    hf_config.architectures = [architecture]
    # save_pretrained's order: drop tied copies (lm_head) first, then revert the conversions on what is left.
    state_dict = remove_tied_weights_from_state_dict(model.state_dict(), model)
    state_dict = {name: tensor.t() if name.endswith(CONV1D_PROJECTIONS) else tensor for name, tensor in state_dict.items()}
    os.makedirs(save_directory, exist_ok=True)
    save_torch_state_dict(
        {name: tensor.contiguous() for name, tensor in state_dict.items()},
        save_directory,
        max_shard_size=max_shard_size,
        metadata={"format": "pt"},
    )
    hf_config.save_pretrained(save_directory)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(save_directory)


def _checkpoint_model_type(pretrained_model_name_or_path, kwargs: dict) -> str | None:
    """The `model_type` in a checkpoint's config.json, or None where there is none (e.g. a bare `state_dict`)."""
    if pretrained_model_name_or_path is None:
        return None
    hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "token", "revision",
                                         "subfolder") if k in kwargs}
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
    except OSError:
        return None
    return config_dict.get("model_type")


# The transformers class each lmblocks GPT-2 class exports to.
TRANSFORMERS_GPT2_ARCHITECTURES: dict[type[LmbGPT2PreTrainedModel], str] = {
    LmbGPT2Model: "GPT2Model",
    LmbGPT2LMHeadModel: "GPT2LMHeadModel",
    LmbGPT2ForSequenceClassification: "GPT2ForSequenceClassification",
}


# How this family exports to transformers' own classes (`lmblocks.export`): the class each lmblocks class becomes,
# the weights transformers' GPT-2 stores transposed (Conv1D), the option it cannot express (exported only at the one
# value it has) and the one it has no counterpart for (left out, and said so).
TRANSFORMERS_EXPORT = {
    "classes": TRANSFORMERS_GPT2_ARCHITECTURES,
    "transposed": CONV1D_PROJECTIONS,
    "required": {"qkv_bias": True},
    "dropped": {"lm_loss_weight": "the weight λ of the classifier's auxiliary LM loss, which transformers' "
                                  "GPT2ForSequenceClassification does not have (it trains with the task loss only)"},
}

# How this family exports to GGUF for llama.cpp (`lmblocks.export_gguf`): llama.cpp's architecture, the config field
# behind each of its hyper-parameters, and the options it computes only one way (field -> allowed values).
GGUF_EXPORT = {
    "architecture": "gpt2",
    "hyperparameters": {
        "context_length": "n_positions",
        "embedding_length": "n_embd",
        "feed_forward_length": "n_inner",
        "block_count": "n_layer",
        "attention.head_count": "n_head",
        "attention.layer_norm_epsilon": "layer_norm_epsilon",
    },
    "required": {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "qkv_bias": True},
}

# Every Auto class the family answers to: registered here for remote code (`auto_map`), and by `lmblocks.families`
# with this process's Auto classes.
AUTO_CLASSES = {
    "AutoModel": LmbGPT2Model,
    "AutoModelForCausalLM": LmbGPT2LMHeadModel,
    "AutoModelForSequenceClassification": LmbGPT2ForSequenceClassification,
}
register_for_auto_classes(LmbGPT2Config, AUTO_CLASSES)

__all__ = [
    "AUTO_CLASSES",
    "LORA_TARGET_MODULES",
    "TRANSFORMERS_EXPORT",
    "GGUF_EXPORT",
    "PEFT_TARGET_MODULES",
    "export_to_transformers_gpt2",
    "TRANSFORMERS_GPT2_ARCHITECTURES",
    "LmbGPT2PreTrainedModel",
    "LmbGPT2Model",
    "LmbGPT2LMHeadModel",
    "LmbGPT2ForSequenceClassification",
]
