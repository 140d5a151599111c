"""nibble.save_conditioning / load_conditioning / save_latent / load_latent (the files of `nibble run`)."""
import numpy as np
import pytest

import nibble


def test_latent_round_trip_and_marker(tmp_path, rng):
    x = rng.standard_normal((1, 16, 1, 6, 8)).astype(np.float32)
    p = tmp_path / "a.latent"
    nibble.save_latent(p, {"samples": x})
    raw = nibble.load_file(p)
    assert set(raw) == {"latent_tensor", "latent_format_version_0"}  # what ComfyUI's LoadLatent reads
    assert raw["latent_format_version_0"].shape == (0,)
    y = nibble.load_latent(p)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    # the safetensors package reads it like ComfyUI does
    import safetensors.numpy as safetensors  # a required test dependency (scripts/test_python.sh)
    d = safetensors.load_file(str(p))
    np.testing.assert_array_equal(d["latent_tensor"], x)


def test_latent_errors_name_the_file(tmp_path, rng):
    old = tmp_path / "old.latent"
    nibble.save_file({"latent_tensor": np.zeros((1, 4, 8, 8), np.float32)}, old)
    with pytest.raises(nibble.Error, match=r"old\.latent.*latent_format_version_0.*0\.18215"):
        nibble.load_latent(old)
    four = tmp_path / "four.latent"
    nibble.save_latent(four, np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(nibble.Error, match=r"four\.latent.*expected 16 latent channels.*got 4"):
        nibble.load_latent(four)
    assert nibble.load_latent(four, channels=0).shape == (1, 4, 8, 8)
    other = tmp_path / "other.safetensors"
    nibble.save_file({"samples": np.zeros((1, 16, 8, 8), np.float32)}, other)
    with pytest.raises(nibble.Error, match=r"other\.safetensors.*latent_tensor"):
        nibble.load_latent(other)
    with pytest.raises(nibble.Error, match=r"save_latent.*\(B, C, H, W\)"):
        nibble.save_latent(tmp_path / "bad.latent", np.zeros((16, 8), np.float32))
    assert not (tmp_path / "bad.latent").exists()


def test_conditioning_from_comfyui_list(tmp_path, rng):
    ctx = rng.standard_normal((1, 7, 3584)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0, 0]], np.int64)
    ref = rng.standard_normal((1, 16, 1, 4, 4)).astype(np.float32)
    cond = [[ctx, {"pooled_output": None, "attention_mask": mask, "reference_latents": [ref]}]]
    p = tmp_path / "pos.safetensors"
    nibble.save_conditioning(p, cond)
    d = nibble.load_conditioning(p)
    np.testing.assert_array_equal(d["context"], ctx)
    np.testing.assert_array_equal(d["attention_mask"], mask.astype(np.uint8))
    assert len(d["reference_latents"]) == 1
    np.testing.assert_array_equal(d["reference_latents"][0], ref)
    raw = nibble.load_file(p)
    assert set(raw) == {"context", "attention_mask", "reference_latents.0"}


def test_conditioning_from_array_2d_and_bf16(tmp_path, rng):
    import ml_dtypes  # required by nibble itself (bf16 arrays)
    ctx = rng.standard_normal((5, 3584)).astype(ml_dtypes.bfloat16)
    p = tmp_path / "c.safetensors"
    nibble.save_conditioning(p, ctx)
    d = nibble.load_conditioning(p)
    assert d["context"].shape == (1, 5, 3584) and d["context"].dtype == np.float32
    np.testing.assert_array_equal(d["context"][0], ctx.astype(np.float32))
    assert d["attention_mask"] is None and d["reference_latents"] == []


def test_conditioning_errors(tmp_path, rng):
    with pytest.raises(nibble.Error, match=r"w\.safetensors.*3584.*got 4096"):
        nibble.save_conditioning(tmp_path / "w.safetensors", np.zeros((1, 3, 4096), np.float32))
    assert not (tmp_path / "w.safetensors").exists()
    with pytest.raises(nibble.Error, match=r"attention_mask.*\(1, 3\)"):
        nibble.save_conditioning(tmp_path / "m.safetensors", np.zeros((1, 3, 3584), np.float32),
                                 attention_mask=np.ones((1, 4)))
    two = [[np.zeros((1, 3, 3584), np.float32), {}], [np.zeros((1, 3, 3584), np.float32), {}]]
    with pytest.raises(nibble.Error, match="2 entries"):
        nibble.save_conditioning(tmp_path / "two.safetensors", two)
    with pytest.raises(nibble.Error, match="float"):
        nibble.save_conditioning(tmp_path / "i.safetensors", np.zeros((1, 3, 3584), np.int32))
    nibble.save_file({"cond": np.zeros((1, 3, 3584), np.float32)}, tmp_path / "n.safetensors")
    with pytest.raises(nibble.Error, match=r"n\.safetensors.*'context'"):
        nibble.load_conditioning(tmp_path / "n.safetensors")


def test_torch_tensors(tmp_path):
    """Opt-in: runs only where torch is installed (not in `make test`'s venv)."""
    torch = pytest.importorskip("torch", reason="torch is optional (several GB, not in `make test`'s venv); "
                                                "the numpy paths are tested above")
    ctx = torch.randn(1, 4, 3584, dtype=torch.bfloat16)
    nibble.save_conditioning(tmp_path / "t.safetensors", [[ctx, {"attention_mask": torch.ones(1, 4, dtype=torch.bool)}]])
    d = nibble.load_conditioning(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(d["context"], ctx.float().numpy())
    lat = torch.randn(1, 16, 1, 8, 8)
    nibble.save_latent(tmp_path / "t.latent", {"samples": lat})
    np.testing.assert_array_equal(nibble.load_latent(tmp_path / "t.latent"), lat.numpy())
