"""The streaming pieces of the conversion tools on their own: safetensors written tensor by tensor, boxes read from
a saved torch_dist checkpoint, and a producer that fails in the middle of a streamed save."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch.distributed import checkpoint as dcp

from mrlhf.convert.streaming import ChunkReader
from mrlhf.convert.tiny import tiny_hf_model
from mrlhf.convert.weights import SAFE, SAFE_INDEX, SafetensorsWriter
from mrlhf.errors import ConversionError


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, 3, generator=g).to(torch.float16),
        "d.scalar": torch.tensor(1.5),
        "e.ids": torch.arange(6, dtype=torch.int64).view(2, 3),
    }


def read_dir(path: str) -> dict[str, torch.Tensor]:
    names = [SAFE] if os.path.isfile(os.path.join(path, SAFE)) else sorted(
        set(json.load(open(os.path.join(path, SAFE_INDEX)))["weight_map"].values())
    )  # fmt: skip
    out = {}
    for name in names:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


@pytest.mark.parametrize("max_bytes", [10**9, 100])
def test_safetensors_writer_out_of_order_single_and_sharded(tmp_path, max_bytes):
    sd = tensors()
    writer = SafetensorsWriter(str(tmp_path), [(k, tuple(t.shape), t.dtype) for k, t in sd.items()], max_bytes)
    for key in reversed(list(sd)):  # any order: each tensor has its planned place
        writer.write(key, sd[key])
    files = writer.close()
    back = read_dir(str(tmp_path))
    assert back.keys() == sd.keys()
    for key, t in sd.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
    if max_bytes == 100:
        assert files[-1] == SAFE_INDEX and len(files) > 2
        index = json.load(open(tmp_path / SAFE_INDEX))
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    else:
        assert files == [SAFE]


def test_safetensors_writer_refuses_wrong_tensors_and_missing_ones(tmp_path):
    sd = tensors()
    writer = SafetensorsWriter(str(tmp_path), [(k, tuple(t.shape), t.dtype) for k, t in sd.items()], 10**9)
    with pytest.raises(ConversionError, match="planned"):
        writer.write("a.weight", sd["a.weight"].t().contiguous())
    with pytest.raises(ConversionError, match="planned"):
        writer.write("b.bias", sd["b.bias"].float())
    writer.write("a.weight", sd["a.weight"])
    with pytest.raises(ConversionError, match="never written: \\['b.bias'"):
        writer.close()


def test_chunk_reader_reads_any_box(tmp_path):
    full = {"w": torch.randn(6, 10), "stack": torch.randn(3, 4, 5).to(torch.bfloat16)}
    dcp.save(full, checkpoint_id=str(tmp_path), no_dist=True)
    reader = ChunkReader(str(tmp_path))
    assert reader.shape("w") == (6, 10) and reader.shape("stack") == (3, 4, 5)
    assert torch.equal(reader.read("w", (0, 0), (6, 10)), full["w"])
    assert torch.equal(reader.read("w", (2, 3), (3, 7)), full["w"][2:5, 3:10])
    got = reader.read("stack", (1, 0, 2), (1, 4, 3))
    assert got.dtype == torch.bfloat16 and torch.equal(got, full["stack"][1:2, :, 2:5])
    with pytest.raises(ConversionError, match="has shape \\[6, 10\\]; cannot read \\[4:8, 0:10\\]"):
        reader.read("w", (4, 0), (4, 10))
    with pytest.raises(ConversionError, match="no tensor 'missing'"):
        reader.read("missing", (0,), (1,))


def test_a_read_failing_mid_save_is_a_clean_error_and_leaves_nothing(tmp_path, monkeypatch):
    """A parameter whose HF data cannot be read while the streamed save is under way (the ranks fork with the
    patched reader): the user gets the reader's one-line error, not a writer traceback, and no output."""
    import mrlhf.convert.import_hf as import_hf

    real = import_hf.local_shard

    def flaky(recipe, *args, **kwargs):
        if recipe.pieces[0].key.endswith("layers.1.mlp.down_proj.weight"):
            raise ConversionError("model-00002.safetensors: cannot read tensor (simulated I/O error)")
        return real(recipe, *args, **kwargs)

    monkeypatch.setattr(import_hf, "local_shard", flaky)
    tiny_hf_model("llama", str(tmp_path / "hf"), layers=2)
    with pytest.raises(ConversionError) as err:
        import_hf.convert_hf_to_mrlhf(str(tmp_path / "hf"), str(tmp_path / "out"), tp=2)
    assert str(err.value) == "model-00002.safetensors: cannot read tensor (simulated I/O error)"
    assert sorted(os.listdir(tmp_path)) == ["hf"]
