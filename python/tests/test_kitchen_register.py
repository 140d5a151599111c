"""nibble.kitchen registration against a stand-in kitchen registry (no torch, no comfy-kitchen).

register() must return False and say why (a logged warning, `reason`) when comfy-kitchen cannot
be imported or its registry API is not the one the adapter was written against, and
`registered` / is_registered() must reflect what the registry holds.
"""
import logging
import sys

import pytest

import kitchen_standin
import nibble.kitchen as nk


@pytest.fixture(autouse=True)
def _restore_state():
    saved = (nk.registered, nk.reason, nk.served_ops)
    yield
    nk.registered, nk.reason, nk.served_ops = saved


def test_registers_ahead_of_eager(monkeypatch, caplog):
    reg = kitchen_standin.install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="nibble.kitchen"):
        assert nk.register() is True
    assert not caplog.records
    assert nk.registered and nk.is_registered() and nk.reason == "registered"
    assert reg._priority == ["cuda", "triton", "nibble", "eager"]
    assert set(nk.served_ops) == set(nk.OPS)
    assert set(reg._caps["nibble"]) == set(nk.OPS)
    # CPU only: every constraint names the cpu device
    assert all(c.default_devices == frozenset({"cpu"}) for c in reg._caps["nibble"].values())
    # re-registering does not duplicate the entry
    assert nk.register() and reg._priority.count("nibble") == 1
    nk.unregister()
    assert not nk.registered and not nk.is_registered() and "nibble" not in reg._priority


def test_import_failure_is_reported(monkeypatch, tmp_path, caplog):
    # comfy-kitchen 0.2.40 imports `packaging` without declaring it
    pkg = tmp_path / "comfy_kitchen"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'packaging'\", name='packaging')\n")
    kitchen_standin.install(monkeypatch)
    for m in ("comfy_kitchen", "comfy_kitchen.registry", "comfy_kitchen.constraints"):
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="nibble.kitchen"):
        assert nk.register() is False
    assert not nk.registered and not nk.is_registered()
    assert "cannot be imported" in nk.reason and "packaging" in nk.reason
    assert any("packaging" in r.getMessage() for r in caplog.records)
    assert nk.status()["registered"] is False


def test_missing_kitchen(monkeypatch, caplog):
    kitchen_standin.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "comfy_kitchen", None)  # import raises ImportError
    with caplog.at_level(logging.WARNING, logger="nibble.kitchen"):
        assert nk.register() is False
    assert "cannot be imported" in nk.reason and caplog.records


@pytest.mark.parametrize("change,expect", [
    (dict(drop=("set_priority",)), "registry.set_priority() is missing"),
    (dict(register_sig=lambda backend, impl: None), "does not take (name, module, capabilities)"),
    (dict(constraint_fields=False), "lacks fields ['default_devices']"),
])
def test_other_registry_api_is_refused(monkeypatch, caplog, change, expect):
    reg = kitchen_standin.install(monkeypatch, **change)
    with caplog.at_level(logging.WARNING, logger="nibble.kitchen"):
        assert nk.register() is False
    assert expect in nk.reason and "written against" in nk.reason
    assert any(expect in r.getMessage() for r in caplog.records)
    assert not nk.registered and "nibble" not in reg._priority


def test_kitchen_without_int4_ops(monkeypatch):
    kitchen_standin.install(monkeypatch, ops=("quantize_nvfp4",))
    assert nk.register() is False and "declares none of the int4 ops" in nk.reason


def test_only_declared_ops_are_served(monkeypatch):
    reg = kitchen_standin.install(monkeypatch, ops=("gemv_awq_w4a16",))
    assert nk.register() is True
    assert nk.served_ops == ("gemv_awq_w4a16",) and set(reg._caps["nibble"]) == {"gemv_awq_w4a16"}


def test_register_raising_is_reported(monkeypatch):
    reg = kitchen_standin.install(monkeypatch)
    reg.fail_register = True
    assert nk.register() is False and "registry is frozen" in nk.reason
