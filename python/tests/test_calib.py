"""nibble.calib.Recorder: statistics recorded from forward passes, read by `nibble convert --calib`.

The numpy-driven path (``record``) runs by default; the torch hooks only when torch is installed
(opt-in: the default test venv has no torch)."""
import numpy as np
import pytest

import nibble
import nibble.calib


def test_record_stats_sample_and_mask(tmp_path):
    rng = np.random.default_rng(0)
    rec = nibble.calib.Recorder(None, sample_rows=100, seed=3)
    chunks = []
    for c in range(8):  # 8 calls × (2, 50) tokens; the value of channel 0 is the global row number
        x = rng.standard_normal((2, 50, 64)).astype(np.float32)
        x[..., 0] = np.arange(c * 100, c * 100 + 100).reshape(2, 50)
        mask = np.ones((2, 50), bool)
        mask[1, 40:] = False  # padding tokens of the second sequence
        rec.record("blk.attn.to_q", x, mask=mask)
        chunks.append(x[mask])
    rows = np.concatenate(chunks)
    st = rec.stats()["blk.attn.to_q"]
    assert st["sample"].shape == (100, 64)  # exactly as many rows as asked
    np.testing.assert_allclose(st["max_abs"], np.abs(rows).max(0), rtol=1e-6)
    np.testing.assert_allclose(st["mean_abs"], np.abs(rows).mean(0), rtol=1e-5)
    np.testing.assert_allclose(st["mean_sq"], np.square(rows).mean(0), rtol=1e-5)
    np.testing.assert_allclose(st["min"], rows.min(0))
    ids = st["sample"][:, 0].astype(int)
    assert len(set(ids)) == 100  # no row twice
    assert not any((i % 100) >= 90 for i in ids)  # masked rows never recorded
    assert ids.max() >= 500 and ids.min() < 300  # from all over the run, not its start
    path = tmp_path / "calib.safetensors"
    rec.save(path)
    back = nibble.load_file(path)
    assert set(back) == {f"blk.attn.to_q.{k}" for k in ("max_abs", "mean_abs", "mean_sq", "min", "max", "sample")}
    assert nibble.read_metadata(path)["format"] == "nibble_calib_v1"


def _bert_like(path, H=128):
    rng = np.random.default_rng(1)
    t = {"embeddings.word_embeddings.weight": rng.standard_normal((256, H)).astype(np.float32)}
    for n, (N, K) in {"attention.self.query": (H, H), "attention.self.key": (H, H),
                      "attention.self.value": (H, H), "attention.output.dense": (H, H)}.items():
        t[f"encoder.layer.0.{n}.weight"] = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
        t[f"encoder.layer.0.{n}.bias"] = np.zeros(N, np.float32)
    nibble.save_file(t, path)


def test_recorded_file_drives_convert(tmp_path):
    src = tmp_path / "m.safetensors"
    _bert_like(src)
    rng = np.random.default_rng(2)
    with nibble.calib.Recorder(None, tmp_path / "c.safetensors", sample_rows=64) as rec:
        for _ in range(4):
            rec.record("encoder.layer.0.attention.self.query", rng.standard_normal((32, 128)).astype(np.float32))
    report = nibble.convert(src, tmp_path / "o.safetensors", rules=[r"attention\.self=svdquant_w4a4:rank=8"],
                          calib=tmp_path / "c.safetensors")
    layers = {l["name"]: l for l in report["layers"]}
    assert len(layers) == 3  # query / key / value, one shared input
    for l in layers.values():
        assert l["calib"] == "encoder.layer.0.attention.self.query"
        assert l["calibration_sample_rows"] == 64
        assert l["snr_db_after"] is not None
    # the catch-all format leaves the embedding table alone
    plan = nibble.convert(src, None, format="svdquant_w4a4", dry_run=True)
    assert all("embeddings" not in l["name"] for l in plan["layers"])
    assert any("embedding table" in s["reason"] for s in plan["skipped"])


def test_rule_matching_nothing_raises(tmp_path):
    src = tmp_path / "m.safetensors"
    _bert_like(src)
    with pytest.raises(nibble.Error, match="matches no linear layer"):
        nibble.convert(src, tmp_path / "o.safetensors", preset="qwen-image")
    assert not (tmp_path / "o.safetensors").exists()


def test_torch_hooks(tmp_path):
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(64, 128)
            self.fc2 = torch.nn.Linear(128, 64)

        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    model = Block()
    with nibble.calib.Recorder(model, tmp_path / "c.safetensors", sample_rows=32, prefix="m.") as rec:
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(2, 16, 64))
    st = rec.stats()
    assert set(st) == {"m.fc1", "m.fc2"}
    assert st["m.fc1"]["sample"].shape == (32, 64) and st["m.fc2"]["sample"].shape == (32, 128)
    assert st["m.fc2"]["min"].min() >= -0.2  # post-GELU inputs
    assert rec.layers["m.fc1"].count == 96
