"""nibble.import_checkpoint / nibble.load(loras=...) / nibble.apply_loras (docs/import.md, docs/lora.md)."""
import os

import numpy as np
import pytest

import nibble

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data")


def test_import_autoawq_and_nunchaku(tmp_path):
    r = nibble.import_checkpoint("autoawq", os.path.join(DATA, "import_autoawq.safetensors"), tmp_path / "a.safetensors")
    assert r["format"] == "autoawq" and len(r["layers"]) == 2
    assert r["zeros"]["total"] == 512
    m = nibble.load(tmp_path / "a.safetensors")
    x = np.ones((2, 256), np.float32) / 64
    assert m.layers["model.layers.0.self_attn.q_proj"](x).shape == (2, 192)
    r = nibble.import_checkpoint("nunchaku", os.path.join(DATA, "import_nunchaku_qwen.safetensors"), tmp_path / "n.safetensors")
    names = {l["name"] for l in r["layers"]}
    assert "transformer_blocks.0.attn.to_k" in names and "transformer_blocks.0.img_mod.1" in names
    with pytest.raises(nibble.Error, match="qzeros"):
        nibble.import_checkpoint("autoawq", os.path.join(DATA, "import_nunchaku_qwen.safetensors"), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_import_nunchaku_flux(tmp_path):
    src = os.path.join(DATA, "import_nunchaku_flux.safetensors")
    for linear2, fmt in (("svdquant", "svdquant_w4a4"), ("bf16", "bf16")):
        out = tmp_path / (linear2 + ".safetensors")
        r = nibble.import_checkpoint("nunchaku", src, out, flux_linear2=linear2)
        assert r["arch"] == "flux"
        layers = {l["name"]: l for l in r["layers"]}
        assert layers["single_blocks.0.linear1"]["out_features"] == 896
        assert layers["single_blocks.0.linear2"]["format"] == fmt
        m = nibble.load(out)
        x = np.ones((2, 640), np.float32) / 64
        assert m.layers["single_blocks.0.linear2"](x).shape == (2, 128)
    with pytest.raises(nibble.Error, match="svdquant or bf16"):
        nibble.import_checkpoint("nunchaku", src, tmp_path / "x.safetensors", flux_linear2="fp8")
    assert not (tmp_path / "x.safetensors").exists()


def test_lora_at_load_and_baked(tmp_path, rng):
    nibble.import_checkpoint("nunchaku", os.path.join(DATA, "import_nunchaku_qwen.safetensors"), tmp_path / "n.safetensors")
    down = (rng.standard_normal((16, 192)) * 0.05).astype(np.float32)
    up = (rng.standard_normal((192, 16)) * 0.05).astype(np.float32)
    lora = tmp_path / "l.safetensors"
    nibble.save_file({"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": down,
                      "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": up}, lora)
    base = nibble.load(tmp_path / "n.safetensors")
    with_lora = nibble.load(tmp_path / "n.safetensors", loras=[(lora, 0.5)])
    x = (rng.integers(-64, 64, (3, 192)) / 64).astype(np.float32)
    name = "transformer_blocks.0.attn.to_out.0"
    got = with_lora.layers[name](x) - base.layers[name](x)
    ref = 0.5 * (x @ down.T) @ up.T  # factors are bf16-rounded in the branch: compare loosely
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=2e-2)
    st = nibble.apply_loras(tmp_path / "n.safetensors", [(lora, 0.5)], tmp_path / "baked.safetensors")
    assert st["svdquant_layers"] == 1 and st["max_rank_after"] == 48
    baked = nibble.load(tmp_path / "baked.safetensors")
    np.testing.assert_array_equal(baked.layers[name](x), with_lora.layers[name](x))
