"""Registers specmd's `offload-hf` model with lm_eval from the `specmd-lm-eval.pth` file pip installs.

lm_eval 0.4.13 discovers no plugins: its model registry holds only what was registered in the running
process, so the stock `lm_eval --model offload-hf` needs something to register specmd first. The `.pth`
line (``specmd/eval_tasks/specmd-lm-eval.pth``) runs at every interpreter start but imports nothing: it puts
a finder at the head of `sys.meta_path` that answers no import and, when `lm_eval.models` is first
imported, calls `register_model`. lm_eval imports `lm_eval.models` to fill its registry the first time a
model is looked up, so the built-in models (`hf`, ...) and `offload-hf` arrive together. The entry is a
lazy "module:attribute" string: specmd's model code, torch and transformers load only if `offload-hf` is used.
"""

from __future__ import annotations

import warnings

from specmd.eval_tasks import MODEL_NAME, MODEL_TARGET


def register_model() -> None:
    """Add `offload-hf` to lm_eval's model registry (once), as a lazy entry; never raise."""
    try:
        from lm_eval.api.registry import model_registry

        if MODEL_NAME not in model_registry:
            model_registry.register(MODEL_NAME, target=MODEL_TARGET)
    except Exception as exc:  # a broken hook must not break lm_eval for its other models
        warnings.warn(f"specmd could not register lm_eval model {MODEL_NAME!r}: {exc!r}", stacklevel=2)
