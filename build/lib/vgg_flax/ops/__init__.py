"""Kernels below the model: the CPU convolution and pooling paths and their routing."""
