"""Sparse prefill (MInference vertical-slash inside DCA): pattern config, online estimation,
index conversion, PyTorch references and offline calibration.

Only the config is imported here (the CLI reads it before torch-heavy modules load):

    config.py     SparseConfig, the MInference pattern file, where a config comes from
    estimate.py   per-segment, per-part index estimation from the last queries
    convert.py    selected diagonals and columns -> per-block tiles and columns
    reference.py  the PyTorch sparse attention (CPU path) and float64 ground truths
    calibrate.py  raise the budgets of heads with low attention recall (`longctx calibrate`)

The Triton kernel is longctx/ops/triton/vs_sparse.py; the engine backend
longctx/layers/attention/sparse_backend.py.
"""

from longctx.sparse.config import HeadPattern, SparseConfig, resolve_sparse_config

__all__ = ["HeadPattern", "SparseConfig", "resolve_sparse_config"]
