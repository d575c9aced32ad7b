"""File names, tensor keys and option values of the seed's layout; imports nothing heavy, so the
command line can build its parser (and answer --help) before torch is loaded."""

from __future__ import annotations

W_FILENAME = "W.safetensors"
CLUSTER_FILENAME = "1.4h_cluster_tokens.safetensors"
W_KEY = "W"
CLUSTER_KEY = "cluster_token_ids"
DEFAULT_FILENAME = "1.6a_cluster_reference_frame.safetensors"
EIGH_DTYPE_NAMES = ("float32", "float64")
