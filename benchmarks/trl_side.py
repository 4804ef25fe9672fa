"""TRL's side of benchmarks/ppo_vs_trl.py: seconds per PPO iteration / GRPO step of TRL's own trainers.

Runs under the separate TRL venv (``bash scripts/setup_trl_bench.sh`` makes it)::

    .venv-trl/bin/python benchmarks/trl_side.py --algo ppo --iterations 5 --warmup 1 --threads 2
    .venv-trl/bin/python benchmarks/trl_side.py --algo grpo --iterations 5 --warmup 1 --threads 2

and prints ONE JSON line on stdout (everything TRL/transformers print goes to stderr)::

    {"algo", "trl_version", "transformers_version", "torch_version", "seconds_per_iteration", "std",
     "generation_share", "iterations", "warmup", "threads", "batch", ...}

Shape (the same on the mrlhf side): GPT-2 shaped, 4 layers, hidden 256, 4 heads, vocab 8000, random init, no dropout,
fp32 on CPU, ``torch.set_num_threads(threads)``; prompts are random token ids, exactly 32 long (no padding); exactly 64
sampled tokens per response (temperature 1, top_k 0, top_p 1): the EOS/pad id is 8000, one past the model's vocab, so
no response can stop early or be masked, and every iteration checks that all 64 tokens were generated.
TRL's PPOConfig/GRPOConfig default to bf16=True and gradient_checkpointing=True; both are turned off here (fp32, and
mrlhf recomputes no activations). Everything else is TRL's default: AdamW (adamw_torch_fused), linear LR decay, no
weight decay; GRPO (HF Trainer loop) clips gradients at max_grad_norm 1.0, TRL's PPO loop clips none.
Nothing is downloaded: models come from a GPT2Config, the tokenizer is a WordLevel ``tokenizers`` one over "t0".."t7999"
(+ "<eos>" = 8000), datasets are made in memory; HF_HUB_OFFLINE=1, report_to none, no checkpoints.

PPO (``trl.experimental.ppo.PPOTrainer``): 16 prompts per iteration (per_device_train_batch_size 16, one process,
gradient_accumulation_steps 1), num_ppo_epochs 1, num_mini_batches 1, response_length 64, stop_token None,
kl_coef 0.05 (k1, in the reward), GAE gamma 1 lambda 0.95, no eval sample generations. Policy GPT2LMHeadModel, value and
reward model GPT2ForSequenceClassification(num_labels=1), all random; the reference is TRL's own copy of the policy.
One TRL PPO iteration = sampling 16 x 64 tokens (HF ``generate`` with KV cache, ``output_scores=True``: the rollout
log-probs come from the generation scores, no separate policy forward), one reference forward, one value forward and
one reward forward over the 96-token sequences, KL-penalised rewards, GAE (a python loop over the 64 positions),
advantage whitening, then one joint policy+value forward/backward and one AdamW step (a single optimizer over both),
plus TRL's metrics, ``gc.collect()`` and the scheduler step.

GRPO (``trl.GRPOTrainer``): "batch 16" is taken as 16 completions per optimizer step = 4 prompts x 4 generations
(num_generations 4, per_device_train_batch_size 16, steps_per_generation 1, num_iterations 1), so each step samples
and trains on the same 16 x (32 + 64) tokens as a PPO iteration. ``--grpo-prompts`` / ``--num-generations`` change it
(e.g. 16 x 4 = 64 completions). beta (KL to the reference, k3 in the loss) is 0.05 by default, so the step includes a
reference forward like PPO's (TRL's default beta 0 would skip it; ``--grpo-beta 0`` gives that). For beta > 0 TRL
builds the reference from the policy's checkpoint path, so the random policy is saved to a temporary folder and both
are loaded from it (local files only). The reward is a trivial python function of the completion token ids (share of
even ids), so it costs ~nothing. One TRL GRPO step = sampling 4 x 4 prompts x 64 tokens (HF ``generate``), one
reference forward (beta > 0), the reward function, group-normalised advantages (loss_type "dapo"), then one policy
forward/backward and one AdamW step. With num_iterations 1 TRL computes no "old" log-probs (the ratio is 1 by
construction) -- an implementation that does an extra rollout forward for them does more work than TRL here.

Timing: a TrainerCallback stamps ``time.perf_counter()`` at on_train_begin and at every on_step_end; an iteration is
the interval between two stamps (TRL's PPO loop never calls on_step_begin, so both algorithms use end-to-end intervals,
which include the data-loader fetch and TRL's own per-step bookkeeping). The first ``--warmup`` intervals are dropped;
the trainer runs exactly warmup + iterations steps. Generation share = time inside the policy's ``generate`` (the
instance method is wrapped with a timer) / iteration time, over the timed iterations. ``cpu_seconds_per_iteration``
(process CPU time, all threads) and the 1-minute load average tell whether other jobs shared the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
warnings.filterwarnings("ignore")

VOCAB = 8000
EOS = VOCAB  # one past the model's vocab: never sampled, so no early stop and no masked token
PROMPT_LEN = 32
RESPONSE_LEN = 64
LAYERS, HIDDEN, HEADS = 4, 256, 4


def model_config():
    """No special ids in the model config: the tokenizer's EOS/pad (8000, outside the vocab) is what TRL uses."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB, n_positions=1024, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, num_labels=1,
    )  # fmt: skip


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    vocab["<eos>"] = EOS
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<eos>")


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n, PROMPT_LEN), generator=g).tolist()


