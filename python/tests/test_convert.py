"""nibble.convert on the sample checkpoint: plan, conversion, and the result read back by nibble
and by the `safetensors` package."""
import errno

import numpy as np
import pytest
from safetensors import safe_open

import nibble
from test_io import raw_header


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "sample.safetensors"
    nibble.write_sample_checkpoint(path, hidden=256, rank=16)
    return path


def test_dry_run_writes_nothing(sample, tmp_path):
    plan = nibble.convert(sample, tmp_path / "o.safetensors",
                          rules=["txt_mod\\.1=awq_w4a16"], dry_run=True)
    names = [l["name"] for l in plan["layers"]]
    assert any("txt_mod.1" in n for n in names), names
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_awq_layer(sample, tmp_path, rng):
    out = tmp_path / "o.safetensors"
    seen = []
    report = nibble.convert(sample, out, rules=["txt_mod\\.1=awq_w4a16"],
                            progress=seen.append)
    assert isinstance(report, dict) and seen and seen[-1]["index"] == seen[-1]["total"]
    src, dst = nibble.load(sample), nibble.load(out)
    name = next(n for n in dst.names() if n.endswith("txt_mod.1"))
    assert src[name].format != "awq_w4a16" and dst[name].format == "awq_w4a16"
    # the converted weight stays close to the float one: 4-bit codes, per-group scale and zero
    w0, w1 = src[name].dequantize(), dst[name].dequantize()
    rel = np.linalg.norm(w1 - w0) / np.linalg.norm(w0)
    assert rel < 0.15, rel
    # the file nibble wrote is read by the safetensors package with the same keys and bytes
    # (F8 tensors, which safetensors' numpy API cannot represent, are compared as raw bytes)
    ours = nibble.load_file(out)
    header, data = raw_header(out)
    assert sorted(ours) == sorted(k for k in header if k != "__metadata__")
    with safe_open(str(out), framework="np") as f:
        for k in ours:
            b, e = header[k]["data_offsets"]
            assert ours[k].tobytes() == data[b:e], k
            if not header[k]["dtype"].startswith("F8"):
                assert f.get_tensor(k).tobytes() == data[b:e], k


def test_convert_errors(sample, tmp_path):
    with pytest.raises(nibble.InputError) as ei:
        nibble.convert(sample, tmp_path / "o.safetensors", rules=["txt_mod=nope"])
    assert isinstance(ei.value, ValueError)
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(nibble.FileError) as ei:
        nibble.convert(tmp_path / "missing.safetensors", tmp_path / "o2.safetensors",
                       format="awq_w4a16")
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOENT
    assert not (tmp_path / "o2.safetensors").exists()


def test_convert_gptq_from_recorded_sample(sample, tmp_path, rng):
    # statistics with sample rows recorded by the numpy path of nibble.calib.Recorder; --gptq rounds
    # by GPTQ and says so per layer in the report
    import nibble.calib
    src = nibble.load(sample)
    name = next(n for n in src.names() if n.endswith("txt_mod.1"))
    k = src[name].in_features
    stats = tmp_path / "calib.safetensors"
    with nibble.calib.Recorder(None, stats, sample_rows=2 * k) as rec:
        mix = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
        rec.record(name, rng.standard_normal((4 * k, k)).astype(np.float32) @ mix)
    report = nibble.convert(sample, tmp_path / "o.safetensors", rules=["txt_mod\\.1=awq_w4a16"],
                            calib=stats, gptq=True)
    layer = next(l for l in report["layers"] if l["name"].endswith("txt_mod.1"))
    assert layer["gptq"] is True and layer["calibration_sample_rows"] == 2 * k
    with pytest.raises(nibble.InputError):
        nibble.convert(sample, tmp_path / "o2.safetensors", rules=["txt_mod\\.1=awq_w4a16"], gptq=True)
