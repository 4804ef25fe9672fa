"""Distributed tests fork their ranks from this process: import the heavy modules once, keep torch on 1 thread."""

import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)

import megatron.core.models.gpt  # noqa: E402,F401
from megatron.core import dist_checkpointing  # noqa: E402,F401

import mrlhf.trainers.sft  # noqa: E402,F401
