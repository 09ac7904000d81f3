"""Fused ops: the shared contract (config, checks, autograd) and one module per backend."""
