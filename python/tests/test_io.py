"""safetensors round trips between nibble's writer/reader and the `safetensors` PyPI package."""
import errno
import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as stnp

import nibble


def sample_tensors(rng):
    return {
        "blocks.0.w.weight": rng.integers(-128, 128, size=(16, 32), dtype=np.int8),
        "blocks.0.w.weight_scale": rng.standard_normal((2, 16)).astype(ml_dtypes.bfloat16),
        "blocks.0.w.bias": rng.standard_normal(16).astype(np.float16),
        "blocks.0.w.comfy_quant": np.frombuffer(b'{"format":"awq_w4a16","group_size":64}', np.uint8).copy(),
        "f32": rng.standard_normal((3, 5, 7)).astype(np.float32),
        "f64": rng.standard_normal(4),
        "i64": rng.integers(-(2**40), 2**40, size=(5,)),
        "i32": rng.integers(-1000, 1000, size=(2, 2)).astype(np.int32),
        "u8": rng.integers(0, 256, size=(9,)).astype(np.uint8),
        "bool": rng.integers(0, 2, size=(6,)).astype(bool),
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def raw_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        return header, f.read()


def assert_same(a, b, name):
    assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
    assert a.tobytes() == b.tobytes(), f"{name}: bytes differ"


def test_nibble_writes_safetensors_reads(tmp_path, rng):
    t = sample_tensors(rng)
    path = tmp_path / "n.safetensors"
    nibble.save_file(t, path, metadata={"format": "pt", "note": "nibble"})
    back = stnp.load_file(str(path))
    assert sorted(back) == sorted(t)
    for k in t:
        assert_same(back[k], t[k], k)
    header, _ = raw_header(path)
    assert header["__metadata__"] == {"format": "pt", "note": "nibble"}


def test_safetensors_writes_nibble_reads(tmp_path, rng):
    t = sample_tensors(rng)
    path = tmp_path / "s.safetensors"
    stnp.save_file(t, str(path), metadata={"k": "v"})
    back = nibble.load_file(path)
    assert sorted(back) == sorted(t)
    for k in t:
        assert_same(back[k], t[k], k)
        assert not back[k].flags.writeable, "views of the read-only mapping must not be writable"
    assert nibble.read_metadata(path) == {"k": "v"}


def test_byte_identical_files(tmp_path, rng):
    # Same tensors, same metadata: both writers produce a valid file holding the same bytes per
    # tensor (the header layout may differ: JSON key order / padding are not normative).
    t = sample_tensors(rng)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    nibble.save_file(t, a)
    stnp.save_file(t, str(b))
    (ha, da), (hb, db) = raw_header(a), raw_header(b)
    for k in t:
        ia, ib = ha[k], hb[k]
        assert ia["dtype"] == ib["dtype"] and ia["shape"] == ib["shape"], k
        sa = da[ia["data_offsets"][0]:ia["data_offsets"][1]]
        sb = db[ib["data_offsets"][0]:ib["data_offsets"][1]]
        assert sa == sb, k


def test_fp8_round_trip_raw(tmp_path, rng):
    # safetensors.numpy cannot read F8 (no numpy dtype); check nibble's own round trip and the
    # header / bytes it writes directly.
    t = {"e4m3": rng.standard_normal((4, 4)).astype(ml_dtypes.float8_e4m3fn),
         "e5m2": rng.standard_normal((3,)).astype(ml_dtypes.float8_e5m2)}
    path = tmp_path / "f8.safetensors"
    nibble.save_file(t, path)
    back = nibble.load_file(path)
    header, data = raw_header(path)
    for k, dt in (("e4m3", "F8_E4M3"), ("e5m2", "F8_E5M2")):
        assert_same(back[k], t[k], k)
        assert header[k]["dtype"] == dt
        b, e = header[k]["data_offsets"]
        assert data[b:e] == t[k].tobytes()


def test_loaded_arrays_outlive_file_handle(tmp_path, rng):
    t = {"x": rng.standard_normal((64, 64)).astype(np.float32)}
    path = tmp_path / "x.safetensors"
    nibble.save_file(t, path)
    x = nibble.load_file(path)["x"]
    path.unlink()                       # the mapping stays valid while an array references it
    assert np.array_equal(x, t["x"])


def test_io_errors(tmp_path):
    with pytest.raises(nibble.FileError) as ei:
        nibble.load_file(tmp_path / "missing.safetensors")
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOENT
    with pytest.raises(nibble.FileError):
        nibble.read_metadata(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(nibble.InputError) as ei:   # over the header cap: bad content, not I/O
        nibble.load_file(bad)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, nibble.Error)
    assert "bad.safetensors" in str(ei.value)
    with pytest.raises(nibble.InputError):
        nibble.save_file({"x": "not an array"}, tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists()
    with pytest.raises(nibble.FileError) as ei:   # the directory does not exist
        nibble.save_file({"x": np.zeros(3, np.float32)}, tmp_path / "no" / "dir" / "y.safetensors")
    assert ei.value.errno == errno.ENOENT


def test_truncated_file_is_file_error(tmp_path, rng):
    path = tmp_path / "t.safetensors"
    nibble.save_file({"a": rng.standard_normal((32, 32)).astype(np.float32)}, path)
    whole = path.read_bytes()
    for cut in (3, 8 + 10, len(whole) - 1):   # in the length prefix, in the header, in the data
        path.write_bytes(whole[:cut])
        with pytest.raises(nibble.FileError, match="truncated") as ei:
            nibble.load_file(path)
        assert isinstance(ei.value, OSError) and ei.value.errno is None
    path.write_bytes(whole)
    assert nibble.load_file(path)["a"].shape == (32, 32)


def test_error_hierarchy():
    assert issubclass(nibble.FileError, nibble.Error) and issubclass(nibble.FileError, OSError)
    assert issubclass(nibble.InputError, nibble.Error) and issubclass(nibble.InputError, ValueError)
    assert not issubclass(nibble.Error, ValueError) and not issubclass(nibble.InputError, OSError)
    with pytest.raises(nibble.InputError):
        nibble.set_isa("no_such_isa")

