"""BERT (Devlin et al. 2019) as a Hugging Face model.

Post-LayerNorm encoder blocks with learned absolute position and token-type embeddings and bidirectional attention;
the attention math and kernels come from `layers.py` (`is_causal=False`, padding masks from transformers'
`create_bidirectional_mask`). Parameter names are those of transformers' BERT and so of the original checkpoints
(`bert.encoder.layer.0.attention.self.query.weight`, `cls.predictions.transform.LayerNorm.weight`, ...): a folder
written by `BertForPreTraining.save_pretrained` loads with no renaming, and checkpoints with the TensorFlow-era
`LayerNorm.gamma` / `LayerNorm.beta` names load through transformers' built-in legacy renaming.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    NextSentencePredictorOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .compat import AttentionContainer
from .configuration_bert import LmbBertConfig
from .heads import EncoderHead, sequence_classification_loss
from .integrations import register_peft_target_modules
from .layers import MultiHeadAttention, check_model_inputs
from .losses import masked_lm_head_loss, masked_lm_loss, trains_without_logits
from .modeling_common import LmbPreTrainedModel, check_positions, register_for_auto_classes

# peft's default targets for this family, by role (`LoraConfig()`, `IA3Config()`, ... without `target_modules`;
# integrations.register_peft_target_modules): LoRA and its relatives adapt the projections, IA3 scales the keys,
# values and feed-forward output, LN tuning trains the norms.
LORA_TARGET_MODULES = ("query", "key", "value", "dense")
PEFT_TARGET_MODULES = {
    "projections": LORA_TARGET_MODULES,
    "ia3": ("key", "value", "output.dense"),
    "ia3_feedforward": ("output.dense",),
    "norms": ("LayerNorm",),
}
register_peft_target_modules(LmbBertConfig.model_type, PEFT_TARGET_MODULES)


def _is_tracing() -> bool:
    """True under torch.compile / torch.export, where data-dependent checks (a `.item()`) would break the graph."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class LmbBertEmbeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, seq_len = inputs_embeds.shape[:2]
        max_positions = self.config.max_position_embeddings
        check_positions(position_ids, None, seq_len, max_positions, "max_position_embeddings")
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=inputs_embeds.device).unsqueeze(0)  # (1, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros((batch, seq_len), dtype=torch.long, device=inputs_embeds.device)
        elif not _is_tracing() and token_type_ids.device.type == "cpu" and token_type_ids.numel() > 0:
            # Checked where reading the values back costs no device sync; on an accelerator a bad id fails in the
            # embedding as a device-side assert.
            low, high = (int(v) for v in torch.aminmax(token_type_ids))
            if low < 0 or high >= self.config.type_vocab_size:
                raise ValueError(
                    f"token_type_ids must be in [0, type_vocab_size={self.config.type_vocab_size}), got values in "
                    f"[{low}, {high}]."
                )
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))  # (B, T, C)


class LmbBertSelfAttention(MultiHeadAttention):
    """Bidirectional self-attention with separate query / key / value projections (the checkpoint's names)."""

    def __init__(self, config: LmbBertConfig, layer_idx: int) -> None:
        head_dim = config.hidden_size // config.num_attention_heads
        super().__init__(
            config,
            layer_idx,
            config.num_attention_heads,
            config.num_attention_heads,
            head_dim,
            config.attention_probs_dropout_prob,
            is_causal=False,
        )
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)


class LmbBertSelfOutput(nn.Module):
    """Post-LN residual: LayerNorm(x + dropout(dense(h)))."""

    def __init__(self, config: LmbBertConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(hidden_states)))


