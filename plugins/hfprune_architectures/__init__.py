"""Built-in plugin: architecture adapters for BERT-family, DistilBERT, GPT-2 and Llama-family models.

Each adapter recognizes blocks by their attribute names, not their classes, so every
model assembled from the same blocks is covered: RoBERTa, ELECTRA and MiniLM use BERT's;
Mistral and Qwen2 use Llama's. Found through the ``architectures`` entry point in the
``hfprune`` group, exactly as a third-party adapter package would be.
"""

from __future__ import annotations

from torch import nn

from hfprune import hookimpl
from hfprune.architecture import ArchitectureAdapter, Member, Unit, features, layer


def _linears(*modules) -> bool:
    return all(isinstance(m, nn.Linear) for m in modules)


def _head_unit(adapter: ArchitectureAdapter, module, q, k, v, output, size: int) -> Unit:
    """Multi-head attention with separate Q, K, V projections, each head ``size`` wide."""
    members = (
        Member(q, "out", 0, size),
        Member(k, "out", 0, size),
        Member(v, "out", 0, size),
        Member(output, "in", 0, size),
    )
    return Unit("head", module, features(q, "out") // size, members, adapter)


def _neuron_unit(adapter: ArchitectureAdapter, module, up, down, activation) -> Unit:
    """An ungated FFN: ``down(activation(up(x)))``."""
    return Unit(
        "neuron",
        module,
        features(up, "out"),
        (Member(up, "out", 0, 1), Member(down, "in", 0, 1)),
        adapter,
        activation=activation,
    )


def _stack(module, attribute: str, *block_parts: str) -> nn.ModuleList | None:
    """``module.<attribute>`` if it is a non-empty ModuleList of blocks that each have ``block_parts``."""
    stack = getattr(module, attribute, None)
    if (
        isinstance(stack, nn.ModuleList)
        and len(stack)
        and all(hasattr(b, p) for b in stack for p in block_parts)
    ):
        return stack
    return None


class BertFamily(ArchitectureAdapter):
    """BERT, RoBERTa, ELECTRA, MiniLM: attention.self.{query,key,value} + attention.output.dense; intermediate
    + output."""

    name = "bert"

    def attention(self, module):
        inner, output = getattr(module, "self", None), layer(getattr(module, "output", None), "dense")
        if inner is None or not hasattr(inner, "attention_head_size"):
            return None
        q, k, v = (layer(inner, n) for n in ("query", "key", "value"))
        if not _linears(q, k, v, output):
            return None
        return _head_unit(self, module, q, k, v, output, inner.attention_head_size)

    def feed_forward(self, module):
        intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
        up, down = layer(intermediate, "dense"), layer(output, "dense")
        if not _linears(up, down) or not hasattr(intermediate, "intermediate_act_fn"):
            return None
        return _neuron_unit(self, module, up, down, intermediate.intermediate_act_fn)

    def layer_stack(self, module):
        return _stack(module, "layer", "attention", "intermediate")

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
        q, k, v, out = (layer(module, n) for n in ("q_lin", "k_lin", "v_lin", "out_lin"))
        if not _linears(q, k, v, out) or not hasattr(module, "n_heads"):
            return None
        return _head_unit(self, module, q, k, v, out, module.attention_head_size)

    def feed_forward(self, module):
        up, down = layer(module, "lin1"), layer(module, "lin2")
        if not _linears(up, down) or not hasattr(module, "activation"):
            return None
        return _neuron_unit(self, module, up, down, module.activation)

    def layer_stack(self, module):
        return _stack(module, "layer", "attention", "ffn")

    def resize(self, unit, kept_groups):
        if unit.kind == "head":
            unit.module.n_heads = kept_groups

    def config_updates(self, config, kind, unit, kept_groups):
        return {"hidden_dim": kept_groups} if kind == "neuron" else None


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
        return _neuron_unit(self, module, up, down, module.act)

    def layer_stack(self, module):
        return _stack(module, "h", "attn", "mlp")

    def resize(self, unit, kept_groups):
        if unit.kind == "head":
            unit.module.num_heads = kept_groups
            unit.module.split_size = kept_groups * unit.module.head_dim

    def config_updates(self, config, kind, unit, kept_groups):
        # The head size is n_embd / n_head: fewer heads cannot be stated.
        return {"n_inner": kept_groups} if kind == "neuron" else None


class LlamaFamily(ArchitectureAdapter):
    """Llama, Mistral, Qwen2: self_attn.{q,k,v,o}_proj with grouped-query attention; gated mlp.

    A group is one key/value head with the query heads that share it: removing a query
    head alone would leave key/value heads serving different numbers of query heads,
    which the architecture cannot express.
    """

    name = "llama"

    def attention(self, module):
        q, k, v, o = (layer(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if not _linears(q, k, v, o) or not hasattr(module, "num_key_value_groups"):
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
        if not _linears(gate, up, down) or not hasattr(module, "act_fn"):
            return None
        members = (Member(gate, "out", 0, 1), Member(up, "out", 0, 1), Member(down, "in", 0, 1))
        return Unit(
            "neuron", module, features(up, "out"), members, self, activation=module.act_fn, gated=True
        )

    def layer_stack(self, module):
        return _stack(module, "layers", "self_attn", "mlp")

    def config_updates(self, config, kind, unit, kept_groups):
        if kind == "neuron":
            return {"intermediate_size": kept_groups}
        return {
            "num_attention_heads": kept_groups * unit.heads_per_group,
            "num_key_value_heads": kept_groups,
            "head_dim": unit.module.head_dim,
        }


@hookimpl
def hfprune_register_architectures(register):
    for adapter in (BertFamily(), DistilBert(), GPT2(), LlamaFamily()):
        register(adapter)
