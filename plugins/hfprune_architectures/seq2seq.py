"""Encoder-decoders: BART (and the models built from its blocks: mBART, Marian, Pegasus) and T5."""

from __future__ import annotations

from torch import nn

from hfprune.architecture import ArchitectureAdapter, Member, Unit, layer

from .blocks import gated_neuron_unit, head_unit, heads, linears, neurons


class Bart(ArchitectureAdapter):
    """BART: self_attn and encoder_attn (the decoder's cross-attention), each {q,k,v,out}_proj; fc1 + fc2 on
    the layer.

    A cross-attention head is pruned like a self-attention head: its query rows, its key
    and value rows (which read the encoder's output) and its output-projection columns.
    Layers are refused (:meth:`refusal`): the encoder and the decoder are two stacks, each
    sized by its own config field.
    """

    name = "bart"

    def attention(self, module):
        return heads(self, module, ("q_proj", "k_proj", "v_proj", "out_proj"), "head_dim", "num_heads")

    def feed_forward(self, module):
        if not hasattr(module, "self_attn"):
            return None  # fc1/fc2 in a module of their own are a vision encoder's MLP: vision.ViT
        return neurons(self, module, "fc1", "fc2", "activation_fn")

    def refusal(self, module, kind):
        if kind != "layer" or not (hasattr(module, "self_attn") and hasattr(module, "fc1")):
            return None
        return (
            "an encoder-decoder's encoder and decoder are two stacks sized by their own config fields "
            "(encoder_layers, decoder_layers): its layers are not deleted; prune its heads and neurons "
            "(group: head or neuron)"
        )

    def resize(self, unit, kept_groups):
        if unit.kind == "head":
            unit.module.num_heads = kept_groups
            if hasattr(unit.module, "embed_dim"):  # models built from these blocks that reshape with it
                unit.module.embed_dim = kept_groups * unit.module.head_dim

    def config_updates(self, config, kind, unit, kept_groups):
        # The head size is d_model / heads: fewer heads cannot be stated. One width for every FFN can.
        if kind == "neuron" and hasattr(config, "encoder_ffn_dim") and hasattr(config, "decoder_ffn_dim"):
            return {"encoder_ffn_dim": kept_groups, "decoder_ffn_dim": kept_groups}
        return None


class T5(ArchitectureAdapter):
    """T5, mT5, Flan-T5, UMT5: heads pruned a stack at a time; the FFN's DenseReluDense.{wi, wo}, or
    gated {wi_0, wi_1, wo}.

    The first layer of each stack computes a position bias per head (its
    ``relative_attention_bias`` table, one column per head) and every later layer adds it to
    its own heads; the decoder's first cross-attention makes a zero bias of its head count
    that the later ones add. So a head is pruned in every layer of its stack at once: one
    unit per stack's self-attention (the ``T5Stack``, ``encoder`` or ``decoder``) whose
    groups own each layer's q, k, v rows and o columns and the bias table's column (UMT5's
    layers each hold a table of their own: every one's column), and one
    for the decoder's cross-attention (the list of its layers, ``decoder.block``). Layers
    are refused: the first one holds that bias, and the encoder and decoder are two stacks.
    """

    name = "t5"

    def attention(self, module):
        attentions = _stack_attentions(module)
        if attentions is None:
            return None
        size = attentions[0].key_value_proj_dim
        members = []
        for attention in attentions:
            projections = [layer(attention, name) for name in ("q", "k", "v", "o")]
            if not linears(*projections):
                return None
            members += head_unit(self, attention, *projections, size).members
            bias = layer(attention, "relative_attention_bias")  # T5: the first layer's; UMT5: every layer's
            if bias is not None:
                members.append(Member(bias, "out", 0, 1))
        return Unit("head", module, attentions[0].n_heads, tuple(members), self)

    def feed_forward(self, module):
        ungated = neurons(self, module, "wi", "wo", "act")
        if ungated is not None:
            return ungated
        gate, up, down = (layer(module, n) for n in ("wi_0", "wi_1", "wo"))
        if not linears(gate, up, down) or not hasattr(module, "act"):
            return None
        return gated_neuron_unit(
            self, module, Member(gate, "out", 0, 1), Member(up, "out", 0, 1), down, module.act
        )

    def refusal(self, module, kind):
        if not hasattr(module, "relative_attention_num_buckets"):  # every T5 attention block has it
            return None
        if kind == "head":
            return (
                "T5's first layer computes a position bias for each head that every later layer adds to its "
                "own heads, so a head is pruned in every layer of its stack at once: target the stacks "
                "(T5Stack, or encoder and decoder) or the whole model"
            )
        if kind == "layer":
            return (
                "T5's first layer holds the position bias every layer uses, and its encoder and decoder are "
                "two stacks sized by their own config fields: its layers are not deleted; prune T5's heads "
                "and neurons (group: head or neuron)"
            )
        return None

    def resize(self, unit, kept_groups):
        if unit.kind == "head":
            for attention in _stack_attentions(unit.module):
                attention.n_heads = kept_groups
                attention.inner_dim = kept_groups * attention.key_value_proj_dim

    def config_updates(self, config, kind, unit, kept_groups):
        field = {"head": "num_heads", "neuron": "d_ff"}[kind]
        return {field: kept_groups} if hasattr(config, field) else None


def _stack_attentions(module: nn.Module) -> list[nn.Module] | None:
    """The T5 attention blocks whose heads are one unit in ``module``, or None: a stack's self-attention,
    ``block.N.layer[0].SelfAttention``; or, when ``module`` is the list of a decoder's blocks, their
    cross-attention, ``N.layer[1].EncDecAttention``."""
    if isinstance(module, nn.ModuleList):
        blocks, position, name = module, 1, "EncDecAttention"
    else:
        blocks, position, name = getattr(module, "block", None), 0, "SelfAttention"
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        return None
    found = [_sublayer_attention(block, position, name) for block in blocks]
    return found if all(hasattr(a, "relative_attention_num_buckets") for a in found) else None


def _sublayer_attention(block: nn.Module, position: int, name: str) -> nn.Module | None:
    """``block.layer[position].<name>`` (a T5 block's sub-layers), or None."""
    parts = getattr(block, "layer", None)
    if not isinstance(parts, nn.ModuleList) or len(parts) <= position:
        return None
    return getattr(parts[position], name, None)
