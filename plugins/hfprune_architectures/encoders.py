"""Encoders: the BERT family (BERT, RoBERTa, ELECTRA, MiniLM), DistilBERT and ALBERT."""

from __future__ import annotations

from hfprune.architecture import ArchitectureAdapter, layer

from .blocks import head_unit, heads, linears, neuron_unit, neurons, stack


class BertFamily(ArchitectureAdapter):
    """BERT, RoBERTa, ELECTRA, MiniLM: attention.self.{query,key,value} + attention.output.dense; intermediate
    + output."""

    name = "bert"

    def attention(self, module):
        inner, output = getattr(module, "self", None), layer(getattr(module, "output", None), "dense")
        if inner is None or not hasattr(inner, "attention_head_size"):
            return None
        q, k, v = (layer(inner, n) for n in ("query", "key", "value"))
        if not linears(q, k, v, output):
            return None
        return head_unit(self, module, q, k, v, output, inner.attention_head_size)

    def feed_forward(self, module):
        intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
        up, down = layer(intermediate, "dense"), layer(output, "dense")
        if not linears(up, down) or not hasattr(intermediate, "intermediate_act_fn"):
            return None
        return neuron_unit(self, module, up, down, intermediate.intermediate_act_fn)

    def layer_stack(self, module):
        return stack(module, "layer", "attention", "intermediate")

    def resize(self, unit, kept_groups):
        if unit.kind == "head":
            inner = unit.module.self
            inner.num_attention_heads = kept_groups
            inner.all_head_size = kept_groups * inner.attention_head_size

    def config_updates(self, config, kind, unit, kept_groups):
        # BERT's config has no head size of its own (it is hidden_size / heads): fewer heads cannot be stated.
        return {"intermediate_size": kept_groups} if kind == "neuron" else None


class DistilBert(ArchitectureAdapter):
    """DistilBERT: attention.{q,k,v,out}_lin; ffn.lin1 + ffn.lin2."""

    name = "distilbert"

    def attention(self, module):
        return heads(self, module, ("q_lin", "k_lin", "v_lin", "out_lin"), "attention_head_size", "n_heads")

    def feed_forward(self, module):
        return neurons(self, module, "lin1", "lin2", "activation")

    def layer_stack(self, module):
        return stack(module, "layer", "attention", "ffn")

    def resize(self, unit, kept_groups):
        if unit.kind == "head":
            unit.module.n_heads = kept_groups

    def config_updates(self, config, kind, unit, kept_groups):
        return {"hidden_dim": kept_groups} if kind == "neuron" else None


class Albert(BertFamily):
    """ALBERT: one layer, shared by every position; attention.{query,key,value,dense}; ffn + ffn_output.

    The shared layer is one module, so its heads and neurons are found once and pruning
    them prunes every position alike, as the architecture requires. Its positions cannot
    be deleted one at a time: :meth:`refusal` says so. Its config states sizes as BERT's does.
    """

    name = "albert"

    def attention(self, module):
        return heads(self, module, ("query", "key", "value", "dense"), "attention_head_size")

    def feed_forward(self, module):
        return neurons(self, module, "ffn", "ffn_output", "activation")

    def refusal(self, module, kind):
        shared = hasattr(module, "albert_layer_groups") or hasattr(module, "ffn_output")  # encoder, or layer
        if kind != "layer" or not shared:
            return None
        return (
            "ALBERT runs every position through one shared layer: a position cannot be deleted without "
            "deleting every position that shares its layer. Prune the shared layer's heads and neurons "
            "instead (block-lasso, importance or mask-search with group: head or neuron)"
        )

    def resize(self, unit, kept_groups):
        if unit.kind == "head":
            unit.module.num_attention_heads = kept_groups
            unit.module.all_head_size = kept_groups * unit.module.attention_head_size
