"""The ComfyUI node pack (comfyui/) against a stand-in for ComfyUI's loader (comfy_standin.py).

Covers: formats added only when the loader lacks them (and nothing touched when it knows them),
both key spellings (both present → error), act_unsigned from the config with the name fallback
only when the key is absent, post_smoothing folded, the unknown-format error listing the supported
formats, changed internals refused with a clear message, start-up (threads, kitchen registration
reported honestly), and the two nodes on real files (nibble.convert / nibble.apply_loras).
The real ComfyUI + torch + comfy-kitchen path is `make test-comfyui`.
"""
import importlib.util
import logging
import os
import pathlib
import sys

import numpy as np
import pytest

import comfy_standin as cs
import nibble
from comfy_standin import conf_tensor, t

PACK_DIR = pathlib.Path(__file__).resolve().parents[2] / "comfyui"


@pytest.fixture
def pack(monkeypatch):
    """The node pack imported as ComfyUI does (a package from its directory), without start-up."""
    monkeypatch.setenv("NIBBLE_COMFYUI_NO_SETUP", "1")
    name = "nibble_comfyui_under_test"
    for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, m)
    spec = importlib.util.spec_from_file_location(name, PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)
    spec.loader.exec_module(mod)
    import nibble.kitchen as nk
    saved = (nk.registered, nk.reason, nk.served_ops, nibble.num_threads())
    yield mod
    nk.registered, nk.reason, nk.served_ops = saved[:3]
    nibble.set_num_threads(saved[3])


def compat(pack):
    return sys.modules[pack.__name__ + ".comfy_compat"]


