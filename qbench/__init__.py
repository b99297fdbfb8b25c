"""qbench: compare LLM quantization methods on equal terms.

Plugins implement hooks with ``@qbench.hookimpl``; see ``qbench.hookspecs``.
"""
import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("qbench")

__all__ = ["hookimpl", "__version__"]
