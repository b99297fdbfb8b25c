"""Triton kernels, one op per module, each beside its plain-torch reference (``*_reference``)."""
