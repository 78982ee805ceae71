import os
import sys

# Triton runs on the CPU only in interpreter mode, which must be chosen before triton is imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import collections
import types

import pytest
import torch

from cuda_errors import pytest_runtest_logreport, pytest_runtest_makereport  # noqa: F401 (hooks)
from zokern import backends, library

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_sessionstart(session):
    """$ZOKERN_REQUIRE_BACKENDS (CI, scripts/gpu_check.sh): backends this machine must have, comma-separated. One
    that is missing stops the run with its reason, so that a failed build cannot pass as skipped tests."""
    for name in filter(None, os.environ.get("ZOKERN_REQUIRE_BACKENDS", "").split(",")):
        if name not in backends.BACKENDS:
            raise pytest.UsageError(f"ZOKERN_REQUIRE_BACKENDS: unknown backend {name!r}")
        # On a GPU machine the GPU is what counts (Triton runs on the CPU only under the interpreter).
        device = "cuda" if torch.cuda.is_available() and name in backends.SUPPORTED["cuda"] else "cpu"
        ok, why = backends.availability(name, device)
        if not ok:
            raise pytest.UsageError(f"ZOKERN_REQUIRE_BACKENDS: backend {name} is not available on {device}: {why}")


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


def backend_kernels(backend: str, device_type: str) -> types.SimpleNamespace:
    """One backend's kernels from the dispatch table, named by op without the in-place underscore
    (`backend_kernels("cpp", "cpu").perturb(params, streams, seed, scale, dist, chunk=64)`): a direct call, no
    checks, contiguous tensors only, as the ops' device implementations make them."""
    return types.SimpleNamespace(**{name.rstrip("_"): library.implementation(name, device_type, backend)
                                    for name in library.SCHEMAS})


def philox_words(seed: int, stream: int, domain: int, first_call: int, n: int, device="cpu",
                 backend: str = "") -> torch.Tensor:
    """The four words of Philox calls first_call … first_call + n − 1, one row per call (zokern::philox_words_)."""
    out = torch.empty((n, 4), dtype=torch.int64, device=device)
    torch.ops.zokern.philox_words_(out, seed, stream, int(domain), first_call, backend)
    return out


class Launches:
    """What the ops ran: `calls[(backend, op)]` counts calls into each dispatch-table entry, `kernels[name]` each
    launch of a Triton kernel, by the kernel's name."""

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()
        self.kernels: collections.Counter = collections.Counter()

    def clear(self) -> None:
        self.calls.clear()
        self.kernels.clear()


@pytest.fixture
def launches(monkeypatch) -> Launches:
    """A spy on the dispatch table (and on Triton's kernel launches, when triton is in use)."""
    seen = Launches()
    if any(backends.availability("triton", device)[0] for device in DEVICES):
        from triton.runtime.jit import KernelInterface

        for name in library.SCHEMAS:  # the Triton launchers join the table when first asked for
            library.implementation(name, "cpu", "triton")
        launch = KernelInterface.__getitem__

        def counted_launch(kernel, grid):
            run = launch(kernel, grid)

            def counted(*args, **kwargs):
                seen.kernels[kernel.fn.__name__] += 1
                return run(*args, **kwargs)
            return counted

        monkeypatch.setattr(KernelInterface, "__getitem__", counted_launch)
    for (name, device, backend), kernel in list(library.IMPLEMENTATIONS.items()):
        def counted_call(*args, _kernel=kernel, _key=(backend, name), **kwargs):
            seen.calls[_key] += 1
            return _kernel(*args, **kwargs)
        monkeypatch.setitem(library.IMPLEMENTATIONS, (name, device, backend), counted_call)
    return seen


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 ulps between a and b, measured at the larger magnitude of the two."""
    a, b = a.double(), b.double()
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(torch.finfo(torch.float32).tiny)
    ulp = torch.pow(2.0, torch.floor(torch.log2(scale)) - 23)
    return (a - b).abs() / ulp


# The tiny test runs' settings, which the fine-tuning tests were written for (not the CLI's default: bfloat16,
# LoRA, a decaying rate): float32 at a constant rate on all weights, small batches.
TINY_RUN = dict(dtype="float32", lr_schedule="constant", lora_rank=0, batch_size=4, eval_examples=4)


def tiny_run_config(**settings):
    """A FinetuneConfig of TINY_RUN's settings, then `settings`."""
    from zokern.finetune.config import FinetuneConfig

    return FinetuneConfig(**{**TINY_RUN, **settings})


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
