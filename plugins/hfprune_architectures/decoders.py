"""Decoders: GPT-2, the Llama family (Llama, Mistral, Qwen2, Gemma 3) and Phi-3's fused projections."""

from __future__ import annotations

import copy

from hfprune.architecture import ArchitectureAdapter, Member, Unit, features, layer

from .blocks import gated_neuron_unit, linears, neuron_unit, stack


class GPT2(ArchitectureAdapter):
    """GPT-2: fused attn.c_attn (Q, K, V side by side) + attn.c_proj; mlp.c_fc + mlp.c_proj, all Conv1D."""

    name = "gpt2"

    def attention(self, module):
        fused, output = layer(module, "c_attn"), layer(module, "c_proj")
        if (
            fused is None
            or output is None
            or not hasattr(module, "split_size")
            or getattr(module, "is_cross_attention", False)
        ):
            return None
        size, width = module.head_dim, module.split_size
        members = tuple(Member(fused, "out", offset, size) for offset in (0, width, 2 * width)) + (
            Member(output, "in", 0, size),
        )
        return Unit("head", module, width // size, members, self)

    def feed_forward(self, module):
        up, down = layer(module, "c_fc"), layer(module, "c_proj")
        if up is None or down is None or not hasattr(module, "act"):
            return None
        return neuron_unit(self, module, up, down, module.act)

    def layer_stack(self, module):
        return stack(module, "h", "attn", "mlp")

    def resize(self, unit, kept_groups):
        if unit.kind == "head":
            unit.module.num_heads = kept_groups
            unit.module.split_size = kept_groups * unit.module.head_dim

    def config_updates(self, config, kind, unit, kept_groups):
        # The head size is n_embd / n_head: fewer heads cannot be stated.
        return {"n_inner": kept_groups} if kind == "neuron" else None


class LlamaFamily(ArchitectureAdapter):
    """Llama, Mistral, Qwen2, Gemma 3: self_attn.{q,k,v,o}_proj with grouped-query attention; gated mlp.

    A group is one key/value head with the query heads that share it: removing a query
    head alone would leave key/value heads serving different numbers of query heads,
    which the architecture cannot express.
    """

    name = "llama"

    def attention(self, module):
        q, k, v, o = (layer(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if not linears(q, k, v, o) or not hasattr(module, "num_key_value_groups"):
            return None
        size, per_group = module.head_dim, module.num_key_value_groups
        members = (
            Member(q, "out", 0, size * per_group),
            Member(k, "out", 0, size),
            Member(v, "out", 0, size),
            Member(o, "in", 0, size * per_group),
        )
        return Unit("head", module, features(k, "out") // size, members, self, heads_per_group=per_group)

    def feed_forward(self, module):
        gate, up, down = (layer(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
        if not linears(gate, up, down) or not hasattr(module, "act_fn"):
            return None
        return gated_neuron_unit(
            self, module, Member(gate, "out", 0, 1), Member(up, "out", 0, 1), down, module.act_fn
        )

    def layer_stack(self, module):
        return stack(module, "layers", "self_attn", "mlp")

    def config_updates(self, config, kind, unit, kept_groups):
        if kind == "neuron":
            return {"intermediate_size": kept_groups}
        return {
            "num_attention_heads": kept_groups * unit.heads_per_group,
            "num_key_value_heads": kept_groups,
            "head_dim": unit.module.head_dim,
        }


class Phi3(LlamaFamily):
    """Phi-3: fused self_attn.qkv_proj (every query head, then the key heads, then the value heads) + o_proj;
    fused mlp.gate_up_proj (the gate half, then the up half) + down_proj.

    Its layer stack and config fields are the Llama family's.
    """

    name = "phi3"

    def attention(self, module):
        fused, o = layer(module, "qkv_proj"), layer(module, "o_proj")
        if not linears(fused, o) or not hasattr(module, "num_key_value_heads"):
            return None
        size, per_group, groups = module.head_dim, module.num_key_value_groups, module.num_key_value_heads
        queries = groups * per_group * size
        members = (
            Member(fused, "out", 0, size * per_group),
            Member(fused, "out", queries, size),
            Member(fused, "out", queries + groups * size, size),
            Member(o, "in", 0, size * per_group),
        )
        return Unit("head", module, groups, members, self, heads_per_group=per_group)

    def feed_forward(self, module):
        fused, down = layer(module, "gate_up_proj"), layer(module, "down_proj")
        if not linears(fused, down) or not hasattr(module, "activation_fn"):
            return None
        width = features(down, "in")
        gate, up = Member(fused, "out", 0, 1), Member(fused, "out", width, 1)
        return gated_neuron_unit(self, module, gate, up, down, module.activation_fn)

    def resize(self, unit, kept_groups):
        if unit.kind == "head":
            # Phi-3's attention splits qkv_proj at config.num_attention_heads, read from the config every
            # layer shares: a layer that keeps its own number of heads needs a config of its own. Being a
            # copy, it no longer follows the model's config: set the attention implementation before
            # compacting.
            attention = unit.module
            attention.num_key_value_heads = kept_groups
            attention.config = copy.copy(attention.config)
            attention.config.num_attention_heads = kept_groups * unit.heads_per_group
            attention.config.num_key_value_heads = kept_groups
