"""``mrlhf plan STAGE --config FILE --world N``: what a run will hold on each GPU, before it has one.

For every pipeline stage and data-parallel rank of the layout, the bytes each role keeps on its device in each phase
-- parameters, gradients, optimizer state, the KV cache -- computed by the code that allocates them, not by a
formula beside it: each stage's roles are built by ``models.roles.build_role`` on the meta device (no memory, a
13B stage in a fraction of a second) inside a one-process fake process group of the run's world size (torch's
``fake`` backend: megatron's TP/PP/DP groups form, nothing is sent), the optimizer is the trainer's ``Optimizer`` on
those parameters (ZeRO-1 ownership included), the KV cache is sized by ``KVCache``'s own shape. The keys are those of
the trainer's per-phase memory report (``trainers.ppo.memory_report``), and a test holds the plan to that report,
rank by rank, byte for byte.

What it does not count: activations (the ``[s, b, v/tp]`` fp32 logits of the LM head are the largest in PPO), NCCL
and CUDA-context memory, the caching allocator's slack. Leave room for them: the measured peak is
``mem_cuda_max_allocated_bytes`` in the first iteration's metrics.

PPO residency, in steady state (from the second iteration on; the first holds no AdamW moments before its first
step): trained roles (actor, critic when GAE) keep parameters and optimizer state on the device throughout; frozen
roles (reference, reward) are on the device only during experience making when ``ppo.offload_frozen``; with
``ppo.offload_optimizer`` the trained roles' optimizer state is on the device only while training; the EMA copy
stays; the KV cache exists only during generation; each trained role's gradients exist from its backward to its step
(the actor's are freed before the critic's backward, so a phase's peak holds one of them).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from mrlhf.config import RunConfig
from mrlhf.errors import ConfigError

KINDS = ("params", "grads", "optimizer")
STAGES = ("sft", "rm", "dpo", "ppo")
PHASES = {"ppo": ("generate", "experience", "train"), "sft": ("train",), "rm": ("train",), "dpo": ("train",)}


@dataclass
class RankPlan:
    """One (pipeline stage, DP rank)'s bytes by phase: ``{phase: {"mem_<role>_<kind>_bytes": n, ...}}`` (every TP
    rank of a stage holds the same: megatron splits evenly and replicates norms)."""

    pp_rank: int
    dp_rank: int
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    def peak(self, phase: str) -> int:
        """The most the phase holds at once: everything listed, except that only the largest of the trained roles'
        gradients exists at a time (each is freed at its model's step)."""
        mem = self.phases[phase]
        grads = [v for k, v in mem.items() if k.endswith("_grads_bytes")]
        return sum(v for k, v in mem.items() if not k.endswith("_grads_bytes")) + max(grads, default=0)


@dataclass
class Plan:
    stage: str
    world: int
    tp: int
    pp: int
    dp: int
    precision: str
    ranks: list[RankPlan]
    roles: dict[str, str]  # role -> 'trained' | 'frozen' | 'frozen (offloaded outside experience)' | ...

    def rank(self, pp_rank: int, dp_rank: int) -> RankPlan:
        return next(r for r in self.ranks if (r.pp_rank, r.dp_rank) == (pp_rank, dp_rank))

    def to_json(self) -> dict:
        return {
            "stage": self.stage, "world": self.world, "tp": self.tp, "pp": self.pp, "dp": self.dp,
            "precision": self.precision, "roles": self.roles,
            "ranks": [{"pp_rank": r.pp_rank, "dp_rank": r.dp_rank, "phases": r.phases,
                       "peak": {ph: r.peak(ph) for ph in r.phases}} for r in self.ranks],
        }  # fmt: skip


@contextlib.contextmanager
def fake_world(world: int, rank: int, tp: int, pp: int) -> Iterator[None]:
    """megatron's groups for ``rank`` of a ``world``-process job, in this one process, over torch's ``fake`` backend
    (collectives return at once). Refuses to run where a real process group exists."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mrlhf.parallel.compat import apply_cpu_compat

    if dist.is_initialized():
        raise RuntimeError("mrlhf plan builds its own (fake) process group; a real one is initialised")
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:  # pragma: no cover - part of every torch wheel since 2.1
        raise ConfigError(f"mrlhf plan needs torch's fake process group (torch.testing._internal): {e}") from None
    apply_cpu_compat()
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, create_gloo_process_groups=False
        )
        yield
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def _vocab(cfg: RunConfig) -> int:
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    path = cfg.data.tokenizer_path
    if not path:
        raise ConfigError("mrlhf plan needs model.vocab_size or data.tokenizer_path (the vocabulary sizes the embedding)")
    from mrlhf.data.tokenizer import Tokenizer

    return Tokenizer.load(path).vocab_size


def stage_roles(cfg: RunConfig, stage: str) -> dict[str, str]:
    """The models a stage builds and how each is held: 'trained', 'frozen', 'frozen-offloaded' (on the device only
    while it computes: PPO's experience making, DPO's reference pass) or 'ema'."""
    if stage == "sft":
        return {"actor": "trained"}
    if stage == "rm":
        return {"reward": "trained"}
    if stage == "dpo":
        d = cfg.dpo
        return {"actor": "trained", "reference": "frozen-offloaded" if d.offload_reference else "frozen"}
    p = cfg.ppo
    frozen = "frozen-offloaded" if p.offload_frozen else "frozen"
    roles = {"actor": "trained", "reference": frozen}
    if not p.reward_function:
        roles["reward"] = frozen
    if p.needs_critic:
        roles["critic"] = "trained"
    if p.ema_decay > 0:
        roles["ema_actor"] = "ema"
    return roles


def _resident(how: str, phase: str) -> bool:
    return how != "frozen-offloaded" or phase == "experience"


def plan(cfg: RunConfig, world: int, stage: str, device: str = "cuda") -> Plan:
    """The plan of ``stage`` for ``world`` processes (layout and batch arithmetic checked as the run checks them).
    ``device``: 'cuda' (what a GPU run holds) or 'cpu' (what a CPU run's report shows: AdamW's step counters live
    on the CPU, so they count there)."""
    from mrlhf.models import residency
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.topology import Coord, Layout
    from mrlhf.trainers.optim import Optimizer

    if stage not in STAGES:
        raise ConfigError(f"mrlhf plan: stage must be one of {', '.join(STAGES)}, got {stage!r}")
    dp = cfg.validate_world(world, "ppo" if stage == "ppo" else "")
    p, t = cfg.parallel, cfg.training
    layout = Layout.for_world(world, p.tp, p.pp)
    vocab = _vocab(cfg)
    roles = stage_roles(cfg, stage)
    meta, dev = torch.device("meta"), torch.device(device)
    ranks: list[RankPlan] = []
    for pp_rank in range(p.pp):
        for dp_rank in range(dp if p.zero1 and dp > 1 else 1):  # without ZeRO-1 every DP rank holds the same
            rank = layout.rank(Coord(tp_rank=0, pp_rank=pp_rank, dp_rank=dp_rank))
            with fake_world(world, rank, p.tp, p.pp):
                held: dict[str, dict[str, int]] = {}
                idle_optimizer: dict[str, int] = {}  # outside training (ppo.offload_optimizer: counters only)
                kv = 0
                for role, how in roles.items():
                    model = build_role(cfg, "actor" if role == "ema_actor" else role, vocab, device=meta,
                                       from_checkpoint=True)  # fmt: skip
                    mem = {"params": residency.device_bytes(model, meta)["params"]}
                    if how == "trained":
                        params = list(model.parameters())
                        opt_cfg = cfg.critic_optimizer if role == "critic" else cfg.optimizer
                        opt = Optimizer(params, opt_cfg, p.zero1, fp32_grads=t.grad_reduce_in_fp32)
                        mem["grads"] = Optimizer.grad_bytes(params, t.grad_reduce_in_fp32)
                        mem["optimizer"] = opt.stepped_bytes(dev)
                        offloaded = stage == "ppo" and cfg.ppo.offload_optimizer
                        idle_optimizer[role] = opt.stepped_bytes(dev, offloaded=offloaded)
                    held[role] = mem
                    if stage == "ppo" and role == "actor":
                        kv = _rollout_cache_bytes(cfg, model, dp)
            phases = {}
            for phase in PHASES[stage]:
                out = {}
                for role, how in roles.items():
                    for kind in KINDS:
                        if kind in held[role]:
                            on = _resident(how, phase) and (kind != "grads" or phase == "train")
                            value = held[role][kind] if on else 0
                            if kind == "optimizer" and phase != "train":
                                value = idle_optimizer[role]
                            out[f"mem_{role}_{kind}_bytes"] = value
                if stage == "ppo":
                    out["mem_kv_cache_bytes"] = kv if phase == "generate" else 0
                phases[phase] = out
            ranks.append(RankPlan(pp_rank, dp_rank, phases))
    return Plan(stage, world, p.tp, p.pp, dp, t.precision, ranks, roles)


def _rollout_cache_bytes(cfg: RunConfig, actor, dp: int) -> int:
    """The rollout's KV cache on this stage, at its largest: every prompt ``data.max_prompt_len`` long (prompts are
    left-padded to the longest of their microbatch), sized by ``Generator.generate``'s own rule (``cache_extent``)
    for this rank's sequences and the actor's layers, KV groups on this TP rank and dtype."""
    from megatron.core import parallel_state as ps

    from mrlhf.generation.generate import cache_extent
    from mrlhf.ops.kv_cache import KVCache

    sequences = cfg.training.global_batch_size // dp * cfg.ppo.n_samples
    slots, rows, positions = cache_extent(cfg.generation, ps.get_pipeline_model_parallel_world_size(), sequences,
                                          cfg.data.max_prompt_len)  # fmt: skip
    tc = actor.backbone.config
    groups = tc.num_query_groups // ps.get_tensor_model_parallel_world_size()
    return KVCache.bytes_for(len(actor.backbone.decoder.layers), slots, rows, positions, groups, tc.kv_channels,
                             dtype=next(actor.parameters()).dtype)  # fmt: skip


GIB = 2**30


def format_plan(plan_: Plan) -> str:
    """The table a user reads: GiB per GPU by role and kind for each pipeline stage (the most loaded DP rank under
    ZeRO-1), then each phase's peak."""
    biggest = max(r.peak(ph) for r in plan_.ranks for ph in r.phases)
    unit, scale = ("GiB", GIB) if biggest >= GIB else ("MiB", 2**20)
    lines = [
        f"mrlhf plan: {plan_.stage} on {plan_.world} GPUs (tp={plan_.tp} pp={plan_.pp} dp={plan_.dp}), "
        f"{plan_.precision}; {unit} per GPU; activations, NCCL/CUDA context and allocator slack not counted",
        "roles: " + ", ".join(f"{r} ({how})" for r, how in plan_.roles.items()),
    ]
    worst = {}
    for r in plan_.ranks:
        best = worst.get(r.pp_rank)
        last_phase = list(r.phases)[-1]
        if best is None or r.peak(last_phase) > best.peak(last_phase):
            worst[r.pp_rank] = r
    stages = [worst[s] for s in sorted(worst)]
    header = f"{'':24}" + "".join(f"{'stage ' + str(r.pp_rank):>10}" for r in stages)
    lines.append(header)
    phase0 = list(stages[0].phases)[-1]
    for role in plan_.roles:
        for kind in KINDS:
            key = f"mem_{role}_{kind}_bytes"
            if key in stages[0].phases[phase0]:
                # the role's own size, whichever phase holds it (a frozen role's params in experience making)
                vals = [max(ph.get(key, 0) for ph in r.phases.values()) for r in stages]
                lines.append(f"  {role + ' ' + kind:22}" + "".join(f"{v / scale:10.2f}" for v in vals))
    if plan_.stage == "ppo":
        vals = [r.phases["generate"]["mem_kv_cache_bytes"] for r in stages]
        lines.append(f"  {'kv cache (generate)':22}" + "".join(f"{v / scale:10.2f}" for v in vals))
    for phase in stages[0].phases:
        lines.append(f"peak {phase:19}" + "".join(f"{r.peak(phase) / scale:10.2f}" for r in stages))
    return "\n".join(lines)


def run_plan(cfg: RunConfig, stage: str, world: int | None, as_json: bool, device: str = "cuda") -> str:
    """The CLI's ``mrlhf plan``: ``world`` defaults to WORLD_SIZE (torchrun/srun) or tp*pp (one DP rank)."""
    if world is None:
        world = int(os.environ.get("WORLD_SIZE", cfg.parallel.tp * cfg.parallel.pp))
    result = plan(cfg, world, stage, device)
    return json.dumps(result.to_json(), indent=1) if as_json else format_plan(result)
