import os
import sys

# Triton runs on the CPU only in interpreter mode, which must be chosen before triton is imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from zokern import backends

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def available_pairs(include_reference: bool = True) -> list:
    """(backend, device) pairs as pytest params; unavailable ones are skipped with the backend's reason."""
    pairs = []
    for device, names in backends.SUPPORTED.items():
        for name in names:
            if name == "reference" and not include_reference:
                continue
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if device == "cuda" and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="no CUDA device"))
            else:
                ok, why = backends.availability(name, device)
                if not ok:
                    marks.append(pytest.mark.skip(reason=f"{name} unavailable on {device}: {why}"))
            pairs.append(pytest.param(name, device, marks=marks, id=f"{name}-{device}"))
    return pairs


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 ulps between a and b, measured at the larger magnitude of the two."""
    a, b = a.double(), b.double()
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(torch.finfo(torch.float32).tiny)
    ulp = torch.pow(2.0, torch.floor(torch.log2(scale)) - 23)
    return (a - b).abs() / ulp


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 1-layer Llama with random weights and SmolLM2's tokenizer, saved as a local model directory."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from zokern.finetune.model import embedded_model_path

    path = embedded_model_path()
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