class LmbBertAttention(AttentionContainer):  # not `nn.Module`: see compat.AttentionContainer
    """`self` (the attention) and `output` (projection + residual + LayerNorm), as the checkpoints nest them."""

    def __init__(self, config: LmbBertConfig, layer_idx: int) -> None:
        super().__init__()
        self.self = LmbBertSelfAttention(config, layer_idx)
        self.output = LmbBertSelfOutput(config, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        attn_output, _ = self.self(hidden_states, attention_mask, **kwargs)
        return self.output(attn_output, hidden_states)


class LmbBertIntermediate(nn.Module):
    """The first half of the feed-forward: C -> intermediate_size with the activation."""

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class LmbBertLayer(GradientCheckpointingLayer):
    """x = LN(x + attn(x)), then x = LN(x + mlp(x)): the post-LayerNorm block of the original Transformer."""

    def __init__(self, config: LmbBertConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = LmbBertAttention(config, layer_idx)
        self.intermediate = LmbBertIntermediate(config)
        self.output = LmbBertSelfOutput(config, config.intermediate_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        attention_output = self.attention(hidden_states, attention_mask, **kwargs)
        return self.output(self.intermediate(attention_output), attention_output)


class LmbBertEncoder(nn.Module):
    """The stack of layers (its own module so that checkpoint keys read `encoder.layer.N`)."""

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([LmbBertLayer(config, layer_idx=i) for i in range(config.num_hidden_layers)])

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return hidden_states


class LmbBertPooler(nn.Module):
    """tanh(dense(h[CLS])): the sentence representation the NSP and classification heads read."""

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))  # (B, C)


class LmbBertPredictionHeadTransform(nn.Module):
    """dense -> activation -> LayerNorm, applied before the MLM decoder."""

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class LmbBertLMPredictionHead(nn.Module):
    """The MLM head: transform, then the decoder whose weight is tied to the word embeddings and whose bias is the
    output-only `bias` (`cls.predictions.bias` in the checkpoints; `decoder.bias` is tied to it)."""

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__()
        self.transform = LmbBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))  # (B, T, vocab)


class LmbBertHeads(nn.Module):
    """The `cls` module of the checkpoints: `predictions` (MLM) and/or `seq_relationship` (NSP, IsNext = 0)."""

    def __init__(self, config: LmbBertConfig, mlm: bool, nsp: bool) -> None:
        super().__init__()
        if mlm:
            self.predictions = LmbBertLMPredictionHead(config)
        if nsp:
            self.seq_relationship = nn.Linear(config.hidden_size, 2)


