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
from transformers.cache_utils import Cache, DynamicCache
from transformers import PreTrainedConfig
from transformers.core_model_loading import Transpose, WeightConverter
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel, remove_tied_weights_from_state_dict
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_gpt2 import LmbGPT2Config
from .integrations import register_lora_target_modules, weight_conversions_while_loading
from .layers import MultiHeadAttention, check_model_inputs, last_token_index
from .losses import causal_lm_loss

# The projections the official checkpoints store in Conv1D layout (in, out), transposed to nn.Linear's (out, in).
CONV1D_PROJECTIONS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
register_lora_target_modules(LmbGPT2Config.model_type, ["c_attn", "c_proj", "c_fc"])


class LmbGPT2Attention(MultiHeadAttention):
    """Causal self-attention with one fused projection to queries, keys and values (`c_attn`)."""

    def __init__(self, config: LmbGPT2Config, layer_idx: int) -> None:
        head_dim = config.n_embd // config.n_head
        super().__init__(config, layer_idx, config.n_head, config.n_head, head_dim, config.attn_pdrop, is_causal=True)
        self.split_size = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)  # 3 × (B, T, C)
        attn_output, attn_weights = self.attend(query, key, value, attention_mask, past_key_values, **kwargs)
        return self.resid_dropout(self.c_proj(attn_output)), attn_weights


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


class LmbGPT2PreTrainedModel(PreTrainedModel):
    config: LmbGPT2Config
    config_class = LmbGPT2Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LmbGPT2Block"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": LmbGPT2Block, "attentions": LmbGPT2Attention}
    # Causal-mask buffers that old GPT-2 checkpoints carry; masks are built per forward now.
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias$", r"attn\.masked_bias$"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Loads lmblocks' GPT-2 checkpoints and also transformers' own (`model_type: "gpt2"`, the format of the
        official `gpt2` checkpoints), whose Conv1D-layout projections are transposed on the way in."""
        if _checkpoint_model_type(pretrained_model_name_or_path, kwargs) != "gpt2":
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        conv1d_to_linear = [WeightConverter(p, p, operations=[Transpose(0, 1)]) for p in CONV1D_PROJECTIONS]
        with weight_conversions_while_loading(LmbGPT2Config.model_type, conv1d_to_linear):
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        # transformers remembers the load's conversions to reverse them on save; lmblocks saves its own layout.
        model._weight_conversions = None
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


class LmbGPT2Model(LmbGPT2PreTrainedModel):
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

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        check_model_inputs(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        seq_len = inputs_embeds.shape[1]
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + past_seen).unsqueeze(0)
        self._check_positions(position_ids, past_seen, seq_len)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )

        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))  # (B, T, C)
        for block in self.h:
            hidden_states = block(hidden_states, causal_mask, past_key_values, position_ids=position_ids, **kwargs)
        hidden_states = self.ln_f(hidden_states)

        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)

    def _check_positions(self, position_ids: torch.Tensor, past_seen: int, seq_len: int) -> None:
        """GPT-2 learned `n_positions` position embeddings; a position past them would fail inside `wpe` with an
        opaque IndexError (a device-side assert on GPU). Checked on the values, so left-padded generation (positions
        smaller than the cache length) is not refused early. Skipped under torch.compile, where reading a tensor's
        value would break the graph."""
        if torch.compiler.is_compiling() or position_ids.numel() == 0:
            return
        last_position = int(position_ids.max())
        if last_position >= self.config.n_positions:
            raise ValueError(
                f"Sequence length {last_position + 1} (cached {past_seen} + new {seq_len}) exceeds "
                f"n_positions={self.config.n_positions}, the number of learned positions."
            )


class LmbGPT2LMHeadModel(LmbGPT2PreTrainedModel, GenerationMixin):
    """GPT-2 with the language-modelling head (tied to the token embeddings). `labels` gives the causal-LM loss,
    shifted inside; `-100` labels are ignored."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # transformers' ForCausalLMLoss on a leaner cross-entropy (losses.py); `model.loss_function = f` still overrides it.
    loss_function = staticmethod(causal_lm_loss)
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LmbGPT2Config) -> None:
        super().__init__(config)
        self.transformer = LmbGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """`logits_to_keep`: compute logits for only the last N positions (0 = all), which saves memory in generation.
        `num_items_in_batch` in kwargs (passed by Trainer) makes the loss exact under gradient accumulation."""
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class LmbGPT2ForSequenceClassification(LmbGPT2PreTrainedModel):
    """GPT-2 with a classification head on the last non-padding token (GPT paper, section 3.2).

    With `labels`, the loss is L = L_task + λ·L_LM where λ = `config.lm_loss_weight` and L_LM is the causal-LM loss
    of the input itself (through the tied LM head, padding ignored): the auxiliary objective of GPT fine-tuning.
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: LmbGPT2Config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = LmbGPT2Model(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, C)
        batch_size = hidden_states.shape[0]
        last_index = last_token_index(input_ids, attention_mask, self.config.pad_token_id, hidden_states.device)
        pooled_logits = self.score(hidden_states[torch.arange(batch_size, device=hidden_states.device), last_index])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=pooled_logits, labels=labels, pooled_logits=pooled_logits,
                                      config=self.config)
            if self.config.lm_loss_weight and input_ids is not None:
                lm_labels = input_ids.masked_fill(attention_mask == 0, -100) if attention_mask is not None else input_ids
                lm_loss = causal_lm_loss(self.lm_head(hidden_states), lm_labels, self.config.vocab_size)
                loss = loss + self.config.lm_loss_weight * lm_loss

        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


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


__all__ = [
    "export_to_transformers_gpt2",
    "TRANSFORMERS_GPT2_ARCHITECTURES",
    "LmbGPT2PreTrainedModel",
    "LmbGPT2Model",
    "LmbGPT2LMHeadModel",
    "LmbGPT2ForSequenceClassification",
]