def awq_sd(prefix, n=8, k=128, zeros_key="weight_zeros", conf=None):
    sd = {f"{prefix}weight": t(np.zeros((n, k // 2), np.int8)),
          f"{prefix}weight_scale": t(np.ones((k // 64, n), np.float32)),
          f"{prefix}bias": t(np.zeros(n, np.float32)),
          f"{prefix}comfy_quant": conf_tensor(conf or {"format": "awq_w4a16", "group_size": 64})}
    if zeros_key:
        sd[f"{prefix}{zeros_key}"] = t(np.zeros((k // 64, n), np.float32))
    return sd


def svd_sd(prefix, n=8, k=128, r=4, names=("smooth_factor", "proj_down", "proj_up"), conf=None):
    smooth, down, up = names
    return {f"{prefix}weight": t(np.zeros((n, k // 2), np.int8)),
            f"{prefix}weight_scale": t(np.ones((k // 64, n), np.float32)),
            f"{prefix}{smooth}": t(np.full(k, 2.0, np.float32)),
            f"{prefix}{down}": t(np.ones((k, r), np.float32)),
            f"{prefix}{up}": t(np.ones((n, r), np.float32)),
            f"{prefix}comfy_quant": conf_tensor(conf or {"format": "svdquant_w4a4"})}


# ---------------------------------------------------------------- install: add only what is missing
def test_adds_both_formats_when_the_loader_lacks_them(pack, monkeypatch, tmp_path):
    s = cs.install(monkeypatch, tmp_path, registered=False)
    c = compat(pack)
    original = s.ops._load_quantized_module
    assert c.install() == ("awq_w4a16", "svdquant_w4a4")
    algos = s.quant_ops.QUANT_ALGOS
    assert algos["awq_w4a16"]["comfy_tensor_layout"] == "TensorCoreAWQW4A16Layout"
    assert algos["svdquant_w4a4"]["comfy_tensor_layout"] == "TensorCoreSVDQuantW4A4Layout"
    assert algos["awq_w4a16"]["quantize_input"] is False and algos["svdquant_w4a4"]["quantize_input"] is False
    assert algos["awq_w4a16"]["storage_t"] == "int8"
    assert s.layouts["TensorCoreAWQW4A16Layout"] is cs.AWQLayout      # registered from the kitchen
    assert s.layouts["TensorCoreSVDQuantW4A4Layout"] is cs.SVDLayout
    assert s.ops._load_quantized_module is not original
    # a second start-up: ComfyUI now knows them → nothing more is touched
    wrapped = s.ops._load_quantized_module
    assert c.install() == () and s.ops._load_quantized_module is wrapped


@pytest.mark.parametrize("knows", [("awq_w4a16", "svdquant_w4a4")])
def test_touches_nothing_when_comfyui_knows_them(pack, monkeypatch, tmp_path, knows):
    s = cs.install(monkeypatch, tmp_path, knows=knows)
    before = {k: dict(v) for k, v in s.quant_ops.QUANT_ALGOS.items()}
    loader = s.ops._load_quantized_module
    assert compat(pack).install() == ()
    assert s.ops._load_quantized_module is loader and s.quant_ops.QUANT_ALGOS == before


def test_adds_only_the_missing_one(pack, monkeypatch, tmp_path):
    s = cs.install(monkeypatch, tmp_path, knows=("awq_w4a16",))
    assert compat(pack).install() == ("svdquant_w4a4",)
    # awq stays ComfyUI's own: its layers go to the original loader
    lin = cs.Linear(8, 128)
    lin.load(s.ops, awq_sd("a."), "a.")
    assert s.ops.calls == ["a."]


@pytest.mark.parametrize("change,expect", [
    (dict(loader_sig_changed=True), "_load_quantized_module"),
    (dict(algos_not_dict=True), "QUANT_ALGOS is not a dict"),
])
def test_changed_internals_are_refused(pack, monkeypatch, tmp_path, change, expect):
    s = cs.install(monkeypatch, tmp_path, **change)
    c = compat(pack)
    with pytest.raises(c.ComfyInternalsChanged, match=expect) as e:
        c.install()
    assert "written against ComfyUI master" in str(e.value)


# ---------------------------------------------------------------- the loader branch
@pytest.fixture
def loader(pack, monkeypatch, tmp_path):
    s = cs.install(monkeypatch, tmp_path)
    compat(pack).install()
    return s


@pytest.mark.parametrize("zeros_key", ["weight_zeros", "weight_zero"])
def test_awq_both_spellings(loader, zeros_key):
    lin = cs.Linear(8, 128)
    sd = awq_sd("blk.img_mod.1.", zeros_key=zeros_key,
                conf={"format": "awq_w4a16", "group_size": 32})
    missing = lin.load(loader.ops, sd, "blk.img_mod.1.")
    assert not missing and not sd and loader.ops.calls == []
    w = lin.weight
    assert w._layout_cls == "TensorCoreAWQW4A16Layout" and lin.quant_format == "awq_w4a16"
    assert w._params.group_size == 32 and w._params.zeros.shape == (2, 8)
    assert w._params.orig_shape == (8, 128) and w._params.orig_dtype == "bfloat16"
    assert lin.bias is not None and lin.layout_type == "TensorCoreAWQW4A16Layout"


def test_awq_errors(loader):
    sd = awq_sd("x.")
    sd["x.weight_zero"] = sd["x.weight_zeros"]
    with pytest.raises(ValueError, match="both x.weight_zeros and x.weight_zero"):
        cs.Linear(8, 128).load(loader.ops, sd, "x.")
    with pytest.raises(ValueError, match="Missing AWQ W4A16 scale/zeros for layer y"):
        cs.Linear(8, 128).load(loader.ops, awq_sd("y.", zeros_key=None), "y.")


@pytest.mark.parametrize("names", [("smooth_factor", "proj_down", "proj_up"),
                                   ("weight_smooth_factor", "weight_proj_down", "weight_proj_up"),
                                   ("smooth_factor", "weight_proj_down", "proj_up")])
def test_svdquant_key_spellings(loader, names):
    lin = cs.Linear(8, 128)
    sd = svd_sd("b.attn.to_q.", names=names)
    assert not lin.load(loader.ops, sd, "b.attn.to_q.") and not sd
    p = lin.weight._params
    assert lin.weight._layout_cls == "TensorCoreSVDQuantW4A4Layout"
    assert p.proj_down.shape == (128, 4) and p.proj_up.shape == (8, 4) and p.smooth_factor.shape == (128,)
    assert p.act_unsigned is False


def test_svdquant_proj_up_in_compute_dtype(loader):
    # the kitchen layer returns proj_up's dtype: an fp32 ComfyUI (CPU manual cast) gets proj_up in
    # fp32 so svdquant outputs stay fp32; the other side tensors keep their stored dtype
    sd = svd_sd("f.")
    sd["f.proj_up"] = sd["f.proj_up"].astype(np.float16).view(cs.T)
    sd["f.proj_down"] = sd["f.proj_down"].astype(np.float16).view(cs.T)
    lin = cs.Linear(8, 128, dtype="float32")
    assert not lin.load(loader.ops, sd, "f.")
    assert lin.weight._params.proj_up.dtype == np.float32
    assert lin.weight._params.proj_down.dtype == np.float16


def test_svdquant_errors(loader):
    sd = svd_sd("z.")
    sd["z.weight_proj_up"] = sd["z.proj_up"]
    with pytest.raises(ValueError, match="both z.proj_up and z.weight_proj_up"):
        cs.Linear(8, 128).load(loader.ops, sd, "z.")
    sd = svd_sd("z.")
    del sd["z.proj_down"]
    with pytest.raises(ValueError, match="Missing SVDQuant W4A4 parameters for layer z: proj_down"):
        cs.Linear(8, 128).load(loader.ops, sd, "z.")
    with pytest.raises(ValueError, match="lowrank_branch_input_basis"):
        cs.Linear(8, 128).load(loader.ops, svd_sd("z.", conf={"format": "svdquant_w4a4",
                                                              "lowrank_branch_input_basis": "odd"}), "z.")


@pytest.mark.parametrize("layer,conf,expect", [
    ("blk.img_mlp.net.2", {}, True),                    # absent key: the name decides
    ("blk.txt_mlp.net.2", {}, True),
    ("blk.img_mlp.net.2", {"act_unsigned": False}, False),   # an explicit false is kept
    ("blk.attn.to_q", {"act_unsigned": True}, True),
    ("blk.attn.to_q", {}, False),
])
def test_act_unsigned(loader, layer, conf, expect):
    lin = cs.Linear(8, 128)
    lin.load(loader.ops, svd_sd(layer + ".", conf={"format": "svdquant_w4a4", **conf}), layer + ".")
    assert lin.weight._params.act_unsigned is expect


def test_post_smoothing_is_folded(loader):
    lin = cs.Linear(8, 128)
    conf = {"format": "svdquant_w4a4", "lowrank_branch_input_basis": "post_smoothing"}
    lin.load(loader.ops, svd_sd("p.", conf=conf), "p.")
    assert np.allclose(np.asarray(lin.weight._params.proj_down), 0.5)   # ones / smooth (2)


def test_unknown_format_lists_supported(loader):
    sd = awq_sd("u.", conf={"format": "int3_magic"})
    with pytest.raises(ValueError) as e:
        cs.Linear(8, 128).load(loader.ops, sd, "u.")
    msg = str(e.value)
    assert "'int3_magic'" in msg and "layer u" in msg
    for f in ("awq_w4a16", "svdquant_w4a4", "float8_e4m3fn"):
        assert f in msg


def test_other_formats_and_float_layers_go_to_comfyui(loader):
    sd = {"f.weight": t(np.zeros((8, 128), np.uint8)), "f.weight_scale": t(np.ones(1, np.float32)),
          "f.comfy_quant": conf_tensor({"format": "float8_e4m3fn"})}
    lin = cs.Linear(8, 128)
    lin.load(loader.ops, sd, "f.")
    assert loader.ops.calls == ["f."] and lin.weight._layout_cls == "TensorCoreFP8E4M3Layout"
    lin2 = cs.Linear(8, 128)
    lin2.load(loader.ops, {"g.weight": t(np.zeros((8, 128), np.float32))}, "g.")
    assert loader.ops.calls == ["f.", "g."]


def test_disabled_format_takes_the_dense_path(loader):
    lin = cs.Linear(8, 128, disabled=("svdquant_w4a4",))
    lin.load(loader.ops, svd_sd("d."), "d.")
    assert lin._full_precision_mm is True


# ---------------------------------------------------------------- start-up
def test_setup_threads_kitchen_and_formats(pack, monkeypatch, tmp_path, caplog):
    s = cs.install(monkeypatch, tmp_path)
    monkeypatch.setenv("NIBBLE_COMFYUI_THREADS", "1")
    with caplog.at_level(logging.INFO):
        rep = pack.setup(force=True)
    assert rep["threads"] == 1 and nibble.num_threads() == 1
    assert rep["formats_added"] == ("awq_w4a16", "svdquant_w4a4") and rep["error"] is None
    # the stand-in has no kitchen registry: nibble says so instead of claiming to be registered
    assert rep["kitchen"]["registered"] is False and rep["kitchen"]["reason"]
    assert any("not the kitchen's CPU backend" in r.getMessage() for r in caplog.records)
    monkeypatch.delenv("NIBBLE_COMFYUI_THREADS")
    assert pack.setup(force=True)["threads"] == 2    # torch.get_num_threads() of the stand-in
    assert pack.setup() is pack.setup()              # once per process unless forced


@pytest.mark.parametrize("policy, notice", [(None, True), ("active", True), ("PASSIVE", False), ("passive", False)])
def test_setup_tells_about_spinning_omp_workers(pack, monkeypatch, tmp_path, caplog, policy, notice):
    cs.install(monkeypatch, tmp_path)  # the stand-in torch is in sys.modules, as in ComfyUI
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    with caplog.at_level(logging.INFO):
        rep = pack.setup(force=True)
    assert rep["omp_notice"] is notice
    said = [r.getMessage() for r in caplog.records if "OMP_WAIT_POLICY" in r.getMessage()]
    assert bool(said) is notice
    if notice:
        assert "OMP_WAIT_POLICY=PASSIVE" in said[0]


def test_setup_reports_changed_internals(pack, monkeypatch, tmp_path, caplog):
    cs.install(monkeypatch, tmp_path, loader_sig_changed=True)
    with caplog.at_level(logging.ERROR):
        rep = pack.setup(force=True)
    assert "ComfyUI internals changed" in rep["error"]
    assert any("ComfyUI internals changed" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- nodes
def test_node_mappings(pack):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["NibbleQuantizeKitchenNative"] == \
        "Quantize model to kitchen-native (nibble)"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["NibbleApplyLoraInt4"] == "Apply LoRA to int4 model (nibble)"
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(cls(), cls.FUNCTION)) and cls.CATEGORY == "nibble"


def _float_checkpoint(path, rng, hidden=128):
    tensors = {}
    for name, (n, k) in {"transformer_blocks.0.attn.to_q": (hidden, hidden),
                         "transformer_blocks.0.img_mod.1": (6 * hidden, hidden),
                         "transformer_blocks.0.img_mlp.net.2": (hidden, 4 * hidden)}.items():
        tensors[f"{name}.weight"] = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        tensors[f"{name}.bias"] = np.zeros(n, np.float32)
    nibble.save_file(tensors, str(path))


def test_quantize_node_on_a_checkpoint(pack, monkeypatch, tmp_path, rng):
    s = cs.install(monkeypatch, tmp_path)
    _float_checkpoint(s.dirs["diffusion_models"] / "float.safetensors", rng)
    node = pack.NODE_CLASS_MAPPINGS["NibbleQuantizeKitchenNative"]()
    assert "float.safetensors" in node.INPUT_TYPES()["optional"]["checkpoint"][0]
    out = node.quantize("svdquant_w4a4", 16, "q4", checkpoint="float.safetensors")["result"][0]
    assert out == str(s.dirs["diffusion_models"] / "q4.safetensors") and os.path.exists(out)
    layers = nibble.load(out).layers
    assert {layers[n].format for n in layers} == {"svdquant_w4a4"}
    with pytest.raises(ValueError, match="exists"):
        node.quantize("svdquant_w4a4", 16, "q4", checkpoint="float.safetensors")
    with pytest.raises(ValueError, match="exactly one"):
        node.quantize("awq_w4a16", 16, "q5")
    with pytest.raises(ValueError, match="plain file name"):
        node.quantize("awq_w4a16", 16, "../evil", checkpoint="float.safetensors")


def test_lora_node(pack, monkeypatch, tmp_path, rng):
    s = cs.install(monkeypatch, tmp_path)
    ckpt = s.dirs["diffusion_models"] / "int4.safetensors"
    nibble.write_sample_checkpoint(str(ckpt), hidden=128, rank=8)
    layer = next(n for n, l in nibble.load(str(ckpt)).layers.items() if l.format == "svdquant_w4a4")
    k, n = nibble.load(str(ckpt))[layer].in_features, nibble.load(str(ckpt))[layer].out_features
    nibble.save_file({f"{layer}.lora_A.weight": (rng.standard_normal((4, k)) * 0.01).astype(np.float32),
                      f"{layer}.lora_B.weight": (rng.standard_normal((n, 4)) * 0.01).astype(np.float32)},
                     str(s.dirs["loras"] / "style.safetensors"))
    node = pack.NODE_CLASS_MAPPINGS["NibbleApplyLoraInt4"]()
    out = node.apply("int4.safetensors", "style.safetensors", 0.8, "int4_style")["result"][0]
    m = nibble.load(out)
    assert m[layer].format == "svdquant_w4a4"
    x = rng.standard_normal((2, k)).astype(np.float32)
    assert not np.array_equal(np.asarray(m[layer](x)), np.asarray(nibble.load(str(ckpt))[layer](x)))
