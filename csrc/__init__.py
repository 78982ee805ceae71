"""C++ and CUDA sources, shipped inside the package as zokern._csrc; compiled on first use."""
