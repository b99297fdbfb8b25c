import pytest
import torch

from qbench.params import QBenchError
from qbench.train.paged_adamw import PagedAdamW, make_optimizer


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(37, 13, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_()]


@pytest.mark.parametrize("page_numel", [1, 7, 64, 10_000])  # pages smaller than, splitting and larger than a tensor
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_adamw(page_numel, weight_decay):
    ours, theirs = _params(), _params()
    opt = PagedAdamW(ours, lr=1e-2, weight_decay=weight_decay, page_numel=page_numel)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, gr in zip(ours, theirs, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        ref.step()
    for p, q, start in zip(ours, theirs, _params()):
        assert not torch.equal(p, start)  # it moved
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"].view_as(p), ref.state[q]["exp_avg_sq"])


def test_half_precision_params_updated_in_fp32():
    p = torch.randn(50, dtype=torch.bfloat16).requires_grad_()
    ref = p.detach().float().clone().requires_grad_()
    opt, topt = PagedAdamW([p], lr=1e-2, page_numel=16), torch.optim.AdamW([ref], lr=1e-2)
    p.grad = torch.ones_like(p)
    ref.grad = torch.ones_like(ref)
    opt.step(), topt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(p.float(), ref, rtol=1e-2, atol=1e-2)


def test_state_lives_on_host():
    p = _params()[0]
    opt = PagedAdamW([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].device.type == "cpu"
    assert opt.state_bytes_on_host() == p.numel() * 8


def test_bad_input():
    with pytest.raises(QBenchError, match="lr"):
        PagedAdamW(_params(), lr=-1)
    with pytest.raises(QBenchError, match="valid optimizers"):
        make_optimizer("sgdx", _params(), lr=1e-3)
    if not torch.cuda.is_available():
        with pytest.raises(QBenchError, match="bnb-paged"):
            make_optimizer("bnb-paged", _params(), lr=1e-3)


@pytest.mark.gpu
def test_paged_keeps_state_off_gpu():
    p = torch.randn(1 << 20, device="cuda", requires_grad=True)
    opt = PagedAdamW([p], lr=1e-3, page_numel=1 << 16)
    p.grad = torch.ones_like(p)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    opt.step()
    assert torch.cuda.max_memory_allocated() - base < p.numel() * 8 / 4
