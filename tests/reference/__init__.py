"""Plain-PyTorch transcriptions of each method's step as ALGORITHMS.md describes its authors' code,
driven by zokern's stream (z for a tensor named `name` is stream crc32(name) under the step seed).
They are unfused, unoptimised and written from the spec: the oracle the optimizers are checked against."""
