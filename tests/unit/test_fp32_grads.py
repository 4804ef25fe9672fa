"""fp32 gradient accumulation of bf16 parameters (grads.accumulate_in_fp32, megatron's grad_reduce_in_fp32)."""

import torch

from mrlhf.parallel.grads import accumulate_in_fp32, clip_grads, grad_of


def test_backward_passes_accumulate_into_an_fp32_main_grad():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 4, bias=False).to(torch.bfloat16)
    plain = torch.nn.Linear(16, 4, bias=False).to(torch.bfloat16)
    plain.weight.data.copy_(lin.weight.data)
    accumulate_in_fp32([lin.weight])
    xs = [torch.randn(8, 16, dtype=torch.bfloat16) * s for s in (1.0, 1e-3, 1e3)]
    per_pass = []
    for x in xs:
        lin(x).float().pow(2).sum().backward()
        plain.weight.grad = None
        plain(x).float().pow(2).sum().backward()
        per_pass.append(plain.weight.grad.float())
    assert lin.weight.grad is None and lin.weight.main_grad.dtype == torch.float32
    want = per_pass[0] + per_pass[1] + per_pass[2]  # fp32 sum of the bf16 per-pass gradients
    assert torch.equal(lin.weight.main_grad, want)
    assert grad_of(lin.weight) is lin.weight.main_grad
    # the bf16 accumulation of the same passes loses what fp32 keeps
    plain.weight.grad = None
    for x in xs:
        plain(x).float().pow(2).sum().backward()
    assert not torch.equal(plain.weight.grad.float(), want)
    clip_grads([lin.weight], 1.0, float(want.norm()))
    assert abs(float(lin.weight.main_grad.norm()) - 1.0) < 1e-5  # clipping acts on the fp32 gradient


def test_fp32_parameters_keep_plain_grads():
    lin = torch.nn.Linear(4, 2)
    accumulate_in_fp32(list(lin.parameters()))
    lin(torch.ones(1, 4)).sum().backward()
    assert not hasattr(lin.weight, "main_grad") and lin.weight.grad is not None
    assert grad_of(lin.weight) is lin.weight.grad
