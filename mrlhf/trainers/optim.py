"""AdamW with optional ZeRO-1 sharding over DP and fp32 master weights for bf16 models; the LR schedule.

ZeRO-1 here partitions whole parameters over the DP ranks (greedy by size, in parameter order): each rank keeps
Adam state (and fp32 masters) only for the parameters it owns, steps them, and broadcasts them to the other DP
ranks. Adam is elementwise per parameter and clipping happens before, so the result equals the unsharded
optimizer exactly.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state as ps
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mrlhf.config import OptimizerConfig, SchedulerConfig
from mrlhf.parallel import comm
from mrlhf.parallel.grads import accumulate_in_fp32, grad_of


def lr_at(step: int, total_steps: int, opt: OptimizerConfig, sched: SchedulerConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine/linear/constant decay."""
    if sched.warmup_steps and step < sched.warmup_steps:
        return opt.lr * (step + 1) / sched.warmup_steps
    if sched.decay == "constant":
        return opt.lr
    progress = min(1.0, (step - sched.warmup_steps) / max(1, total_steps - sched.warmup_steps))
    if sched.decay == "linear":
        return opt.lr - (opt.lr - opt.min_lr) * progress
    return opt.min_lr + (opt.lr - opt.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def assign_owners(sizes: list[int], dp: int) -> list[int]:
    """Greedy, deterministic partition of parameters (by element count) over ``dp`` ranks."""
    load = [0] * dp
    owners = []
    for n in sizes:
        r = min(range(dp), key=lambda i: (load[i], i))
        owners.append(r)
        load[r] += n
    return owners


class Optimizer:
    """AdamW over a model's parameters: decay on matrices only, optional ZeRO-1, fp32 masters for low precision."""

    def __init__(
        self, params: list[torch.nn.Parameter], cfg: OptimizerConfig, zero1: bool = False, fp32_grads: bool = True
    ) -> None:
        """``fp32_grads``: low-precision parameters accumulate and reduce their gradients in fp32 (``main_grad``)."""
        self.params = params
        if fp32_grads:
            accumulate_in_fp32(params)
        self.cfg = cfg
        self.zero1 = zero1 and ps.get_data_parallel_world_size() > 1
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.owners = assign_owners([p.numel() for p in params], dp) if self.zero1 else [dp_rank] * len(params)
        self.owned = [i for i, r in enumerate(self.owners) if r == dp_rank]
        self.use_master = any(p.dtype != torch.float32 for p in params)
        # What the inner AdamW steps: the model params themselves, or fp32 master copies of the owned ones. The
        # masters take the parameters' values at the first step (or come from a checkpoint), not here: a model about
        # to be loaded is built uninitialised (``build_role(from_checkpoint=True)``), and weights loaded after this
        # point (RM/DPO/PPO start from another stage's checkpoint) would otherwise be overwritten by stale masters.
        self.masters_current = False
        self.targets: dict[int, torch.nn.Parameter] = {}
        for i in self.owned:
            p = params[i]
            self.targets[i] = torch.nn.Parameter(p.detach().float().clone()) if self.use_master else p
        decay = [self.targets[i] for i in self.owned if params[i].ndim >= 2]
        no_decay = [self.targets[i] for i in self.owned if params[i].ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self.inner = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad = None

    @torch.no_grad()
    def sync_masters(self) -> None:
        """fp32 masters := the parameters' current values (once, before the first step or save)."""
        if self.use_master and not self.masters_current:
            for i, master in self.targets.items():
                master.copy_(self.params[i].detach().float())
        self.masters_current = True

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.sync_masters()
        for group in self.inner.param_groups:
            group["lr"] = lr
        if self.use_master:
            for i, master in self.targets.items():
                g = grad_of(self.params[i])
                master.grad = None if g is None else g.float()
        self.inner.step()
        if self.use_master:
            for i, master in self.targets.items():
                self.params[i].copy_(master)
                master.grad = None
        if self.zero1:
            self._broadcast_owned()

    def _broadcast_owned(self) -> None:
        for r in range(ps.get_data_parallel_world_size()):
            mine = [self.params[i].data for i, o in enumerate(self.owners) if o == r]
            if not mine:
                continue
            flat = _flatten_dense_tensors(mine)
            comm.broadcast_from_dp_rank(flat, r)
            for p, new in zip(mine, _unflatten_dense_tensors(flat, mine)):
                p.copy_(new)

    def stepped_bytes(self, device: torch.device, offloaded: bool = False) -> int:
        """What this optimizer holds on ``device`` once it has stepped (``residency.device_bytes``' 'optimizer'):
        AdamW's two moments in the stepped tensor's dtype, the fp32 masters of low-precision parameters (neither
        while ``offloaded`` to host memory), and AdamW's per-tensor ``step`` counter, a 0-d fp32 tensor kept on the
        CPU (so counted on a CPU run only, offloaded or not). Works on meta-device parameters (``mrlhf plan``)."""
        total = 0
        for i in self.owned:
            target = self.targets[i]
            if not offloaded:
                total += 2 * target.numel() * target.element_size()
                if self.use_master:
                    total += target.numel() * target.element_size()
            if device.type == "cpu":
                total += torch.empty((), dtype=torch.float32).element_size()
        return total

    @staticmethod
    def grad_bytes(params: list[torch.nn.Parameter], fp32_grads: bool) -> int:
        """What the gradients of ``params`` hold between a backward and the step: an fp32 ``main_grad`` for each
        low-precision parameter under ``fp32_grads``, else a ``.grad`` of the parameter's own dtype."""
        return sum(p.numel() * (4 if fp32_grads and p.dtype != torch.float32 else p.element_size()) for p in params)

    def state_dict(self) -> dict:
        from mrlhf.models.residency import optimizer_offloaded

        if optimizer_offloaded(self):  # residency.offload_optimizer left empty tensors
            raise RuntimeError("optimizer state is offloaded to host memory: residency.reload_optimizer first")
        self.sync_masters()  # a save before the first step (a critic warm-up) stores the weights, not stale copies
        state = {"inner": self.inner.state_dict(), "owned": self.owned, "zero1": self.zero1}
        if self.use_master:
            state["masters"] = {i: m.detach().clone() for i, m in self.targets.items()}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["owned"] != self.owned or state["zero1"] != self.zero1:
            raise ValueError("optimizer state was saved with a different parameter partition (layout or zero1)")
        self.inner.load_state_dict(state["inner"])
        if self.use_master:
            for i, m in state["masters"].items():
                self.targets[int(i)].copy_(m)
        self.masters_current = True