class StepTimer:
    """perf_counter stamps at train begin and every step end; generation time accumulated per step."""

    def __init__(self):
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []  # process CPU time: less sensitive than wall time to a shared CPU
        self.gen_per_step: list[float] = []
        self._gen = 0.0
        self.bad_lengths: list[int] = []

    def wrap_generate(self, model, prompt_len: int):
        inner = model.generate

        def generate(*a, **kw):
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            self._gen += time.perf_counter() - t0
            seqs = out.sequences if hasattr(out, "sequences") else out
            if seqs.shape[1] != prompt_len + RESPONSE_LEN or bool((seqs[:, prompt_len:] >= VOCAB).any()):
                self.bad_lengths.append(int(seqs.shape[1]) - prompt_len)
            return out

        model.generate = generate

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timer.stamps.append(time.perf_counter())
                timer.cpu_stamps.append(time.process_time())
                timer._gen = 0.0

            def on_step_end(self, args, state, control, **kw):
                timer.stamps.append(time.perf_counter())
                timer.cpu_stamps.append(time.process_time())
                timer.gen_per_step.append(timer._gen)
                timer._gen = 0.0

        return _CB()

    def result(self, warmup: int) -> tuple[list[float], list[float], list[float]]:
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        cpu = [b - a for a, b in zip(self.cpu_stamps, self.cpu_stamps[1:])]
        return steps[warmup:], self.gen_per_step[warmup:], cpu[warmup:]


def as_run(model, args, clips_grads: bool) -> dict:
    """What the trainer really ran with (read back after train())."""
    return {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "optim": str(args.optim.value),
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "grad_clip": args.max_grad_norm if clips_grads else None}  # fmt: skip


