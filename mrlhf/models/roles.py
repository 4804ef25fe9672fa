"""Roles = backbone + head, one forward signature for every pipeline stage.

``forward(tokens, position_ids, attention_mask, input_tensor=None, targets=None)``:
- on a non-last stage: hidden states ``[s, b, h]`` for the next stage;
- on the last stage: the role's output -- actor/reference: log-probs of ``targets`` ``[b, s]`` (with
  ``set_lm_output(entropy=True)`` the pair (log-probs, entropy), both ``[b, s]``); critic: values ``[b, s]``; reward:
  scores ``[b]``.

LM roles divide their logits by ``lm_temperature`` (``set_lm_output``): PPO scores and trains at the rollout's
sampling temperature, so training log-probs are those of the distribution the tokens were drawn from.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from mrlhf.config import RunConfig
from mrlhf.models.backbone import (
    backbone_forward,
    build_backbone,
    global_param_name,
    init_value,
    init_weights,
    mark_tensor_parallel,
)
from mrlhf.models.heads import RewardHead, ValueHead, token_logprobs, vocab_parallel_entropy, vocab_parallel_logits

ROLES = ("actor", "reference", "critic", "reward")


class RoleModel(torch.nn.Module):
    """One role's slice on this rank: ``backbone`` (megatron GPTModel) and, on the last stage, its head."""

    def __init__(self, cfg: RunConfig, role: str, vocab_size: int, pre_process: bool, post_process: bool) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        self.role = role
        self.cfg = cfg
        self.pre_process, self.post_process = pre_process, post_process
        self.backbone = build_backbone(cfg, vocab_size, pre_process, post_process)
        self.head: torch.nn.Module | None = None
        self.lm_temperature, self.lm_entropy = 1.0, False
        if not self.has_lm_head and post_process:
            # Scalar roles need the final norm but not the vocab-sized output layer.
            del self.backbone.output_layer
            self.backbone.post_process = False  # (the decoder keeps its own post_process: final norm)
            self.backbone.share_embeddings_and_output_weights = False
            dtype = cfg.to_transformer_config().params_dtype
            self.head = (ValueHead if role == "critic" else RewardHead)(cfg.model.hidden_size, dtype=dtype)
        elif not self.has_lm_head:
            self.backbone.share_embeddings_and_output_weights = False

    def global_name(self, local: str) -> str:
        """Layout-independent name of parameter ``local`` (backbone layers by global index; the head as is)."""
        if local.startswith("backbone."):
            return global_param_name(self.backbone, local.removeprefix("backbone."))
        return local

    def set_lm_output(self, temperature: float = 1.0, entropy: bool = False) -> None:
        """LM roles: scale logits by 1/temperature; with ``entropy`` also return the per-token entropy."""
        if not 0 < temperature < float("inf"):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        self.lm_temperature, self.lm_entropy = float(temperature), entropy

    @property
    def has_lm_head(self) -> bool:
        return self.role in ("actor", "reference")

    @property
    def tied_across_stages(self) -> bool:
        """The word embedding lives on the first and the last stage and their grads must be summed."""
        return self.has_lm_head and self.cfg.model.tied and ps.get_pipeline_model_parallel_world_size() > 1

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        init_weights(self.backbone, self.cfg, seed)
        self.init_head(seed)

    @torch.no_grad()
    def init_head(self, seed: int) -> None:
        """The scalar head's initial values (replicated over TP: every rank draws the same from (seed, name))."""
        if self.head is not None:
            weight = self.head.linear.weight
            weight.copy_(init_value(f"{self.role}_head", tuple(weight.shape), self.cfg, seed).to(weight.dtype))
            self.head.linear.bias.zero_()

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        input_tensor: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        logits_from: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last stage: log-probs of ``targets`` [b, s] (actor/reference; with ``set_lm_output(entropy=True)`` also the
        entropy [b, s]), values [b, s] (critic) or scores [b] (reward); earlier stages: hidden states [s, b, h].
        ``logits_from`` (0-dim host int): LM heads skip the positions before it -- the prompt's, in PPO -- and return
        0 there: the output layer, log-softmax and entropy then cost (s - logits_from) / s of a full pass, in FLOPs
        and in logits memory ([s, b, v/tp] fp32 is the largest activation of an RLHF step)."""
        hidden = backbone_forward(self.backbone, tokens, position_ids, attention_mask, input_tensor)
        if not self.post_process:
            return hidden
        if self.has_lm_head:
            assert targets is not None, "actor/reference forward on the last stage needs targets"
            skip = int(logits_from) if logits_from is not None else 0
            if skip:
                hidden, targets = hidden[skip:], targets[:, skip:]  # [s, b, h] -> [s - skip, b, h]
            logits = vocab_parallel_logits(self.backbone, hidden)
            if self.lm_temperature != 1.0:
                logits = logits / self.lm_temperature
            out = [token_logprobs(logits, targets)] + ([vocab_parallel_entropy(logits)] if self.lm_entropy else [])
            if skip:
                out = [torch.nn.functional.pad(t, (skip, 0)) for t in out]  # [b, s - skip] -> [b, s], 0 before
            return tuple(out) if self.lm_entropy else out[0]
        if self.role == "critic":
            return self.head(hidden)
        assert attention_mask is not None
        return self.head(hidden, attention_mask)

    def sharded_state_dict(self, prefix: str = "") -> dict:
        """megatron dist_checkpointing view: backbone keys as megatron names them, plus a replicated head."""
        from megatron.core.dist_checkpointing import ShardedTensor

        sd = self.backbone.sharded_state_dict(prefix=f"{prefix}backbone.")
        if self.head is not None:
            tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
            replica = (0, tp_rank, dp_rank)
            for name, t in self.head.state_dict(keep_vars=True).items():
                key = f"{prefix}head.{name}"
                sd[key] = ShardedTensor.from_rank_offsets(key, t, replica_id=replica)
        return sd


def build_role(
    cfg: RunConfig,
    role: str,
    vocab_size: int,
    seed: int | None = None,
    device: torch.device | None = None,
    from_checkpoint: bool = False,
) -> RoleModel:
    """This rank's stage of ``role`` on ``device`` (default cpu), initialised from ``seed`` (default: training.seed).

    ``from_checkpoint``: every weight is about to be loaded, so the stage is built on the meta device and materialised
    uninitialised on ``device`` -- no full-tensor draws (over a minute per role for a 70B stage) and no host copy. A
    head the checkpoint lacks is drawn afterwards with :meth:`RoleModel.init_head`.
    """
    dtype = cfg.to_transformer_config().params_dtype
    device = torch.device(device or "cpu")
    if from_checkpoint:
        with torch.device("meta"):
            model = RoleModel(cfg, role, vocab_size, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
        model = model.to(dtype).to_empty(device=device)
        mark_tensor_parallel(model.backbone)
        return model
    model = RoleModel(cfg, role, vocab_size, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    model.init_weights(cfg.training.seed if seed is None else seed)
    # megatron builds norms in fp32 whatever params_dtype says; low precision means the whole model (as
    # megatron's Float16Module does), with fp32 master weights kept by the optimizer
    return model.to(dtype).to(device)
