"""LD-Net's language model as a Hugging Face model: densely connected LSTM stacks, forward and backward.

Each direction is a stack of one-layer LSTMs in which layer ``i`` reads the concatenation of
the word embedding and the outputs of layers ``0 .. i-1``, and the stack's output is the
concatenation of the embedding and every layer's output (Liu et al., 2018, arXiv 1804.07827,
and the authors' ``LDRNN``). Because no layer's input depends on a single earlier layer
alone, any layer can be deleted: layer-lasso's ``stack: dense`` gates multiply a layer's
output wherever it is consumed, and compaction (through the plugin's architecture adapter,
:meth:`DenseLSTMPreTrainedModel.delete_stack_layers`) removes a deleted layer's columns from
every later layer and from the head's projection.

Layer-wise dropout is done here, not by a hook: while training, each layer's output is
replaced by zeros, with probability ``layer_dropout``, in the inputs of deeper layers, but it
still reaches the stack's output, so deeper layers learn not to depend on any one layer.

Importing this module registers ``DenseLSTMConfig`` (model type ``hfprune-dense-lstm``)
with ``AutoConfig``, ``AutoModel`` and ``AutoModelForPreTraining``; importing
:mod:`hfprune_ldnet.tagger` also with ``AutoModelForTokenClassification``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from hfprune.errors import CompactionError

MODEL_TYPE = "hfprune-dense-lstm"
DIRECTIONS = ("forward", "backward")
Direction = Literal["forward", "backward"]


class DenseLSTMConfig(PretrainedConfig):
    """Sizes of LD-Net's models: ``num_layers`` LSTM layers of ``hidden_size`` per direction, and the heads on
    them.

    ``num_backward_layers`` differs from ``num_layers`` only after compaction deleted
    different numbers of layers from the two directions (None: the same). The language
    model projects each direction's stack output to ``projection_size`` and predicts words
    with an adaptive softmax (``cutoffs``: the frequency bands of the vocabulary). The tagger
    (:class:`~hfprune_ldnet.tagger.DenseLSTMForTokenClassification`) reads words from a
    vocabulary of ``task_vocab_size`` whose first ``vocab_size`` ids are the language model's.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 10000,
        embedding_size: int = 300,
        hidden_size: int = 300,
        num_layers: int = 10,
        num_backward_layers: int | None = None,
        dropout: float = 0.5,
        layer_dropout: float = 0.5,
        projection_size: int | None = None,
        cutoffs: list[int] | None = None,
        task_vocab_size: int | None = None,
        word_embedding_size: int = 100,
        tagger_hidden_size: int = 100,
        tagger_dropout: float = 0.5,
        pad_token_id: int = 0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_backward_layers = num_backward_layers
        self.dropout = dropout
        self.layer_dropout = layer_dropout
        self.projection_size = projection_size or embedding_size
        self.cutoffs = list(cutoffs) if cutoffs else [min(2000, vocab_size // 2)]
        self.task_vocab_size = task_vocab_size or vocab_size
        if self.task_vocab_size < vocab_size:
            raise ValueError(
                f"task_vocab_size ({task_vocab_size}) must include the language model's {vocab_size} words"
            )
        self.word_embedding_size = word_embedding_size
        self.tagger_hidden_size = tagger_hidden_size
        self.tagger_dropout = tagger_dropout
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    def depth(self, direction: Direction) -> int:
        """Layers in the ``"forward"`` or ``"backward"`` stack."""
        if direction == "backward" and self.num_backward_layers is not None:
            return self.num_backward_layers
        return self.num_layers

    def stack_output_size(self, direction: Direction) -> int:
        """Width of one direction's output: the embedding and every layer's output."""
        return self.embedding_size + self.depth(direction) * self.hidden_size


class DenseLSTMLayer(nn.Module):
    """One layer of a dense stack: dropout on its input, then a one-layer LSTM; returns the LSTM's outputs
    only."""

    def __init__(self, input_size: int, hidden_size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.dropout(inputs))[0]


class DenseLSTMStack(nn.Module):
    """Densely connected layers over one direction of a sequence (batch, time, features)."""

    def __init__(self, config: DenseLSTMConfig, direction: Direction):
        super().__init__()
        self.layer_dropout = config.layer_dropout
        self.embedding_size = config.embedding_size
        self.hidden_size = config.hidden_size
        self.layers = nn.ModuleList(
            DenseLSTMLayer(config.embedding_size + i * config.hidden_size, config.hidden_size, config.dropout)
            for i in range(config.depth(direction))
        )

    def forward(self, embedded: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The stack's output (embedding and every layer's output, concatenated) and the layers' outputs."""
        deep = embedded
        outputs = []
        for layer in self.layers:
            output = layer(deep)  # a layer-lasso gate hook, if any, has already scaled it
            outputs.append(output)
            dropped = self.training and self.layer_dropout > 0 and torch.rand(()) < self.layer_dropout
            deep = torch.cat([deep, torch.zeros_like(output) if dropped else output], dim=-1)
        return torch.cat([embedded, *outputs], dim=-1), tuple(outputs)

    @torch.no_grad()
    def delete_layers(self, gates: torch.Tensor) -> torch.Tensor:
        """Delete the layers whose gate is 0; fold the others' gates into the deeper layers that read them.

        ``gates`` holds one factor per layer, the one its output was multiplied by wherever
        it was consumed. Returns the factor of every column of the stack's output as it was
        (0 where the column is gone), for the caller to fold into the weights reading it.
        """
        if gates.shape != (len(self.layers),) or not gates.any():
            raise CompactionError(
                f"a dense stack of {len(self.layers)} layers must keep one, got gates {gates.tolist()}"
            )
        scale = torch.cat(
            [torch.ones(self.embedding_size), gates.float().repeat_interleave(self.hidden_size)]
        )
        for index, layer in enumerate(self.layers):
            fold_input_columns(
                layer.lstm, "weight_ih_l0", scale[: self.embedding_size + index * self.hidden_size]
            )
        for index in reversed(range(len(self.layers))):
            if gates[index] == 0:
                del self.layers[index]
        return scale


def fold_input_columns(module: nn.Module, name: str, scale: torch.Tensor) -> None:
    """Drop the input columns of ``module.<name>`` whose factor is 0 and multiply the others by theirs."""
    weight = getattr(module, name)
    kept = scale.nonzero().flatten().to(weight.device)
    folded = weight.index_select(1, kept) * scale[kept.cpu()].to(weight)
    setattr(
        module, name, nn.Parameter(folded, requires_grad=weight.requires_grad)
    )  # nn.LSTM re-reads its weights
    if isinstance(module, nn.Linear):
        module.in_features = len(kept)
    else:
        module.input_size = len(kept)


def reverse_padded(sequences: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each right-padded sequence (batch, time, ...) reversed within its length; padding stays where it is."""
    steps = torch.arange(sequences.shape[1], device=sequences.device)
    source = lengths[:, None] - 1 - steps[None, :]
    source = torch.where(source >= 0, source, steps[None, :])
    index = source.view(*source.shape, *([1] * (sequences.dim() - 2))).expand_as(sequences)
    return sequences.gather(1, index)


class DenseLSTMPreTrainedModel(PreTrainedModel):
    config_class = DenseLSTMConfig
    base_model_prefix = "dense_lstm"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.uniform_(module.weight, -0.1, 0.1)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LSTM):
            # PyTorch's uniform init; a tagger loaded from a language model needs it for its own
            module.reset_parameters()

    def delete_stack_layers(self, stacks: dict[str, torch.Tensor]) -> list[int] | None:
        """Delete the layers ``stacks`` flags False (or gates at 0), by stack module name; the
        ``hidden_states`` left.

        Later layers lose the deleted layers' input columns, and so do the head's weights
        reading the stacks' outputs (:meth:`fold_stack_output`); gate values other than 1 are
        folded into those columns. Returns the indices of the ``hidden_states`` the smaller
        model still has, or None when no layer was deleted. Compaction calls it through the
        LD-Net plugin's architecture adapter (:class:`hfprune_ldnet.DenseLSTMAdapter`).
        """
        base = self.base_model
        if base is self:
            raise CompactionError(
                "a DenseLSTMModel's output is its stacks' output, which would lose the deleted layers' "
                "columns: compact "
                "the model with a head (DenseLSTMForLanguageModeling, DenseLSTMForTokenClassification)"
            )
        names = {f"{self.base_model_prefix}.{direction}_stack.layers": direction for direction in DIRECTIONS}
        unknown = sorted(set(stacks) - set(names))
        if unknown:
            raise CompactionError(f"{type(self).__name__} has no dense stack named {', '.join(unknown)}")
        gates = {direction: torch.ones(len(base.stack(direction).layers)) for direction in DIRECTIONS}
        gates.update({names[name]: keep.float().cpu() for name, keep in stacks.items()})
        self.fold_stack_output(
            {direction: base.stack(direction).delete_layers(gates[direction]) for direction in DIRECTIONS}
        )
        self.config.num_layers, self.config.num_backward_layers = (
            len(base.stack(d).layers) for d in DIRECTIONS
        )
        if all(g.all() for g in gates.values()):
            return None
        forward_depth = len(gates["forward"])
        return (
            gates["forward"].nonzero().flatten().tolist()
            + (forward_depth + gates["backward"].nonzero().flatten()).tolist()
        )

    def fold_stack_output(self, scales: dict[Direction, torch.Tensor]) -> None:
        """Fold each direction's output column factors (0: the column is gone) into the head's weights reading
        them."""
        raise NotImplementedError


class DenseLSTMModel(DenseLSTMPreTrainedModel):
    """Word embedding, a forward dense stack over the sequence and a backward one over it reversed.

    ``last_hidden_state`` is both directions' stack outputs side by side, aligned by
    position: the forward half at position t has read tokens 0..t, the backward half tokens
    t..end. ``hidden_states`` are the layers' outputs, forward stack first.
    """

    def __init__(self, config: DenseLSTMConfig):
        super().__init__(config)
        self.embedding = nn.Embedding(
            config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id
        )
        self.forward_stack = DenseLSTMStack(config, "forward")
        self.backward_stack = DenseLSTMStack(config, "backward")
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def stack(self, direction: Direction) -> DenseLSTMStack:
        return self.forward_stack if direction == "forward" else self.backward_stack

    def flops_per_token(self) -> int:
        """Floating-point operations per token of both stacks: twice their LSTMs' parameters.

        Each weight is one multiply-add per token (2 operations), and the two bias vectors of
        each LSTM are counted alike; the element-wise gate arithmetic (a few operations per
        hidden unit) and the embedding lookup are left out.
        """
        return sum(2 * sum(p.numel() for p in self.stack(d).parameters()) for d in DIRECTIONS)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutput:
        lengths = (
            attention_mask.sum(1)
            if attention_mask is not None
            else torch.full_like(input_ids[:, 0], input_ids.shape[1])
        )
        embedded = self.embedding(input_ids)
        forward_out, forward_layers = self.forward_stack(embedded)
        backward_out, backward_layers = self.backward_stack(reverse_padded(embedded, lengths))
        backward_out = reverse_padded(backward_out, lengths)
        backward_layers = tuple(reverse_padded(layer, lengths) for layer in backward_layers)
        return BaseModelOutput(
            last_hidden_state=torch.cat([forward_out, backward_out], dim=-1),
            hidden_states=forward_layers + backward_layers,
        )


@dataclass
class DenseLSTMLanguageModelOutput(ModelOutput):
    """Loss (the mean of the two directions' losses, also given apart), per-direction log-probabilities of
    every word
    (only when no labels are given), and the layers' outputs."""

    loss: torch.Tensor | None = None
    forward_loss: torch.Tensor | None = None
    backward_loss: torch.Tensor | None = None
    forward_log_probs: torch.Tensor | None = None
    backward_log_probs: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class DenseLSTMForLanguageModeling(DenseLSTMPreTrainedModel):
    """Both language models: the forward stack predicts the next word, the backward stack the previous one.

    Each direction projects its stack output to ``projection_size`` and predicts with an
    adaptive softmax (frequent words in a small head, rarer ones in smaller clusters), so
    the output layer does not dominate the cost. The loss is the mean of the two
    directions' cross-entropies over the words each can predict (padding and the word
    before the first or after the last are left out). Full log-probabilities (batch, time,
    vocabulary) are returned only when no labels are given, to keep training cheap.
    """

    def __init__(self, config: DenseLSTMConfig):
        super().__init__(config)
        self.dense_lstm = DenseLSTMModel(config)
        self.dropout = nn.Dropout(config.dropout)
        for (
            direction
        ) in DIRECTIONS:  # forward_projection, forward_softmax, backward_projection, backward_softmax
            setattr(
                self,
                f"{direction}_projection",
                nn.Linear(config.stack_output_size(direction), config.projection_size),
            )
            setattr(
                self,
                f"{direction}_softmax",
                nn.AdaptiveLogSoftmaxWithLoss(
                    config.projection_size, config.vocab_size, config.cutoffs, div_value=4.0
                ),
            )
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> DenseLSTMLanguageModelOutput:
        output = self.dense_lstm(input_ids, attention_mask)
        halves = output.last_hidden_state.split(
            [self.config.stack_output_size(d) for d in DIRECTIONS], dim=-1
        )
        features = {d: self.projection(d)(self.dropout(half)) for d, half in zip(DIRECTIONS, halves)}
        hidden_states = output.hidden_states if output_hidden_states else None
        if labels is None:
            log_probs = [
                self.softmax(d).log_prob(features[d].flatten(0, 1)).view(*features[d].shape[:2], -1)
                for d in DIRECTIONS
            ]
            return DenseLSTMLanguageModelOutput(None, None, None, *log_probs, hidden_states)
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        predicted = {
            "forward": (features["forward"][:, :-1], labels[:, 1:]),
            "backward": (features["backward"][:, 1:], labels[:, :-1]),
        }
        losses = []
        for direction, (inputs, targets) in predicted.items():
            real = targets != -100
            losses.append(self.softmax(direction)(inputs[real], targets[real]).loss)
        return DenseLSTMLanguageModelOutput((losses[0] + losses[1]) / 2, *losses, hidden_states=hidden_states)

    def projection(self, direction: Direction) -> nn.Linear:
        return getattr(self, f"{direction}_projection")

    def softmax(self, direction: Direction) -> nn.AdaptiveLogSoftmaxWithLoss:
        return getattr(self, f"{direction}_softmax")

    def fold_stack_output(self, scales: dict[Direction, torch.Tensor]) -> None:
        for direction, scale in scales.items():
            fold_input_columns(self.projection(direction), "weight", scale)


AutoConfig.register(MODEL_TYPE, DenseLSTMConfig)
AutoModel.register(DenseLSTMConfig, DenseLSTMModel)
AutoModelForPreTraining.register(DenseLSTMConfig, DenseLSTMForLanguageModeling)