def run_ppo(steps: int, timer: StepTimer, workdir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    cfg = model_config()
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(cfg)
    value = GPT2ForSequenceClassification(cfg)
    reward = GPT2ForSequenceClassification(cfg)
    tok = tokenizer()
    batch = 16
    train = Dataset.from_dict({"input_ids": random_prompts(batch * steps)})
    evald = Dataset.from_dict({"input_ids": random_prompts(batch, seed=1)})
    args = PPOConfig(
        output_dir=os.path.join(workdir, "ppo"), report_to="none", save_strategy="no", push_to_hub=False,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
        total_episodes=batch * steps, response_length=RESPONSE_LEN, stop_token=None, stop_token_id=None,
        temperature=1.0, local_rollout_forward_batch_size=batch, num_sample_generations=0, missing_eos_penalty=None,
        kl_coef=0.05, kl_estimator="k1", whiten_rewards=False, gamma=1.0, lam=0.95, cliprange=0.2, vf_coef=0.1,
        cliprange_value=0.2, learning_rate=1e-5, logging_steps=1, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = PPOTrainer(
        args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward, value_model=value,
        train_dataset=train, eval_dataset=evald, callbacks=[timer.callback()],
    )  # fmt: skip
    timer.wrap_generate(policy, PROMPT_LEN)
    trainer.train()
    return {"batch": {"prompts": batch, "completions": batch, "prompt_len": PROMPT_LEN, "response_len": RESPONSE_LEN},
            "settings": {"num_ppo_epochs": 1, "num_mini_batches": 1, "kl_coef": 0.05, "temperature": 1.0,
                         **as_run(policy, args, clips_grads=False)}}  # fmt: skip


def run_grpo(steps: int, timer: StepTimer, workdir: str, prompts: int, generations: int, beta: float) -> dict:
    import torch
    from datasets import Dataset
    from transformers import GPT2LMHeadModel
    from trl import GRPOConfig, GRPOTrainer

    cfg = model_config()
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(cfg)
    tok = tokenizer()
    completions = prompts * generations
    text = [" ".join(f"t{i}" for i in p) for p in random_prompts(prompts * steps)]
    train = Dataset.from_dict({"prompt": text})

    def even_share(completions, completion_ids, **kw):  # trivial, ~free reward
        return [sum(1 for t in ids if t % 2 == 0) / max(1, len(ids)) for ids in completion_ids]

    model = policy
    if beta != 0.0:  # TRL builds the reference from the policy's path: give it a local one
        path = os.path.join(workdir, "policy")
        policy.save_pretrained(path)
        tok.save_pretrained(path)
        model = path
    args = GRPOConfig(
        output_dir=os.path.join(workdir, "grpo"), report_to="none", save_strategy="no", push_to_hub=False,
        per_device_train_batch_size=completions, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=generations, num_iterations=1, max_completion_length=RESPONSE_LEN, temperature=1.0,
        top_k=0, top_p=1.0, beta=beta, max_steps=steps, learning_rate=1e-5, logging_steps=1, use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0, seed=0, disable_tqdm=True, log_completions=False,
        model_init_kwargs={"dtype": torch.float32} if beta != 0.0 else None, shuffle_dataset=False,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=even_share, args=args, train_dataset=train, processing_class=tok,
        callbacks=[timer.callback()],
    )  # fmt: skip
    timer.wrap_generate(trainer.model, PROMPT_LEN)
    trainer.train()
    return {"batch": {"prompts": prompts, "num_generations": generations, "completions": completions,
                      "prompt_len": PROMPT_LEN, "response_len": RESPONSE_LEN},
            "settings": {"beta": beta, "num_iterations": 1, "loss_type": args.loss_type, "temperature": 1.0,
                         "reference_forward": trainer.ref_model is not None,
                         **as_run(trainer.model, args, clips_grads=True)}}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algo", choices=["ppo", "grpo"], required=True)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grpo-prompts", type=int, default=4, help="unique prompts per GRPO step (default 4)")
    ap.add_argument("--num-generations", type=int, default=4, help="completions per prompt in GRPO (default 4)")
    ap.add_argument("--grpo-beta", type=float, default=0.05, help="GRPO KL coefficient; 0 skips the reference")
    a = ap.parse_args(argv)
    if a.iterations < 1 or a.warmup < 0:
        ap.error("--iterations must be >= 1 and --warmup >= 0")

    import torch

    torch.set_num_threads(a.threads)
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    real_stdout = sys.stdout
    timer = StepTimer()
    steps = a.warmup + a.iterations
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as workdir, contextlib.redirect_stdout(sys.stderr):
        if a.algo == "ppo":
            extra = run_ppo(steps, timer, workdir)
        else:
            extra = run_grpo(steps, timer, workdir, a.grpo_prompts, a.num_generations, a.grpo_beta)
    if timer.bad_lengths:
        raise SystemExit(f"trl_side: responses of {sorted(set(timer.bad_lengths))} tokens, expected {RESPONSE_LEN}")
    its, gens, cpu = timer.result(a.warmup)
    if len(its) != a.iterations:
        raise SystemExit(f"trl_side: timed {len(its)} iterations, expected {a.iterations} (stamps {len(timer.stamps)})")
    out = {
        "algo": a.algo,
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seconds_per_iteration": statistics.fmean(its),
        "std": statistics.stdev(its) if len(its) > 1 else 0.0,
        "generation_share": sum(gens) / sum(its) if gens and sum(its) > 0 else None,
        "generation_seconds": statistics.fmean(gens) if gens else None,
        "iterations": a.iterations,
        "warmup": a.warmup,
        "threads": torch.get_num_threads(),
        "median": statistics.median(its),
        "min": min(its),
        "per_iteration": its,
        "generation_per_iteration": gens,
        "cpu_seconds_per_iteration": statistics.fmean(cpu),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **extra,
    }
    print(json.dumps(out), file=real_stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
