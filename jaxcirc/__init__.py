"""jaxcirc: JAX-native mechanistic interpretability.

    import jaxcirc
    model = jaxcirc.load("smollm2-135m")
    logits, cache = jaxcirc.run(model, "The capital of France is", cache=["blocks.10.attn.hook_z"])
"""

from jaxcirc.checkpoint import save
from jaxcirc.checkpoints import checkpoint_series, checkpoints
from jaxcirc.hook_plan import HookNameError
from jaxcirc.hooks import Hooks, Intervention, add, replace
from jaxcirc.loading import load
from jaxcirc.model import Model, run
from jaxcirc.models.config import ModelConfig, RopeConfig

__all__ = ["checkpoint_series", "checkpoints", "Hooks", "HookNameError", "Intervention", "Model", "ModelConfig", "RopeConfig",
           "add", "load", "replace", "run", "save"]
__version__ = "0.1.0"
