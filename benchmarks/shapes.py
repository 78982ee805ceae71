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
    # CI smoke run.
    "tiny": [(64, 48), (48,), (7, 5)],
}


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """'<layer>' or '<layer>*N': N copies of the layer (llama7b-layer*2 is 404M elements)."""
    layer, _, copies = name.partition("*")
    return LAYER_SHAPES[layer] * int(copies or 1)
