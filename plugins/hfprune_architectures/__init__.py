"""Built-in plugin: architecture adapters, one module per kind of model.

- ``encoders``: BERT family (BERT, RoBERTa, ELECTRA, MiniLM), DistilBERT, ALBERT;
- ``decoders``: GPT-2, Llama family (Llama, Mistral, Qwen2, Gemma 3), Phi-3;
- ``vision``: ViT;
- ``seq2seq``: BART, T5 (heads a stack at a time, neurons; not layers).

Each adapter recognizes blocks by their attribute names, not their classes, so every
model assembled from the same blocks is covered. Found through the ``architectures`` entry
point in the ``hfprune`` group, exactly as a third-party adapter package would be.
"""

from __future__ import annotations

from hfprune import hookimpl

from .decoders import GPT2, LlamaFamily, Phi3
from .encoders import Albert, BertFamily, DistilBert
from .seq2seq import T5, Bart
from .vision import ViT

__all__ = ["GPT2", "T5", "Albert", "Bart", "BertFamily", "DistilBert", "LlamaFamily", "Phi3", "ViT"]


@hookimpl
def hfprune_register_architectures(register):
    adapters = (BertFamily(), DistilBert(), Albert(), GPT2(), LlamaFamily(), Phi3(), ViT(), Bart(), T5())
    for adapter in adapters:
        register(adapter)
