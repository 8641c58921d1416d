"""prge: P-RGE zeroth-order fine-tuning (arXiv 2409.15520) in eager PyTorch and inside ExecuTorch."""

__version__ = "0.1.0"

from prge.errors import PrgeError  # noqa: E402,F401
