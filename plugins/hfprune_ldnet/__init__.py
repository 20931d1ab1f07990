"""Built-in plugin: LD-Net's models (Liu et al., EMNLP 2018, arXiv 1804.07827) and the adapter that compacts
them.

- :mod:`hfprune_ldnet.dense_lstm`: the densely connected LSTM language model, forward and backward.
- :mod:`hfprune_ldnet.tagger`: the sequence tagger that reads the language model's gated layers.
- :mod:`hfprune_ldnet.words`: word vocabularies with an unknown-word token per word shape.

The layer-lasso strategy selects their layers (``stack: dense``) without knowing these
models: this plugin registers :class:`DenseLSTMAdapter`, through which hfprune finds their
layer stacks and deletes layers, exactly as a third-party architecture plugin would. The
models are imported only when a module is asked about, so loading the plugin stays light;
importing :mod:`hfprune_ldnet.dense_lstm` or :mod:`hfprune_ldnet.tagger` registers them with
transformers' Auto classes.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from hfprune import hookimpl
from hfprune.architecture import ArchitectureAdapter

MODELS = "hfprune_ldnet.dense_lstm"


class DenseLSTMAdapter(ArchitectureAdapter):
    """LD-Net's densely connected LSTM stacks: each stack's ``layers``; deleting a layer removes its columns
    downstream."""

    name = "ldnet-dense-lstm"

    def layer_stack(self, module: nn.Module) -> nn.ModuleList | None:
        models = sys.modules.get(MODELS)  # a model of this family exists only once its module was imported
        return module.layers if models is not None and isinstance(module, models.DenseLSTMStack) else None

    def delete_layers(self, model: nn.Module, stacks: dict[str, torch.Tensor]) -> list[int] | None:
        return model.delete_stack_layers(stacks)


@hookimpl
def hfprune_register_architectures(register):
    register(DenseLSTMAdapter())
