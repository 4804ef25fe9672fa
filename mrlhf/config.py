"""Run configuration: a dataclass tree, YAML run files and dotted command-line overrides.

Every field carries a one-line docstring under it. Cross-field checks live in ``__post_init__``;
checks that need the world size live in :meth:`RunConfig.validate_world`. This is the only module
that reads YAML or the command line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import yaml

from mrlhf.errors import ConfigError


@dataclass
class ModelConfig:
    """The transformer backbone, shared by every role."""

    flavour: str = "llama"
    """'gpt2' (learned positions, LayerNorm, GELU, biases, tied embeddings) or 'llama' (RoPE, RMSNorm, SwiGLU, GQA)."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for GQA; None means one per query head (multi-head attention)."""
    ffn_hidden_size: int | None = None
    """MLP width; None means 4*hidden (gpt2) or the LLaMA rule 256-rounded 8/3*hidden (llama)."""
    vocab_size: int | None = None
    """Real vocabulary size; None takes it from the tokenizer."""
    make_vocab_size_divisible_by: int = 128
    """The padded vocabulary is a multiple of this (must also divide by tp); padded logits are masked."""
    max_position_embeddings: int = 2048
    """Longest sequence (size of the learned position table for gpt2)."""
    rotary_base: int = 10000
    """RoPE base period (llama flavour)."""
    qkv_bias: bool | None = None
    """Bias on the QKV projection; None: True for gpt2, False for llama (set True for Qwen2)."""
    tie_word_embeddings: bool | None = None
    """Share input embedding and LM output weight; None: True for gpt2, False for llama."""
    norm_epsilon: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    transformer_impl: str = "auto"
    """Layer implementation: 'te' (Transformer Engine linears with fused norms; needs CUDA and TE), 'local'
    (megatron's local layers) or 'auto' (te when it imports on a CUDA machine, else local). Core attention is
    mrlhf's own in both (KV-cache decode hook, padding/packing masks)."""

    def __post_init__(self) -> None:
        if self.transformer_impl not in ("auto", "local", "te"):
            raise ConfigError(f"model.transformer_impl must be auto, local or te, got {self.transformer_impl!r}")
        if self.flavour not in ("gpt2", "llama"):
            raise ConfigError(f"model.flavour must be 'gpt2' or 'llama', got {self.flavour!r}")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "make_vocab_size_divisible_by"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        _check_range("model", self, {"init_std": (0, 1), "norm_epsilon": (0, 1)}, low_open=True)
        _check_range("model", self, {"hidden_dropout": (0, 1), "attention_dropout": (0, 1)}, high_open=True)
        if self.rotary_base <= 0 or self.max_position_embeddings <= 0:
            raise ConfigError("model.rotary_base and model.max_position_embeddings must be positive")
        groups = self.query_groups
        if self.num_attention_heads % groups:
            raise ConfigError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"model.num_query_groups ({groups})"
            )
        if self.flavour == "gpt2" and groups != self.num_attention_heads:
            raise ConfigError("model.num_query_groups (GQA) is only supported by the llama flavour")

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.flavour == "gpt2":
            return 4 * self.hidden_size
        return 256 * math.ceil(int(8 * self.hidden_size / 3) / 256)

    @property
    def tied(self) -> bool:
        return self.flavour == "gpt2" if self.tie_word_embeddings is None else self.tie_word_embeddings

    @property
    def has_qkv_bias(self) -> bool:
        return self.flavour == "gpt2" if self.qkv_bias is None else self.qkv_bias

    def padded_vocab_size(self, vocab_size: int) -> int:
        m = self.make_vocab_size_divisible_by
        return m * math.ceil(vocab_size / m)


