"""A checkpoint written by Transformer Engine layers (fused-norm key names) loads into local layers at any TP layout,
and the HF exporter reads it: the key maps of models/keymap.py on the load and the streaming paths."""

import os

import torch
from harness import run_ranks
from te_runs import load_into_local, save_te_named
from test_ppo import shard

from mrlhf.convert.streaming import ChunkReader


def test_te_named_checkpoint_loads_into_local_layers_and_exports(tmp_path):
    out = str(tmp_path / "ckpt")
    (saved,) = run_ranks(save_te_named, 1, out)
    role_dir = os.path.join(out, "step_00000001", "actor")
    keys = set(ChunkReader(role_dir).tensors)
    assert "backbone.decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys  # really TE's naming on disk
    assert not any("input_layernorm" in k for k in keys)
    reader = ChunkReader(role_dir)  # the exporter's reader answers to the local name
    local_key = "backbone.decoder.layers.input_layernorm.weight"
    shape = reader.shape(local_key)
    stored = reader.read(local_key, (0,) * len(shape), shape)
    assert torch.equal(stored[0], saved["backbone.decoder.layers.0.input_layernorm.weight"])
    for layout, world in (({}, 1), ({"tp": 2}, 2)):
        for r in run_ranks(load_into_local, world, out, layout):
            assert r["meta_impl"] == {"actor": "te"}
            assert len(r["params"]) == len(saved)
            for name, (got, split, dim) in r["params"].items():
                want = shard(saved[f"backbone.{name}"], split, dim, name, r["tp"], r["tp_rank"])
                assert torch.equal(got, want), (name, layout)
