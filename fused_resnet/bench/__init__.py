"""Benchmark and parity report: `python -m fused_resnet.bench --help`.

profiles (what runs) → contenders (baselines and fused models) → runner/layers/maxbatch (measure) → timing,
roofline (ceilings) → report/plots (CSV, JSON, markdown, PNG).
"""
