"""Post-training and inference for NVIDIA Cosmos-Predict2 Text2Image on the Hugging Face stack.

Importing this package does no work: each submodule is imported where it is used.
"""

__version__ = "0.1.0"