@dataclass
class ParallelConfig:
    """How ranks split the work: tensor (tp), pipeline (pp) and data (dp = world / (tp*pp)) parallelism."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    first_stage_layers: int | None = None
    """Layers on the first pipeline stage when stages are uneven (the rest split evenly)."""
    last_stage_layers: int | None = None
    """Layers on the last pipeline stage when stages are uneven."""
    zero1: bool = False
    """Shard optimizer state over the data-parallel group (ZeRO stage 1)."""
    grad_bucket_mb: float = 25.0
    """Size of the buckets in which gradients are all-reduced over dp."""
    backend: str = "auto"
    """Process-group backend: 'auto' (nccl with CUDA, gloo without), 'nccl' or 'gloo'."""
    timeout_minutes: int = 30
    """Collective timeout."""

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ConfigError(f"parallel.tp and parallel.pp must be >= 1, got tp={self.tp} pp={self.pp}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend must be auto, nccl or gloo, got {self.backend!r}")
        if not self.grad_bucket_mb > 0:
            raise ConfigError("parallel.grad_bucket_mb must be positive")
        if self.timeout_minutes < 1:
            raise ConfigError(f"parallel.timeout_minutes must be >= 1, got {self.timeout_minutes}")


@dataclass
class OptimizerConfig:
    """AdamW and gradient clipping."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to biases and norms)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self) -> None:
        _check_range("optimizer", self, {"lr": (0, 1)}, low_open=True)  # AdamW steps move weights by ~lr
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optimizer: need 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        _check_range("optimizer", self, {"beta1": (0, 1), "beta2": (0, 1)}, high_open=True)
        _check_range("optimizer", self, {"eps": (0, 1)}, low_open=True)
        _check_range("optimizer", self, {"weight_decay": (0, 10), "clip_grad": (0, 1e6)})


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: linear warmup then decay to min_lr over the run."""

    warmup_steps: int = 0
    """Steps of linear warmup from 0 to lr."""
    decay: str = "cosine"
    """'cosine', 'linear' or 'constant' after warmup."""

    def __post_init__(self) -> None:
        if self.decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"scheduler.decay must be cosine, linear or constant, got {self.decay!r}")
        if self.warmup_steps < 0:
            raise ConfigError("scheduler.warmup_steps must be >= 0")


@dataclass
class DataConfig:
    """Where the text comes from, how it is rendered and cut, and how sources are mixed and split."""

    train_path: str = ""
    """Training file (jsonl/json/parquet); shorthand for a single entry in ``sources``."""
    sources: list[str] = field(default_factory=list)
    """Blended training sources, each 'name:ratio:path' (or a bare path, ratio 1)."""
    eval_path: str | None = None
    """Held-out file; None holds out ``eval_fraction`` of the training sources instead."""
    eval_fraction: float = 0.0
    """Fraction of each source held out for eval when eval_path is None (deterministic split)."""
    schema: str | None = None
    """Record schema (prompt_response, alpaca, messages, hh_rlhf, ...); None detects it from the first record."""
    pku_preference: str = "better"
    """PKU-SafeRLHF: which label marks the chosen response, 'better' or 'safer'."""
    data_split: list[float] | None = None
    """DeepSpeed-Chat stage split of each source across SFT/RM/PPO, e.g. [2, 4, 4]; None uses all of it."""
    tokenizer_path: str = ""
    """sentencepiece .model file, or an HF tokenizer.json (or a directory holding one)."""
    template: str = "plain"
    """Chat template: 'plain' (role tags), 'llama2' ([INST]) or 'chatml'."""
    max_seq_len: int = 256
    """Longest prompt+response in tokens (bos and eos included)."""
    max_prompt_len: int = 128
    """Longest prompt in tokens (bos and the assistant opener included)."""
    length_policy: str = "error"
    """Samples over a limit: 'error' (stop, naming file and line), 'truncate' or 'drop' (counted and logged)."""
    pack_sft: bool = False
    """Pack several SFT samples into one row of max_seq_len; attention and positions stay within each sample."""
    cache_dir: str | None = "~/.cache/mrlhf/data"
    """Tokenized-data cache (memory-mapped numpy); None disables it."""

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ConfigError("data.max_seq_len must be >= 2")
        if not 1 <= self.max_prompt_len <= self.max_seq_len:
            raise ConfigError(
                f"data.max_prompt_len ({self.max_prompt_len}) must be in [1, data.max_seq_len ({self.max_seq_len})]"
            )
        if self.length_policy not in ("error", "truncate", "drop"):
            raise ConfigError(f"data.length_policy must be error, truncate or drop, got {self.length_policy!r}")
        if self.pku_preference not in ("better", "safer"):
            raise ConfigError(f"data.pku_preference must be better or safer, got {self.pku_preference!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError("data.eval_fraction must be in [0, 1)")
        if self.train_path and self.sources:
            raise ConfigError("set data.train_path or data.sources, not both")
        if self.data_split is not None and (len(self.data_split) != 3 or min(self.data_split) < 0):
            raise ConfigError(f"data.data_split must be three non-negative weights (SFT, RM, PPO), got {self.data_split}")

    @property
    def source_specs(self) -> list[str]:
        return self.sources or ([self.train_path] if self.train_path else [])


@dataclass
class TrainingConfig:
    """Batching, length of the run, precision and seed."""

    train_steps: int = 10
    """Optimizer steps in the run."""
    global_batch_size: int = 8
    """Samples per optimizer step over all dp ranks."""
    micro_batch_size: int = 2
    """Samples per microbatch (the unit the pipeline schedule moves)."""
    seed: int = 1234
    """Seed of weights, data order and dropout."""
    precision: str = "fp32"
    """'fp32' or 'bf16' (bf16 weights and activations, fp32 master weights in the optimizer)."""
    grad_reduce_in_fp32: bool = True
    """bf16: accumulate gradients over microbatches, all-reduce them over DP and take their norm in fp32 (megatron's
    grad_reduce_in_fp32); false keeps bf16 gradients (half the gradient memory and DP traffic)."""
    eval_interval: int = 0
    """Run eval every this many steps (and at the end); 0 disables."""
    eval_samples: int = 64
    """Samples used for one eval."""
    output_dir: str = "runs/sft"
    """Directory for the resolved config, metrics and (by default) checkpoints."""
    max_consecutive_skips: int = 3
    """Stop the run with an error after this many optimizer steps in a row skipped for a non-finite loss or gradient."""

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"training.precision must be fp32 or bf16, got {self.precision!r}")
        for name in ("train_steps", "global_batch_size", "micro_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"training.{name} must be positive, got {getattr(self, name)}")
        if self.max_consecutive_skips < 1:
            raise ConfigError(f"training.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")
        if self.eval_interval < 0 or self.eval_samples < 1:
            raise ConfigError("training.eval_interval must be >= 0 and training.eval_samples >= 1")


@dataclass
class GenerationSection:
    """Sampling for rollouts, evaluation and `mrlhf generate`."""

    max_new_tokens: int = 32
    """Most tokens generated per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    seed: int = 0
    """Seed of the sampling noise (a sample depends only on seed, prompt index and step)."""
    micro_batch_size: int = 8
    """Prompts per in-flight microbatch."""
    num_slots: int | None = None
    """Microbatches in flight; None means pp (every stage busy)."""
    stop_strings: list[str] = field(default_factory=list)
    """Extra strings that end a sequence (eos always does, unless ignore_eos)."""
    ignore_eos: bool = False
    """PPO rollouts: always generate max_new_tokens, EOS included (fixed-length benchmarks)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.micro_batch_size < 1:
            raise ConfigError("generation.max_new_tokens and generation.micro_batch_size must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("generation: need temperature >= 0, 0 < top_p <= 1, top_k >= 0")


@dataclass
class RMSection:
    """Reward-model training (stage 2)."""

    margin: str = "none"
    """Bradley-Terry margin: 'none', 'data' (each pair's margin field) or 'constant' (margin_value)."""
    margin_value: float = 0.0
    """The margin when margin='constant'."""
    center_coef: float = 0.0
    """Reward-centering regulariser: coef * (r_chosen + r_rejected)^2."""

    def __post_init__(self) -> None:
        if self.margin not in ("none", "data", "constant"):
            raise ConfigError(f"rm.margin must be none, data or constant, got {self.margin!r}")
        if self.center_coef < 0:
            raise ConfigError("rm.center_coef must be >= 0")


@dataclass
class DPOSection:
    """Direct preference optimisation (offline alternative to PPO)."""

    loss: str = "sigmoid"
    """'sigmoid' (DPO; conservative cDPO with label_smoothing > 0) or 'ipo'."""
    beta: float = 0.1
    """Strength of the implicit KL constraint."""
    label_smoothing: float = 0.0
    """cDPO: assumed probability that a preference label is flipped."""
    sft_coef: float = 0.0
    """Weight of an added NLL loss on the chosen responses (per token)."""
    precompute_reference: bool = True
    """Compute reference log-probs once for the whole dataset (else on the fly each step)."""
    offload_reference: bool = True
    """Keep the frozen reference in host memory while it is idle (a no-op on CPU)."""

    def __post_init__(self) -> None:
        if self.loss not in ("sigmoid", "ipo"):
            raise ConfigError(f"dpo.loss must be sigmoid or ipo, got {self.loss!r}")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5 or self.sft_coef < 0:
            raise ConfigError("dpo: need beta > 0, 0 <= label_smoothing < 0.5, sft_coef >= 0")


ESTIMATORS = ("gae", "grpo", "rloo", "reinforce++")


def _entries(value: str | None) -> list[str]:
    """A comma-separated list of 'module:callable' entries, stripped (empty for None)."""
    return [s.strip() for s in value.split(",")] if value else []


def _check_callables(field_name: str, value: str | None) -> None:
    """Each entry of ``value`` is 'module:callable' with dotted identifiers on both sides (importing is load's job)."""
    for spec in _entries(value):
        module, _, name = spec.partition(":")
        if not (module and name and all(part.isidentifier() for part in module.split(".") + name.split("."))):
            raise ConfigError(
                f"{field_name} must be 'module:callable' (e.g. mrlhf.demo.judge:reward; several comma-separated), "
                f"got {spec!r} in {value!r}"
            )


@dataclass
class PPOSection:
    """Stage 3: PPO and its critic-free relatives (GRPO, RLOO, REINFORCE++) against a reward model.

    Batching reuses ``training``: ``global_batch_size`` is the number of prompts per iteration (over all DP ranks),
    ``micro_batch_size`` the sequences per microbatch of every scoring and training pass, ``train_steps`` the number of
    PPO iterations. ``optimizer``/``scheduler`` are the actor's; ``critic_optimizer``/``critic_scheduler`` the critic's.
    """

    estimator: str = "gae"
    """Advantage estimator: 'gae' (with a critic), 'grpo', 'rloo' or 'reinforce++' (critic-free: no critic is built)."""
    actor_load_dir: str | None = None
    """SFT checkpoint the actor starts from (also the reference unless reference_load_dir is set)."""
    reference_load_dir: str | None = None
    """Checkpoint of the frozen reference policy; None means actor_load_dir."""
    critic_load_dir: str | None = None
    """RM checkpoint the critic starts from (also the reward model unless reward_load_dir is set)."""
    reward_load_dir: str | None = None
    """Checkpoint of the frozen reward model; None means critic_load_dir."""
    n_samples: int = 1
    """Responses sampled per prompt (the group size of GRPO and RLOO, which need >= 2)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    num_minibatches: int = 1
    """Optimizer steps per epoch; the rollout batch is split into this many minibatches."""
    old_logprobs: str = "recompute"
    """Where the ratio's old log-probs come from: 'recompute' (a forward-only actor pass over the finished sequences
    at training microbatch shapes, exact) or 'rollout' (the log-probs the sampler computed while generating: one actor
    forward less per iteration, what TRL's PPO does; here the rollout runs in the training layout, so they agree with
    a training forward to ~1e-5 in fp32 -- watch logprob_mismatch_max, measured then on the first minibatch, in bf16).
    """
    clip_low: float = 0.2
    """Policy ratio clip below 1 (ratio >= 1 - clip_low)."""
    clip_high: float = 0.2
    """Policy ratio clip above 1 (ratio <= 1 + clip_high; > clip_low is DAPO's clip-higher)."""
    importance_sampling_level: str = "token"
    """The policy ratio: 'token' (PPO, GRPO) or 'sequence' (GSPO: one ratio per response, the geometric mean of its
    tokens', clipped as one; pair it with GSPO's narrow ranges, e.g. clip_low 3e-4, clip_high 4e-4). TRL's name."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens at c*|A|; None disables."""
    value_clip: float | None = 0.2
    """Clip of the value prediction around the rollout value; None disables."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus in the actor loss."""
    loss_agg: str = "token-mean"
    """Loss aggregation: 'token-mean' (over the global token count), 'seq-mean-token-mean' or
    'seq-mean-token-sum-norm' (Dr. GRPO: token sums over global sequences x loss_agg_constant)."""
    loss_agg_constant: float | None = None
    """Normaliser of 'seq-mean-token-sum-norm'; None means generation.max_new_tokens."""
    kl_coef: float = 0.05
    """KL coefficient (initial value for the adaptive controller)."""
    kl_estimator: str = "k1"
    """KL estimator per token: 'k1' (log-ratio), 'k2' (half squared log-ratio) or 'k3' (Schulman's low-variance)."""
    kl_placement: str = "reward"
    """Where the KL to the reference goes: 'reward' (per-token penalty in the reward) or 'loss' (a term of the actor
    loss, aggregated like the policy loss)."""
    kl_controller: str = "fixed"
    """'fixed' or 'adaptive' (Ziegler et al.: steer the KL towards kl_target)."""
    kl_target: float | None = None
    """Target KL per sequence of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller (in sequences)."""
    gamma: float = 1.0
    """Discount of GAE and REINFORCE++ returns."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten GAE advantages over the global rollout batch (REINFORCE++ always whitens)."""
    group_eps: float = 1e-6
    """Epsilon added to the group std of GRPO."""
    group_scale_by_std: bool = True
    """GRPO divides by the group std; False is Dr. GRPO's unscaled group baseline."""
    reward_normalize: bool = True
    """Normalise reward-model scores by a running mean/std initialised from the RM's held-out statistics."""
    reward_norm_update: bool = True
    """Update the running reward statistics with every rollout batch."""
    reward_clip: float | None = 5.0
    """Clip normalised scores to +-this; None disables."""
    truncation: str = "keep"
    """Responses that never emit EOS: 'keep', 'penalty' (subtract truncation_penalty from their score), 'mask'
    (leave them out of the actor loss) or 'overlong' (DAPO's soft overlong punishment: every response of L generated
    tokens loses truncation_penalty * clamp((L - (max_new_tokens - overlong_buffer)) / overlong_buffer, 0, 1))."""
    truncation_penalty: float = 1.0
    """Score subtracted from truncated responses with truncation='penalty' (the most 'overlong' subtracts)."""
    overlong_buffer: int = 0
    """truncation='overlong': the last tokens before generation.max_new_tokens over which the penalty ramps up."""
    truncation_warn: float = 0.5
    """Warn when more than this fraction of an iteration's responses is truncated."""
    critic_warmup_iterations: int = 0
    """First iterations that train only the critic (the actor stays fixed)."""
    ptx_coef: float = 0.0
    """Weight of the next-token (ptx) loss on ptx_path mixed into every actor minibatch; 0 disables."""
    ptx_path: str | None = None
    """SFT-format data file of the ptx loss."""
    ptx_batch_size: int = 8
    """ptx sequences per minibatch (over all DP ranks)."""
    ema_decay: float = 0.0
    """Keep an EMA of the actor's weights with this decay (saved as role 'ema_actor'); 0 disables."""
    reward_function: str | None = None
    """'module:callable' that scores responses in Python instead of a reward model (verifiable rewards), called by
    keyword as TRL's GRPOTrainer calls its reward functions: ``fn(prompts=, completions=, completion_ids=, **columns)``
    -> one score per response; ``prompts``/``completions`` are text (the rendered prompt; the response without EOS),
    each column one field of the prompt rows (e.g. ``answer``), None where a row lacks it. Called on TP rank 0 of the
    last pipeline stage for that DP rank's samples. No reward model is built; a None/NaN/inf score drops its sample.
    Several functions, comma-separated ('m:format,m:accuracy'), are summed with ppo.reward_weights."""
    reward_weights: list[float] | None = None
    """Weights of the comma-separated ppo.reward_function entries (default 1 each). A sample's score is the weighted
    sum over the functions that scored it -- None/NaN from one function leaves it out of the sum, as in TRL -- and
    NaN (the sample is dropped) when none did."""
    eval_temperature: float = 0.0
    """Held-out evaluation (every ``training.eval_interval`` iterations, on ``training.eval_samples`` prompts of the
    eval split): sampling temperature of its one response per prompt; 0 is greedy."""
    eval_reward_function: str | None = None
    """Score the held-out responses with these ``module:callable`` entries (comma-separated, weights 1) instead of
    what training scores with -- e.g. train against a reward model, evaluate with a verifier or a gold judge."""
    eval_before_train: bool = True
    """With evaluation on, also evaluate the starting policy (iteration 0) on a fresh run."""
    offload_frozen: bool = True
    """Keep the reference and reward models in host memory outside experience making."""
    offload_optimizer: bool = False
    """Keep the actor's and critic's optimizer state (AdamW moments, fp32 masters: 12 bytes per bf16 parameter) in
    pinned host memory outside the training phase, so generation's KV cache has that room. Costs two host copies of
    it per iteration; the updates are bit-identical."""
    save_frozen_roles: bool = True
    """Store the reference and reward models in every checkpoint (self-contained resume)."""

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"ppo.estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.estimator in ("grpo", "rloo") and self.n_samples < 2:
            raise ConfigError(f"ppo.estimator={self.estimator} compares samples of one prompt: needs ppo.n_samples >= 2")
        for name in ("n_samples", "ppo_epochs", "num_minibatches", "kl_horizon", "ptx_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("clip_low", "clip_high", "entropy_coef", "kl_coef", "ptx_coef", "truncation_penalty",
                     "critic_warmup_iterations"):  # fmt: skip
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"ppo.{name} must be finite and >= 0, got {v}")
        if self.clip_low >= 1:
            raise ConfigError(f"ppo.clip_low must be < 1, got {self.clip_low}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ConfigError(f"ppo.importance_sampling_level must be token or sequence (GSPO), got "
                              f"{self.importance_sampling_level!r}")  # fmt: skip
        if self.dual_clip is not None and not (math.isfinite(self.dual_clip) and self.dual_clip > 1):
            raise ConfigError(f"ppo.dual_clip must be > 1 (or null), got {self.dual_clip}")
        for name in ("value_clip", "reward_clip", "kl_target", "loss_agg_constant"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"ppo.{name} must be > 0 (or null), got {v}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if not (0 < self.group_eps < 1) or not 0 <= self.truncation_warn <= 1:
            raise ConfigError("ppo.group_eps must be in (0, 1) and ppo.truncation_warn in [0, 1]")
        if self.loss_agg not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            raise ConfigError(
                f"ppo.loss_agg must be token-mean, seq-mean-token-mean or seq-mean-token-sum-norm, got {self.loss_agg!r}"
            )
        if self.old_logprobs not in ("recompute", "rollout"):
            raise ConfigError(f"ppo.old_logprobs must be recompute or rollout, got {self.old_logprobs!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"ppo.kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        if self.kl_placement not in ("reward", "loss"):
            raise ConfigError(f"ppo.kl_placement must be reward or loss, got {self.kl_placement!r}")
        if self.kl_controller not in ("fixed", "adaptive"):
            raise ConfigError(f"ppo.kl_controller must be fixed or adaptive, got {self.kl_controller!r}")
        if self.kl_controller == "adaptive" and self.kl_target is None:
            raise ConfigError("ppo.kl_controller=adaptive needs ppo.kl_target")
        if self.truncation not in ("keep", "penalty", "mask", "overlong"):
            raise ConfigError(f"ppo.truncation must be keep, penalty, mask or overlong, got {self.truncation!r}")
        if self.truncation == "overlong" and self.overlong_buffer < 1:
            raise ConfigError(
                f"ppo.truncation=overlong needs ppo.overlong_buffer >= 1 (tokens), got {self.overlong_buffer}"
            )
        if self.ptx_coef > 0 and not self.ptx_path:
            raise ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_path (an SFT-format data file)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ppo.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not (math.isfinite(self.eval_temperature) and 0.0 <= self.eval_temperature <= 10.0):
            raise ConfigError(f"ppo.eval_temperature must be in [0, 10] (0: greedy), got {self.eval_temperature}")
        _check_callables("ppo.eval_reward_function", self.eval_reward_function)
        if self.reward_function is not None:
            _check_callables("ppo.reward_function", self.reward_function)
            weights = self.reward_weights
            if weights is not None and (len(weights) != len(self.reward_functions)
                                        or not all(math.isfinite(w) for w in weights)):  # fmt: skip
                raise ConfigError(
                    f"ppo.reward_weights must be {len(self.reward_functions)} finite numbers, one per "
                    f"ppo.reward_function entry, got {weights}"
                )
            if self.reward_load_dir is not None:
                raise ConfigError("ppo.reward_function and ppo.reward_load_dir both set: the function replaces the "
                                  "reward model, keep one")  # fmt: skip

    @property
    def reward_functions(self) -> list[str]:
        """The entries of ppo.reward_function ('module:callable' each; empty without one)."""
        return _entries(self.reward_function)

    @property
    def eval_reward_functions(self) -> list[str]:
        """The entries of ppo.eval_reward_function (empty without one)."""
        return _entries(self.eval_reward_function)

    @property
    def needs_critic(self) -> bool:
        return self.estimator == "gae"


@dataclass
class CheckpointConfig:
    """Saving, retention and resuming."""

    enabled: bool = True
    """Save checkpoints at all (off for throwaway runs and benchmarks)."""
    save_dir: str | None = None
    """Checkpoint directory; None means <output_dir>/checkpoints."""
    save_interval: int = 0
    """Save every this many steps (and at the end); 0 saves only at the end."""
    keep_last: int = 3
    """Keep this many newest checkpoints; 0 keeps all."""
    resume: bool = True
    """Resume from the newest checkpoint in save_dir when one exists."""
    load_dir: str | None = None
    """Initialise the model from this checkpoint (any tp/pp layout) when not resuming: the SFT checkpoint for RM
    and DPO (a reward/critic head is then new), the RM checkpoint for a critic."""
    save_optimizer: bool = True
    """Store optimizer state (needed for exact resume)."""
    verify_integrity: bool = True
    """Check every checkpoint file read against the sha256 its save recorded (sizes are checked either way)."""
    allow_config_change: bool = False
    """Resume even when settings that change the run's math (schedule length, batch sizes, seed, model, optimizer,
    losses, data) differ from the checkpoint's; the changes are logged. Off: such a resume is refused."""

    def __post_init__(self) -> None:
        if self.save_interval < 0 or self.keep_last < 0:
            raise ConfigError("checkpoint.save_interval and checkpoint.keep_last must be >= 0")


@dataclass
class LoggingConfig:
    """Metrics and console output."""

    log_interval: int = 1
    """Write metrics every this many steps."""
    metrics_file: str | None = None
    """jsonl metrics file; None means <output_dir>/metrics.jsonl."""
    progress_bar: bool = True
    """Show a progress bar on rank 0 (off automatically when stderr is not a terminal)."""
    tensorboard: bool = True
    """Also write the metrics as TensorBoard scalars under <output_dir>/tensorboard when tensorboard is installed."""

    def __post_init__(self) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"logging.log_interval must be >= 1, got {self.log_interval}")


@dataclass
class RunConfig:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone shape and flavour."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/DP layout."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input data and tokenizer."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Batch sizes, steps, precision."""
    generation: GenerationSection = field(default_factory=GenerationSection)
    """Sampling settings."""
    rm: RMSection = field(default_factory=RMSection)
    """Reward-model loss."""
    dpo: DPOSection = field(default_factory=DPOSection)
    """DPO loss and reference handling."""
    ppo: PPOSection = field(default_factory=PPOSection)
    """PPO / GRPO / RLOO / REINFORCE++ settings."""
    critic_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings of the PPO critic (the actor uses ``optimizer``)."""
    critic_scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule of the PPO critic (the actor uses ``scheduler``)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics output."""

    def __post_init__(self) -> None:
        m, p = self.model, self.parallel
        if m.num_attention_heads % p.tp:
            raise ConfigError(f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by parallel.tp ({p.tp})")
        if m.query_groups % p.tp:
            raise ConfigError(f"model.num_query_groups ({m.query_groups}) must be divisible by parallel.tp ({p.tp})")
        if m.ffn_size % p.tp:
            raise ConfigError(f"model.ffn_hidden_size ({m.ffn_size}) must be divisible by parallel.tp ({p.tp})")
        if m.make_vocab_size_divisible_by % p.tp:
            raise ConfigError(
                f"model.make_vocab_size_divisible_by ({m.make_vocab_size_divisible_by}) must be divisible by "
                f"parallel.tp ({p.tp}) so the padded vocabulary splits evenly"
            )
        if self.ppo.truncation == "overlong" and self.ppo.overlong_buffer > self.generation.max_new_tokens:
            raise ConfigError(f"ppo.overlong_buffer ({self.ppo.overlong_buffer}) must not exceed "
                              f"generation.max_new_tokens ({self.generation.max_new_tokens})")  # fmt: skip
        from mrlhf.parallel.topology import layers_per_stage

        try:
            layers_per_stage(m.num_layers, p.pp, p.first_stage_layers, p.last_stage_layers)
        except ValueError as e:
            raise ConfigError(f"parallel.pp={p.pp} with model.num_layers={m.num_layers}: {e}") from None
        if self.data.max_seq_len > m.max_position_embeddings:
            raise ConfigError(
                f"data.max_seq_len ({self.data.max_seq_len}) exceeds model.max_position_embeddings "
                f"({m.max_position_embeddings})"
            )

    def validate_world(self, world_size: int, stage: str = "") -> int:
        """Check the layout against the number of processes; return the data-parallel size. ``stage`` 'ppo' checks
        the PPO batch arithmetic (prompts per DP rank, samples, minibatches, microbatches) instead; 'generate' none."""
        tp, pp = self.parallel.tp, self.parallel.pp
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        if world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp = {tp * pp}")
        dp = world_size // (tp * pp)
        t = self.training
        if stage == "ppo":
            self.validate_ppo_batches(dp)
            return dp
        if stage == "generate":  # no training batches (a PPO checkpoint's config counts prompts, not sequences)
            return dp
        if t.global_batch_size % (dp * t.micro_batch_size):
            raise ConfigError(
                f"training.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"dp ({dp}) x training.micro_batch_size ({t.micro_batch_size})"
            )
        return dp

    def validate_ppo_batches(self, dp: int) -> None:
        """PPO: every DP rank gets whole prompts, whole minibatches and whole microbatches (no empty accumulation)."""
        t, p = self.training, self.ppo
        if t.global_batch_size % dp:
            raise ConfigError(
                f"training.global_batch_size ({t.global_batch_size} prompts per PPO iteration) must be a multiple of dp ({dp})"
            )
        per_rank = t.global_batch_size // dp * p.n_samples
        if per_rank % p.num_minibatches or (per_rank // p.num_minibatches) % t.micro_batch_size:
            raise ConfigError(
                f"PPO: {t.global_batch_size} prompts x ppo.n_samples {p.n_samples} / dp {dp} = {per_rank} sequences per "
                f"rank must split into ppo.num_minibatches ({p.num_minibatches}) minibatches of whole microbatches "
                f"(training.micro_batch_size {t.micro_batch_size})"
            )
        if p.ptx_coef > 0 and p.ptx_batch_size % dp:
            raise ConfigError(f"ppo.ptx_batch_size ({p.ptx_batch_size}) must be a multiple of dp ({dp})")

    @property
    def save_dir(self) -> str:
        return self.checkpoint.save_dir or os.path.join(self.training.output_dir, "checkpoints")

    @property
    def metrics_file(self) -> str:
        return self.logging.metrics_file or os.path.join(self.training.output_dir, "metrics.jsonl")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_transformer_config(self):
        """megatron-core TransformerConfig for this run's backbone and layout."""
        import torch
        import torch.nn.functional as F
        from megatron.core.transformer.transformer_config import TransformerConfig

        from mrlhf.activations import gelu_tanh

        m, p = self.model, self.parallel
        dtype = torch.bfloat16 if self.training.precision == "bf16" else torch.float32
        llama = m.flavour == "llama"
        return TransformerConfig(
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            num_attention_heads=m.num_attention_heads,
            num_query_groups=m.query_groups,
            ffn_hidden_size=m.ffn_size,
            kv_channels=m.hidden_size // m.num_attention_heads,
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            num_layers_in_first_pipeline_stage=p.first_stage_layers if p.pp > 1 else None,
            num_layers_in_last_pipeline_stage=p.last_stage_layers if p.pp > 1 else None,
            normalization="RMSNorm" if llama else "LayerNorm",
            layernorm_epsilon=m.norm_epsilon,
            gated_linear_unit=llama,
            activation_func=F.silu if llama else gelu_tanh,
            add_bias_linear=not llama,
            add_qkv_bias=m.has_qkv_bias,
            hidden_dropout=m.hidden_dropout,
            attention_dropout=m.attention_dropout,
            init_method_std=m.init_std,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            use_cpu_initialization=True,
            perform_initialization=False,  # mrlhf.models.backbone.init_weights does it, layout-invariantly
            gradient_accumulation_fusion=False,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_range(
    section: str, obj: Any, bounds: dict[str, tuple[float, float]], low_open: bool = False, high_open: bool = False
) -> None:
    """Each named field is a finite number within its (low, high) bounds, open at the ends said; NaN fails every
    comparison, so without this a ``.nan`` would pass checks written as ``if x <= 0: raise``."""
    for name, (low, high) in bounds.items():
        v = getattr(obj, name)
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ConfigError(f"{section}.{name} must be a finite number in {interval}, got {v}")


# ----------------------------------------------------------------------------------------------------------------------
# Building configs from dicts, YAML files and overrides


def _build(cls: type, data: dict[str, Any], where: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (valid keys under '{where or 'top level'}': "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key, source)
        else:
            kwargs[name] = _coerce(value, hint, key, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check a scalar against its annotation (str, int, float, bool, optionally ``| None``)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else []
    optional = union and type(None) in typing.get_args(hint)
    base = args[0] if args else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{key}' must not be null")
    if typing.get_origin(base) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(base)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if base is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(base, True)
    if not ok:
        name = getattr(base, "__name__", str(base))
        raise ConfigError(f"{source}: '{key}' must be {name}, got {type(value).__name__} {value!r}")
    if base is float and not math.isfinite(float(value)):  # YAML's .nan / .inf reach here as floats
        raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
    return float(value) if base is float else value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = path.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (optional) and apply dotted overrides; every error is a ConfigError."""
    data: dict[str, Any] = {}
    source = "config"
    if path:
        source = path
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        _resolve_relative_paths(data, os.path.dirname(os.path.abspath(path)))
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} (with overrides)"
    return _build(RunConfig, data, "", source)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a nested dict (e.g. one stored in a checkpoint)."""
    return _build(RunConfig, data, "", "config")


def _resolve_relative_paths(data: dict[str, Any], base: str) -> None:
    """Paths in data.* (and the path part of 'name:ratio:path' sources) starting with './' or '../' are taken
    relative to the YAML file."""

    def fix(value: str) -> str:
        prefix, _, path = value.rpartition(":") if value.count(":") >= 2 else ("", "", value)
        if path.startswith(("./", "../")):
            path = os.path.normpath(os.path.join(base, path))
        return f"{prefix}:{path}" if prefix else path

    section = data.get("data")
    if isinstance(section, dict):
        for key, value in section.items():
            if isinstance(value, str):
                section[key] = fix(value)
            elif isinstance(value, list):
                section[key] = [fix(v) if isinstance(v, str) else v for v in value]
