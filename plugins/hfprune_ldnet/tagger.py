"""LD-Net's sequence labeler: a word-level BiLSTM tagger over a (frozen) dense LSTM language model.

Each word is read twice: by the language model, whose stacks' outputs (gated by
layer-lasso while it selects layers) are projected to ``projection_size``, and by word
embeddings learned on the task. The two go side by side into a bidirectional LSTM and a
softmax over the tags. Input ids come from the task's vocabulary, whose first
``vocab_size`` ids are the language model's; the buffer ``lm_ids`` maps every task id to
the id the language model reads (a task word it does not know becomes its shape's unknown
token, see :mod:`hfprune_ldnet.words`).

Importing this module registers the tagger with ``AutoModelForTokenClassification``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import AutoModelForTokenClassification
from transformers.modeling_outputs import TokenClassifierOutput

from hfprune_ldnet.dense_lstm import (
    DIRECTIONS,
    DenseLSTMConfig,
    DenseLSTMModel,
    DenseLSTMPreTrainedModel,
    Direction,
    fold_input_columns,
)
from hfprune_ldnet.words import SHAPES, WordVocabulary

UNKNOWN_ID = WordVocabulary([]).id(SHAPES[0])


class DenseLSTMForTokenClassification(DenseLSTMPreTrainedModel):
    """Tags every word: language-model features and task word embeddings, a BiLSTM, and a softmax."""

    def __init__(self, config: DenseLSTMConfig):
        super().__init__(config)
        self.dense_lstm = DenseLSTMModel(config)
        self.register_buffer("lm_ids", self.identity_lm_ids())
        self.word_embedding = nn.Embedding(
            config.task_vocab_size, config.word_embedding_size, padding_idx=config.pad_token_id
        )
        lm_width = sum(config.stack_output_size(d) for d in DIRECTIONS)
        self.projection = nn.Linear(lm_width, config.projection_size)
        self.dropout = nn.Dropout(config.tagger_dropout)
        self.encoder = nn.LSTM(
            config.word_embedding_size + config.projection_size,
            config.tagger_hidden_size,
            batch_first=True,
            bidirectional=True,
        )
        self.classifier = nn.Linear(2 * config.tagger_hidden_size, config.num_labels)
        self.post_init()

    def identity_lm_ids(self) -> torch.Tensor:
        """Task ids below ``vocab_size`` read as themselves, the others as the language model's ``<unk>``."""
        ids = torch.arange(self.config.task_vocab_size)
        return ids.masked_fill(ids >= self.config.vocab_size, UNKNOWN_ID)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:  # loaded from a language model, which has no map: start from the identity
            self.lm_ids.copy_(self.identity_lm_ids())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lm = self.dense_lstm(self.lm_ids[input_ids], attention_mask)
        features = torch.cat(
            [
                self.dropout(self.word_embedding(input_ids)),
                self.dropout(self.projection(lm.last_hidden_state)),
            ],
            dim=-1,
        )
        lengths = attention_mask.sum(1).cpu()
        packed = pack_padded_sequence(features, lengths, batch_first=True, enforce_sorted=False)
        encoded = pad_packed_sequence(
            self.encoder(packed)[0], batch_first=True, total_length=input_ids.shape[1]
        )[0]
        logits = self.classifier(self.dropout(encoded))
        loss = None
        if labels is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=lm.hidden_states if output_hidden_states else None
        )

    def fold_stack_output(self, scales: dict[Direction, torch.Tensor]) -> None:
        fold_input_columns(self.projection, "weight", torch.cat([scales[d] for d in DIRECTIONS]))


AutoModelForTokenClassification.register(DenseLSTMConfig, DenseLSTMForTokenClassification)
