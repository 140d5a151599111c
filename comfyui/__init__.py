"""nibble node pack for ComfyUI: nibble as the CPU engine of kitchen-native int4 checkpoints.

On ComfyUI start (when ComfyUI imports this package):
  * registers nibble as comfy-kitchen's CPU backend (nibble.kitchen) and logs once which ops it
    serves — or why it could not;
  * sets nibble's thread count: NIBBLE_COMFYUI_THREADS, else torch.get_num_threads();
  * says once (INFO) when torch's OpenMP workers spin between ops (OMP_WAIT_POLICY not PASSIVE),
    which slows the nibble op that follows a torch op on a machine with few cores;
  * when ComfyUI's mixed-precision loader does not know awq_w4a16 / svdquant_w4a4, adds them
    (comfy_compat.install: the spec's loader behaviour); when it does, touches nothing.
Nodes: "Quantize model to kitchen-native (nibble)", "Apply LoRA to int4 model (nibble)".
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("nibble.comfyui")

_setup_state = {"done": False, "report": None}


def _threads() -> int:
    env = os.environ.get("NIBBLE_COMFYUI_THREADS", "").strip()
    if env:
        try:
            n = int(env)
            if n > 0:
                return n
        except ValueError:
            pass
        log.warning("nibble: NIBBLE_COMFYUI_THREADS=%r is not a positive integer; ignored", env)
    try:
        import torch
        return max(1, int(torch.get_num_threads()))
    except Exception:
        return max(1, os.cpu_count() or 1)


def _omp_spin_notice():
    """The notice about torch's spinning OpenMP workers, or None when it does not apply.

    After each parallel op torch's OpenMP workers busy-wait for their next task unless
    OMP_WAIT_POLICY=PASSIVE (read once, when torch loads libgomp: it cannot be changed from here).
    A nibble op called right after a torch op then shares the cores with them."""
    if "torch" not in sys.modules:
        return None
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
    if policy == "PASSIVE":
        return None
    return ("nibble: torch's OpenMP workers keep spinning after each torch op (OMP_WAIT_POLICY is %s), "
            "so a nibble op right after one shares the cores with them: on 2 cores an AWQ M=1 call took "
            "1.77 ms there instead of 0.58 ms (1.11 ms with PASSIVE). Start ComfyUI with "
            "OMP_WAIT_POLICY=PASSIVE to avoid most of it (docs/comfyui.md)." % (policy or "unset"))


def setup(force: bool = False) -> dict:
    """The start-up work (idempotent; `force` redoes it). Returns what was done."""
    if _setup_state["done"] and not force:
        return _setup_state["report"]
    report = {"threads": None, "kitchen": None, "formats_added": (), "error": None, "omp_notice": False}
    try:
        import nibble
    except Exception as e:
        report["error"] = f"the nibble module cannot be imported ({type(e).__name__}: {e})"
        log.error("nibble node pack: %s; install the nibble wheel into ComfyUI's Python", report["error"])
        _setup_state.update(done=True, report=report)
        return report
    n = _threads()
    nibble.set_num_threads(n)
    report["threads"] = nibble.num_threads()
    notice = _omp_spin_notice()
    if notice:
        log.info("%s", notice)
        report["omp_notice"] = True

    import nibble.kitchen as nk
    nk.register()
    report["kitchen"] = nk.status()
    if nk.registered:
        log.info("nibble %s: CPU backend of comfy-kitchen %s for %s; %d threads, isa %s",
                 nibble.__version__, report["kitchen"]["kitchen"], ", ".join(nk.served_ops),
                 report["threads"], nibble.isa())
    else:
        log.warning("nibble %s: not the kitchen's CPU backend: %s", nibble.__version__, nk.reason)

    from . import comfy_compat
    try:
        added = comfy_compat.install()
        report["formats_added"] = added
        if added:
            log.info("nibble: ComfyUI's loader did not know %s; added (spec loader behaviour)",
                     ", ".join(added))
    except comfy_compat.ComfyInternalsChanged as e:
        report["error"] = str(e)
        log.error("%s", e)
    _setup_state.update(done=True, report=report)
    return report


from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

if os.environ.get("NIBBLE_COMFYUI_NO_SETUP") != "1":  # tests import the package without setup
    setup()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "setup"]
