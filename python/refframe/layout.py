"""Names of the seed's layout and option values: file names, tensor keys, backends, eigh dtypes.

Imports nothing heavy, so the command line can build its parser (and answer --help) before torch
is loaded."""

from __future__ import annotations

W_FILENAME = "W.safetensors"
CLUSTER_FILENAME = "1.4h_cluster_tokens.safetensors"
W_KEY = "W"
CLUSTER_KEY = "cluster_token_ids"
DEFAULT_FILENAME = "1.6a_cluster_reference_frame.safetensors"
BACKENDS = ("auto", "native", "torch")
EIGH_DTYPE_NAMES = ("float32", "float64")
MATRICES = ("unembedding", "embedding")  # which of a checkpoint's token matrices is W
__version__ = "0.1.0"
