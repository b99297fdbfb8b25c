"""AdamW whose optimizer state lives in host memory and visits the device one page at a time.

QLoRA's paged optimizers (bitsandbytes) keep the AdamW moments in CUDA unified memory that the
driver pages to the CPU under pressure. We do the same thing explicitly, so it runs everywhere:

* ``exp_avg`` / ``exp_avg_sq`` are fp32 tensors in pinned host memory (plain CPU memory when
  there is no GPU);
* ``step()`` walks every parameter in pages of ``page_numel`` elements: copy the two state pages
  to one reusable device buffer, do the AdamW update there, copy them back.

Peak device memory therefore holds one page of state (``2 * page_numel * 4`` bytes) instead of
``2 * 4`` bytes per trainable parameter. On a CPU-only machine the same code runs with host and
"device" being the same memory. The arithmetic is ``torch.optim.AdamW``'s (decoupled weight
decay, bias correction), in fp32 whatever the parameter dtype.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from qbench.params import QBenchError

DEFAULT_PAGE_NUMEL = 1 << 20  # 1 Mi elements: 8 MiB of fp32 moments per page


class PagedAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, page_numel: int = DEFAULT_PAGE_NUMEL):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise QBenchError(f"paged AdamW: lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise QBenchError(f"paged AdamW: betas must lie in [0, 1) (got {betas})")
        if page_numel < 1:
            raise QBenchError(f"paged AdamW: page_numel must be >= 1 (got {page_numel})")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.page_numel = int(page_numel)
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def _host_zeros(self, numel: int, device: torch.device) -> torch.Tensor:
        state = torch.zeros(numel, dtype=torch.float32)
        if device.type == "cuda":
            state = state.pin_memory()  # pinned: asynchronous, full-bandwidth copies
        return state

    def _page_buffer(self, device: torch.device) -> torch.Tensor:
        """One reusable device buffer holding a page of both moments."""
        buf = self._buffers.get(device)
        if buf is None:
            buf = torch.empty(2, self.page_numel, dtype=torch.float32, device=device)
            self._buffers[device] = buf
        return buf

    def state_bytes_on_host(self) -> int:
        return sum(s["exp_avg"].numel() * 8 for s in self.state.values() if "exp_avg" in s)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        devices = set()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise QBenchError("paged AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = self._host_zeros(p.numel(), p.device)
                    state["exp_avg_sq"] = self._host_zeros(p.numel(), p.device)
                state["step"] += 1
                t = state["step"]
                step_size = lr / (1 - beta1**t)
                bias_c2_sqrt = math.sqrt(1 - beta2**t)
                flat_p = p.view(-1)
                flat_g = p.grad.reshape(-1)
                buf = self._page_buffer(p.device)
                devices.add(p.device)
                on_host = p.device.type == "cpu"
                for start in range(0, p.numel(), self.page_numel):
                    n = min(self.page_numel, p.numel() - start)
                    host_m = state["exp_avg"][start:start + n]
                    host_v = state["exp_avg_sq"][start:start + n]
                    if on_host:  # no device: update the state in place
                        m, v = host_m, host_v
                    else:
                        m, v = buf[0, :n], buf[1, :n]
                        m.copy_(host_m, non_blocking=True)
                        v.copy_(host_v, non_blocking=True)
                    g = flat_g[start:start + n].float()
                    w = flat_p[start:start + n]
                    w32 = w.float()
                    if wd != 0:
                        w32.mul_(1 - lr * wd)
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (v.sqrt() / bias_c2_sqrt).add_(eps)
                    w32.addcdiv_(m, denom, value=-step_size)
                    if w32.data_ptr() != w.data_ptr():
                        w.copy_(w32)
                    if not on_host:
                        host_m.copy_(m, non_blocking=True)
                        host_v.copy_(v, non_blocking=True)
        for device in devices:
            if device.type == "cuda":  # host state must be complete before anyone reads it
                torch.cuda.synchronize(device)
        return loss


OPTIMIZERS = ("paged", "adamw", "bnb-paged")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0,
                   page_numel: int = DEFAULT_PAGE_NUMEL) -> torch.optim.Optimizer:
    """``paged`` (ours), ``adamw`` (torch, state on the device) or ``bnb-paged`` (bitsandbytes)."""
    params = list(params)
    if name == "paged":
        return PagedAdamW(params, lr=lr, weight_decay=weight_decay, page_numel=page_numel)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "bnb-paged":
        try:
            import bitsandbytes as bnb
        except Exception as exc:
            raise QBenchError(f"optimizer=bnb-paged needs bitsandbytes ({type(exc).__name__}: {exc}); "
                              "use optimizer=paged") from None
        if not torch.cuda.is_available():
            raise QBenchError("optimizer=bnb-paged needs a CUDA GPU (bitsandbytes pages CUDA unified memory); "
                              "use optimizer=paged")
        return bnb.optim.PagedAdamW(params, lr=lr, weight_decay=weight_decay)
    raise QBenchError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
