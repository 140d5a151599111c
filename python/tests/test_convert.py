"""nibble.convert on the sample checkpoint: plan, conversion, and the result read back by nibble
and by the `safetensors` package."""
import numpy as np
import pytest
import safetensors.numpy as stnp

import nibble
from conftest import call_or_skip


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "sample.safetensors"
    nibble.write_sample_checkpoint(path, hidden=256, rank=16)
    return path


def test_dry_run_writes_nothing(sample, tmp_path):
    plan = call_or_skip(nibble.convert, sample, tmp_path / "o.safetensors",
                        rules=["txt_mod\\.1=awq_w4a16"], dry_run=True)
    names = [l["name"] for l in plan["layers"]]
    assert any("txt_mod.1" in n for n in names), names
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_awq_layer(sample, tmp_path, rng):
    out = tmp_path / "o.safetensors"
    seen = []
    report = call_or_skip(nibble.convert, sample, out, rules=["txt_mod\\.1=awq_w4a16"],
                          progress=seen.append)
    assert isinstance(report, dict) and seen and seen[-1]["index"] == seen[-1]["total"]
    src, dst = nibble.load(sample), nibble.load(out)
    name = next(n for n in dst.names() if n.endswith("txt_mod.1"))
    assert src[name].format != "awq_w4a16" and dst[name].format == "awq_w4a16"
    # the converted weight stays close to the float one: 4-bit codes, per-group scale and zero
    w0, w1 = src[name].dequantize(), dst[name].dequantize()
    rel = np.linalg.norm(w1 - w0) / np.linalg.norm(w0)
    assert rel < 0.15, rel
    # every tensor nibble wrote is readable by the safetensors package, bytes identical
    ours = nibble.load_file(out)
    theirs = stnp.load_file(str(out))
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k].tobytes() == theirs[k].tobytes(), k


def test_convert_errors(sample, tmp_path):
    with pytest.raises(ValueError):
        call_or_skip(nibble.convert, sample, tmp_path / "o.safetensors", rules=["txt_mod=nope"])
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(ValueError):
        call_or_skip(nibble.convert, tmp_path / "missing.safetensors", tmp_path / "o2.safetensors",
                     format="awq_w4a16")
