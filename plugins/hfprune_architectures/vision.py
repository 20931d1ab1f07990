"""Vision encoders: ViT (transformers 5.x module names)."""

from __future__ import annotations

from hfprune.architecture import ArchitectureAdapter

from .blocks import heads, neurons, stack


class ViT(ArchitectureAdapter):
    """ViT: layers.N.attention.{q,k,v,o}_proj, one group per head (no grouped key/value heads); mlp.fc1 +
    mlp.fc2."""

    name = "vit"

    def attention(self, module):
        if hasattr(module, "num_key_value_groups") or hasattr(module, "relative_position_bias"):
            return None  # a grouped-query decoder's (the Llama family's), or with per-head position tables
        return heads(
            self, module, ("q_proj", "k_proj", "v_proj", "o_proj"), "head_dim", "num_attention_heads"
        )

    def feed_forward(self, module):
        if hasattr(module, "self_attn"):
            return None  # fc1/fc2 on a layer beside its self_attn are an encoder-decoder's: seq2seq.Bart
        return neurons(self, module, "fc1", "fc2", "activation_fn")

    def layer_stack(self, module):
        return stack(module, "layers", "attention", "mlp")

    def resize(self, unit, kept_groups):
        if unit.kind == "head":
            unit.module.num_attention_heads = kept_groups

    def config_updates(self, config, kind, unit, kept_groups):
        # ViT's attention reads its head size from config.head_dim when the config has that field (ViTConfig
        # does not define it; compaction adds it), so fewer heads can be stated. A config without these
        # fields (a composite model's, which nests them in sub-configs) gets the layout.
        if kind == "neuron":
            return {"intermediate_size": kept_groups} if hasattr(config, "intermediate_size") else None
        if not hasattr(config, "num_attention_heads"):
            return None
        return {"num_attention_heads": kept_groups, "head_dim": unit.module.head_dim}
