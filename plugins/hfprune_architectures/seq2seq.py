"""Encoder-decoders: BART (and the models built from its blocks: mBART, Marian, Pegasus) and T5."""

from __future__ import annotations

from hfprune.architecture import ArchitectureAdapter, Member, layer

from .blocks import gated_neuron_unit, heads, linears, neurons


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
    """T5, mT5, Flan-T5: the FFN's DenseReluDense.{wi, wo}, or gated {wi_0, wi_1, wo}. Neurons only.

    Heads are refused: the first layer of each stack computes a position bias per head and
    every later layer adds it to its own heads, so a layer cannot lose a head the others keep.
    Layers are refused: the first layer holds that bias, and the encoder and decoder are two
    stacks.
    """

    name = "t5"

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
                "own heads, so no layer can lose a head the others keep; prune T5's neurons (group: neuron)"
            )
        if kind == "layer":
            return (
                "T5's first layer holds the position bias every layer uses, and its encoder and decoder are "
                "two stacks sized by their own config fields: its layers are not deleted; prune T5's neurons "
                "(group: neuron)"
            )
        return None

    def config_updates(self, config, kind, unit, kept_groups):
        return {"d_ff": kept_groups} if kind == "neuron" and hasattr(config, "d_ff") else None
