"""Round half to even inside Triton kernels, bit-identical to ``torch.round``.

``floor(v + 0.5)`` is not enough: ``v + 0.5`` itself rounds for values just below a half
(0.49999997 + 0.5 == 1.0 in fp32). ``v - floor(v)`` is exact, so the decision is exact too.
Shared by the absmax, affine and int8 kernels so all of them round like their torch references.
"""
import triton
import triton.language as tl


@triton.jit
def round_half_even(v):
    lower = tl.floor(v)
    frac = v - lower
    lower_is_odd = (lower - 2.0 * tl.floor(lower * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & lower_is_odd)
    return tl.where(up, lower + 1.0, lower)
