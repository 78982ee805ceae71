"""Parameter tensor shapes of real models' decoder layers (weights and norms), for the benchmarks."""

LAYER_SHAPES = {
    # SmolLM2-135M (hidden 576, 9 heads / 3 KV heads of 64, MLP 1536): small enough for a 2-core CPU.
    "smollm2-layer": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536),
                      (576,), (576,)],
    # Llama-2-7B (hidden 4096, MLP 11008): 202M elements per layer.
    "llama7b-layer": [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008), (4096,), (4096,)],
    # Llama-3-8B (hidden 4096, 8 KV heads of 128, MLP 14336).
    "llama3-8b-layer": [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                        (4096, 14336), (4096,), (4096,)],
    # OPT-13B (hidden 5120, MLP 20480, biases).
    "opt13b-layer": [(5120, 5120), (5120,)] * 4 + [(20480, 5120), (20480,), (5120, 20480), (5120,), (5120,), (5120,),
                                                   (5120,), (5120,)],
    # Llama-3-70B (hidden 8192, 8 KV heads of 128, MLP 28672): 856M elements per layer.
    "llama70b-layer": [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192), (28672, 8192),
                       (8192, 28672), (8192,), (8192,)],
    # Three Llama-2-7B layers, 606M elements: 1.2 GB in bf16, 2.4 GB in float32, larger than a last-level cache
    # (480 MiB on this project's CPU machine), so every pass streams from memory.
    "llama7b-3layers": [(4096, 4096)] * 12 + [(11008, 4096), (11008, 4096), (4096, 11008), (4096,), (4096,)] * 3,
    # One flat buffer past 2^31 elements (64-bit indexing; 4.3 GB in bf16): a 70B model viewed flat is larger.
    "flat-2g": [((1 << 31) + 8,)],
    # CI smoke run.
    "tiny": [(64, 48), (48,), (7, 5)],
}


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """'<layer>' or '<layer>*N': N copies of the layer (llama7b-layer*2 is 404M elements)."""
    layer, _, copies = name.partition("*")
    return LAYER_SHAPES[layer] * int(copies or 1)


def shape_sets(spec: str) -> list[str]:
    """A comma-separated list of shape sets (ZOKERN_BENCH_SHAPES), each checked against LAYER_SHAPES."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for name in names:
        model_shapes(name)  # KeyError names an unknown set
    return names
