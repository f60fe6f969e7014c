"""Task heads written once for every family: the causal-LM head and the last-real-token classifier of the decoders,
and the classification loss every sequence-level head uses.

A family declares a head in two lines — which base model it sits on and what it ties:

    class LmbLlamaForCausalLM(CausalLMHead, LmbLlamaPreTrainedModel, GenerationMixin):
        base_model_class = LmbLlamaModel
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

and overrides a hook only where it really differs (GPT-2's classifier adds the auxiliary LM loss of the GPT paper).
The base model is built under the family's `base_model_prefix` (`transformer`, `model`), so checkpoint keys stay the
official ones.

**Losses are exact under gradient accumulation.** `Trainer` passes `num_items_in_batch` — the number of labelled
items in the whole accumulated batch — and sums the micro-batch losses without averaging them. Every head here
returns sum ÷ `num_items_in_batch` when it is given (and the plain mean otherwise), so one accumulated step equals
one step on the whole batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .layers import last_token_index
from .losses import causal_lm_head_loss, causal_lm_loss, trains_without_logits


def _normalise(loss_sum: torch.Tensor, count, num_items_in_batch) -> torch.Tensor:
    """sum ÷ `num_items_in_batch` (the whole accumulated batch, from Trainer) when given, else sum ÷ count."""
    if num_items_in_batch is None:
        return loss_sum / count
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch


def sequence_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, config, num_items_in_batch=None, **kwargs
) -> torch.Tensor:
    """transformers' sequence-classification loss (regression, single-label or multi-label, picked by
    `config.problem_type` or inferred as transformers does), exact under gradient accumulation for all three.

    Trainer counts `labels != -100`: one item per sequence for single-label and regression, one per (sequence,
    label) for multi-label — the same items each mean below runs over. Single-label rows labelled -100 are ignored.
    """
    num_labels = logits.shape[-1]
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        if num_labels == 1:
            errors = (logits.float().view(-1) - labels.float().view(-1)) ** 2
        else:
            errors = (logits.float() - labels.float()) ** 2
        return _normalise(errors.sum(), errors.numel(), num_items_in_batch)
    if config.problem_type == "single_label_classification":
        labels = labels.view(-1)
        loss_sum = nn.functional.cross_entropy(logits.float().view(-1, num_labels), labels, reduction="sum")
        return _normalise(loss_sum, (labels != -100).sum(), num_items_in_batch)
    losses = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    return _normalise(losses.sum(), losses.numel(), num_items_in_batch)


class ModelWithHead:
    """A head over a family's base model, built under `base_model_prefix` from `base_model_class`."""

    base_model_class: ClassVar[type]
    base_model_kwargs: ClassVar[dict] = {}

    def build_base_model(self, config) -> None:
        setattr(self, self.base_model_prefix, self.base_model_class(config, **self.base_model_kwargs))


class CausalLMHead(ModelWithHead):
    """A decoder with the language-modelling head. `labels` gives the causal-LM loss (position t predicts label
    t + 1, shifted inside; -100 ignored); `num_items_in_batch` (from Trainer) makes it exact under accumulation.
    `logits_to_keep`: logits for the last N positions only (0 = all), which saves memory in generation.

    In training mode with `labels` (and the default `loss_function`), the loss comes straight from the hidden states,
    chunk by chunk (`losses.causal_lm_head_loss`: the (tokens × vocab) logits never exist) and `logits` is None.
    In eval mode — `generate`, `Trainer.evaluate`, metrics — the logits are computed as always."""

    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    # transformers' ForCausalLMLoss on a leaner cross-entropy (losses.py); `model.loss_function = f` still overrides.
    loss_function = staticmethod(causal_lm_loss)

    def __init__(self, config) -> None:
        super().__init__(config)
        self.build_base_model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Trainer reads `loss_type` to count shifted labels for `num_items_in_batch`; transformers derives it from
        # the class name, which for GPT-2's `...LMHeadModel` says nothing.
        self.loss_type = "ForCausalLM"
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
        outputs: BaseModelOutputWithPast = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = logits = None
        all_positions = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if all_positions and trains_without_logits(self, labels, causal_lm_loss):
            loss = causal_lm_head_loss(hidden_states, self.lm_head, labels, self.config.vocab_size, **kwargs)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])  # (B, T', vocab)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class LastTokenClassifierHead(ModelWithHead):
    """A decoder with a linear classification head on each row's last real token (a causal model has seen the whole
    sequence only there; GPT paper, section 3.2). `num_labels == 1` is regression; `problem_type` picks the loss as
    in transformers. Subclasses add to the loss through `auxiliary_loss`."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.build_base_model(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.add_head_modules(config)
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
        outputs: BaseModelOutputWithPast = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, C)
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        last_index = last_token_index(input_ids, attention_mask, self.config.pad_token_id, hidden_states.device)
        pooled_logits = self.score(hidden_states[rows, last_index])  # (B, num_labels)

        loss = None
        if labels is not None:
            num_items_in_batch = kwargs.get("num_items_in_batch")
            loss = sequence_classification_loss(pooled_logits, labels, self.config, num_items_in_batch)
            auxiliary = self.auxiliary_loss(hidden_states, input_ids, attention_mask, num_items_in_batch)
            if auxiliary is not None:
                loss = loss + auxiliary

        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def add_head_modules(self, config) -> None:
        """Modules a family's classifier adds (built before the weights are initialised and tied)."""

    def auxiliary_loss(
        self, hidden_states: torch.Tensor, input_ids, attention_mask, num_items_in_batch
    ) -> torch.Tensor | None:
        """A term added to the classification loss (none here)."""
        return None


class EncoderHead(ModelWithHead):
    """A task head over an encoder, for heads whose targets come as `labels`: run the encoder, then the head's
    `logits_and_loss`. Heads with other targets (BERT's pretraining: `labels` + `next_sentence_label`; spans:
    `start_positions` / `end_positions`; multiple choice's (B, choices, T) inputs) write their own `forward` on
    `encode`, so the encoder is called one way everywhere."""

    output_class: ClassVar[type]

    def encode(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        return self.base_model(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        outputs = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs)
        logits, loss = self.logits_and_loss(outputs, labels, **kwargs)
        return self.output_class(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def logits_and_loss(self, outputs, labels: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's scores from the encoder's outputs, and its loss when `labels` are given."""
        raise NotImplementedError


__all__ = [
    "EncoderHead",
    "sequence_classification_loss",
    "ModelWithHead",
    "CausalLMHead",
    "LastTokenClassifierHead",
]