class LmbBertPreTrainedModel(LmbPreTrainedModel):
    config: LmbBertConfig
    config_class = LmbBertConfig
    peft_target_modules = PEFT_TARGET_MODULES  # a family built on this one inherits its peft defaults
    base_model_prefix = "bert"
    _input_embed_layer = "word_embeddings"  # under `embeddings`, for get/set_input_embeddings
    _no_split_modules = ["LmbBertEmbeddings", "LmbBertLayer"]
    _can_record_outputs = {"hidden_states": LmbBertLayer, "attentions": LmbBertSelfAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Linear / Embedding ~ N(0, initializer_range), biases and the padding row zero, LayerNorm 1 / 0.
        super()._init_weights(module)
        if isinstance(module, LmbBertLMPredictionHead):
            init.zeros_(module.bias)


_TIED_MLM_DECODER = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


class LmbBertModel(LmbBertPreTrainedModel):
    """The BERT encoder: embeddings, `num_hidden_layers` post-LN blocks, and (unless `add_pooling_layer=False`) the
    pooler. Returns `last_hidden_state` (B, T, C) and `pooler_output` (B, C)."""

    # Loaded from a pretraining checkpoint (embeddings for retrieval, serving): its heads are not part of the encoder.
    _keys_to_ignore_on_load_unexpected = [r"^cls\."]

    def __init__(self, config: LmbBertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = LmbBertEmbeddings(config)
        self.encoder = LmbBertEncoder(config)
        self.pooler = LmbBertPooler(config) if add_pooling_layer else None
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """`attention_mask`: (B, T) with 1 for real tokens and 0 for padding (or a prepared 4D mask);
        `token_type_ids`: (B, T) segment ids in [0, type_vocab_size), 0 by default."""
        check_model_inputs(input_ids, inputs_embeds)

        hidden_states = self.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        # Padding mask in the form the attention kernel wants (additive for eager, boolean or None for sdpa, ...).
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        hidden_states = self.encoder(hidden_states, attention_mask, position_ids=position_ids, **kwargs)
        pooled_output = self.pooler(hidden_states) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled_output)


class LmbBertHead(EncoderHead, LmbBertPreTrainedModel):
    """A task head over `LmbBertModel` (with its pooler), built under `bert`; `encode` runs it the same way for every
    head, and heads whose targets are `labels` share `EncoderHead.forward`."""

    base_model_class = LmbBertModel


class LmbBertTokenHead(LmbBertHead):
    """A head that reads every token's state, so the encoder is built without the pooler (as in the checkpoints)."""

    base_model_kwargs = {"add_pooling_layer": False}


def _classifier_dropout(config: LmbBertConfig) -> nn.Dropout:
    """Dropout before a classifier: `classifier_dropout`, or `hidden_dropout_prob` where that is not set."""
    return nn.Dropout(config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob)


def _per_sequence_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy with one label per sequence (next sentence, multiple choice): Trainer's `num_items_in_batch`
    counts those sequences, so sum ÷ it is exact under gradient accumulation."""
    return fixed_cross_entropy(logits.float(), labels.view(-1).to(logits.device), num_items_in_batch=num_items_in_batch)


@dataclass
class LmbBertForPreTrainingOutput(ModelOutput):
    """Output of `LmbBertForPreTraining`.

    loss: MLM loss + NSP loss when both `labels` and `next_sentence_label` are given.
    prediction_logits: (B, T, vocab) MLM scores. seq_relationship_logits: (B, 2) NSP scores (0 = IsNext).
    mlm_loss / nsp_loss: the two terms, for logging.
    """

    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None


class _LmbBertMLMMixin:
    """Output-embedding accessors and the loss shared by the two classes with an MLM decoder."""

    # transformers' ForMaskedLMLoss on a leaner cross-entropy that skips the unmasked positions (losses.py);
    # `model.loss_function = f` still overrides it.
    loss_function = staticmethod(masked_lm_loss)

    def mlm_logits_and_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor | None, **kwargs):
        """(logits, loss) of the MLM head. In training mode with `labels` (and the default `loss_function`) the loss
        comes from the hidden states chunk by chunk, the transform and decoder running on the labelled rows only
        (`losses.masked_lm_head_loss`), and the logits are None; otherwise as always."""
        if trains_without_logits(self, labels, masked_lm_loss):
            predictions = self.cls.predictions
            loss = masked_lm_head_loss(hidden_states, predictions.decoder, labels, self.config.vocab_size,
                                       transform=predictions.transform, **kwargs)
            return None, loss
        logits = self.cls.predictions(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return logits, loss

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias


def _pretraining_nsp_loss(
    logits: torch.Tensor, labels: torch.Tensor, mlm_labels: torch.Tensor | None, num_items_in_batch=None
) -> torch.Tensor:
    """Mean cross-entropy of the NSP head inside the pretraining loss. Under gradient accumulation Trainer passes
    `num_items_in_batch` — the masked tokens of the whole accumulated batch, counted from `labels` — and sums the
    micro-batch losses without averaging them; weighting each micro-batch's mean by its share of those items keeps the
    NSP term an average instead of a sum."""
    loss = fixed_cross_entropy(logits.view(-1, 2).float(), labels.view(-1).to(logits.device))
    if num_items_in_batch is not None and mlm_labels is not None:
        loss = loss * (mlm_labels != -100).sum().to(loss.device) / num_items_in_batch
    return loss


class LmbBertForPreTraining(_LmbBertMLMMixin, LmbBertHead):
    """BERT with both pretraining heads: masked LM (tied decoder) and next-sentence prediction on the pooled [CLS].

    `labels` (B, T): the original ids at masked positions, -100 elsewhere. `next_sentence_label` (B,): 0 if segment B
    follows A in the document, 1 if it is a random segment. The loss is MLM loss + NSP loss, computed when both are
    given.

    Under Trainer's gradient accumulation the MLM term is exact (sum ÷ the masked tokens of the whole accumulated
    batch, which Trainer counts from `labels`). The NSP term averages over sequences, which Trainer does not count:
    each micro-batch's NSP mean is weighted by its share m_i / M of the masked tokens instead of its share b_i / B of
    the sequences, so the accumulated NSP term differs from the whole-batch one by exactly Σ_i (m_i/M − b_i/B)·NSP_i
    — zero when masked tokens are spread evenly over the micro-batches (fixed-length packed blocks with 15 % masking
    come close). Without accumulation the loss is exactly BERT's (and transformers') mean MLM + mean NSP.
    """

    _tied_weights_keys = _TIED_MLM_DECODER

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__(config)
        self.build_base_model(config)
        self.cls = LmbBertHeads(config, mlm=True, nsp=True)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        next_sentence_label: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LmbBertForPreTrainingOutput:
        outputs = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs)
        prediction_logits, mlm_loss = self.mlm_logits_and_loss(outputs.last_hidden_state, labels, **kwargs)
        seq_relationship_logits = self.cls.seq_relationship(outputs.pooler_output)

        loss = nsp_loss = None
        if next_sentence_label is not None:
            nsp_loss = _pretraining_nsp_loss(
                seq_relationship_logits, next_sentence_label, labels, kwargs.get("num_items_in_batch")
            )
        if mlm_loss is not None and nsp_loss is not None:
            loss = mlm_loss + nsp_loss

        return LmbBertForPreTrainingOutput(
            loss=loss,
            prediction_logits=prediction_logits,
            seq_relationship_logits=seq_relationship_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            mlm_loss=mlm_loss,
            nsp_loss=nsp_loss,
        )


class LmbBertForMaskedLM(_LmbBertMLMMixin, LmbBertTokenHead):
    """BERT with the masked-LM head (decoder tied to the word embeddings); `labels` -100 are ignored."""

    # Loaded from a pretraining checkpoint (the usual way): its pooler and NSP head are not used here.
    _keys_to_ignore_on_load_unexpected = [r"^bert\.pooler\.", r"^cls\.seq_relationship\."]

    _tied_weights_keys = _TIED_MLM_DECODER
    output_class = MaskedLMOutput

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__(config)
        self.build_base_model(config)
        self.cls = LmbBertHeads(config, mlm=True, nsp=False)
        self.post_init()

    def logits_and_loss(self, outputs, labels, **kwargs):
        return self.mlm_logits_and_loss(outputs.last_hidden_state, labels, **kwargs)


class LmbBertForNextSentencePrediction(LmbBertHead):
    """BERT with the next-sentence head on the pooled [CLS]; `labels` (B,): 0 = IsNext, 1 = random segment."""

    # Loaded from a pretraining checkpoint: its MLM head is not used here.
    _keys_to_ignore_on_load_unexpected = [r"^cls\.predictions\."]

    output_class = NextSentencePredictorOutput

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__(config)
        self.build_base_model(config)
        self.cls = LmbBertHeads(config, mlm=False, nsp=True)
        self.post_init()

    def logits_and_loss(self, outputs, labels, **kwargs):
        logits = self.cls.seq_relationship(outputs.pooler_output)  # (B, 2)
        loss = _per_sequence_loss(logits, labels, kwargs.get("num_items_in_batch")) if labels is not None else None
        return logits, loss


class LmbBertForSequenceClassification(LmbBertHead):
    """BERT with a linear classifier (or regressor, `num_labels=1`) on the pooled [CLS]."""

    # Loaded from a pretraining checkpoint: its MLM and NSP heads are not used here.
    _keys_to_ignore_on_load_unexpected = [r"^cls\."]

    output_class = SequenceClassifierOutput

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.build_base_model(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def logits_and_loss(self, outputs, labels, **kwargs):
        logits = self.classifier(self.dropout(outputs.pooler_output))  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(logits, labels, self.config, kwargs.get("num_items_in_batch"))
        return logits, loss


class LmbBertForTokenClassification(LmbBertTokenHead):
    """BERT with a per-token linear classifier (NER, POS tagging); `labels` -100 are ignored."""

    # Loaded from a pretraining checkpoint: its pooler and both heads are not used here.
    _keys_to_ignore_on_load_unexpected = [r"^bert\.pooler\.", r"^cls\."]

    output_class = TokenClassifierOutput

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.build_base_model(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def logits_and_loss(self, outputs, labels, **kwargs):
        logits = self.classifier(self.dropout(outputs.last_hidden_state))  # (B, T, num_labels)
        loss = self.loss_function(logits, labels, self.config, **kwargs) if labels is not None else None
        return logits, loss


class LmbBertForQuestionAnswering(LmbBertTokenHead):
    """BERT with a span head (SQuAD): start and end logits per token; the loss averages the two cross-entropies."""

    # Loaded from a pretraining checkpoint: its pooler and both heads are not used here.
    _keys_to_ignore_on_load_unexpected = [r"^bert\.pooler\.", r"^cls\."]

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__(config)
        self.build_base_model(config)
        # Two outputs whatever num_labels says: a span has a start and an end.
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QuestionAnsweringModelOutput:
        outputs = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs)
        logits = self.qa_outputs(outputs.last_hidden_state)  # (B, T, 2)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions, **kwargs)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class LmbBertForMultipleChoice(LmbBertHead):
    """BERT scoring each of `num_choices` candidate sequences (SWAG): inputs (B, num_choices, T) -> logits
    (B, num_choices), one score per choice from the pooled [CLS]."""

    # Loaded from a pretraining checkpoint: its MLM and NSP heads are not used here.
    _keys_to_ignore_on_load_unexpected = [r"^cls\."]

    def __init__(self, config: LmbBertConfig) -> None:
        super().__init__(config)
        self.build_base_model(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

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
    ) -> MultipleChoiceModelOutput:
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None or reference.dim() < 3:
            raise ValueError("LmbBertForMultipleChoice expects inputs of shape (batch, num_choices, sequence).")
        num_choices = reference.shape[1]

        def flat(t: torch.Tensor | None, dims: int = 2) -> torch.Tensor | None:  # (B, N, T, ...) -> (B·N, T, ...)
            return t.reshape(-1, *t.shape[-(dims - 1):]) if t is not None else None

        outputs = self.encode(
            flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids), flat(inputs_embeds, 3),
            **kwargs,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output)).view(-1, num_choices)  # (B, N)
        loss = None
        if labels is not None:
            loss = _per_sequence_loss(logits, labels, kwargs.get("num_items_in_batch"))
        return MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                         attentions=outputs.attentions)


# How this family exports to transformers' own classes (`lmblocks.export`): the class each lmblocks class becomes, and
# config values a class needs there (transformers sizes its QA head by `num_labels`; lmblocks' has two outputs).
TRANSFORMERS_EXPORT = {
    "classes": {
        LmbBertModel: "BertModel",
        LmbBertForPreTraining: "BertForPreTraining",
        LmbBertForMaskedLM: "BertForMaskedLM",
        LmbBertForNextSentencePrediction: "BertForNextSentencePrediction",
        LmbBertForSequenceClassification: "BertForSequenceClassification",
        LmbBertForTokenClassification: "BertForTokenClassification",
        LmbBertForQuestionAnswering: "BertForQuestionAnswering",
        LmbBertForMultipleChoice: "BertForMultipleChoice",
    },
    "config_for_class": {LmbBertForQuestionAnswering: {"num_labels": 2}},
}

# Every Auto class the family answers to: registered here for remote code (`auto_map`), and by `lmblocks.families`
# with this process's Auto classes.
AUTO_CLASSES = {
    "AutoModel": LmbBertModel,
    "AutoModelForPreTraining": LmbBertForPreTraining,
    "AutoModelForMaskedLM": LmbBertForMaskedLM,
    "AutoModelForNextSentencePrediction": LmbBertForNextSentencePrediction,
    "AutoModelForSequenceClassification": LmbBertForSequenceClassification,
    "AutoModelForTokenClassification": LmbBertForTokenClassification,
    "AutoModelForQuestionAnswering": LmbBertForQuestionAnswering,
    "AutoModelForMultipleChoice": LmbBertForMultipleChoice,
}
register_for_auto_classes(LmbBertConfig, AUTO_CLASSES)

__all__ = [
    "AUTO_CLASSES",
    "LORA_TARGET_MODULES",
    "TRANSFORMERS_EXPORT",
    "PEFT_TARGET_MODULES",
    "LmbBertPreTrainedModel",
    "LmbBertModel",
    "LmbBertForPreTrainingOutput",
    "LmbBertForPreTraining",
    "LmbBertForMaskedLM",
    "LmbBertForNextSentencePrediction",
    "LmbBertForSequenceClassification",
    "LmbBertForTokenClassification",
    "LmbBertForQuestionAnswering",
    "LmbBertForMultipleChoice",
]
