"""Frozen-encoder evaluation: features, linear and segmentation probes, retrieval, CIs, plots.

Modules are imported by what they hold (``radjepa.eval.linear_probe``, ``radjepa.eval.heads``
...); nothing is imported here so ``import radjepa.eval.heads`` stays cheap for the server.
"""
