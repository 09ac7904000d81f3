"""Runnable examples: `python -m fused_resnet.examples.<name>`."""
