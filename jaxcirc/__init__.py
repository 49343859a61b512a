"""jaxcirc: JAX-native mechanistic interpretability.

    import jaxcirc
    model = jaxcirc.load("smollm2-135m")
    logits, cache = jaxcirc.run(model, "The capital of France is", cache=["blocks.10.attn.hook_z"])
"""

from jaxcirc.attribution import atp
from jaxcirc.checkpoint import save
from jaxcirc.checkpoints import checkpoint_series, checkpoints
from jaxcirc.eap import eap, eap_ig
from jaxcirc.graph import Graph
from jaxcirc.hook_plan import HookNameError
from jaxcirc.hooks import Hooks, Intervention, add, replace
from jaxcirc.loading import load, placement
from jaxcirc.model import Model, run
from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.pairs import MinimalPairs, from_jsonl, from_texts, from_tokens
from jaxcirc.patching import patch_sweep
from jaxcirc.weight_processing import process_weights

__all__ = ["Graph", "Hooks", "HookNameError", "Intervention", "MinimalPairs", "Model", "ModelConfig",
           "RopeConfig", "add", "atp", "checkpoint_series", "checkpoints", "eap", "eap_ig", "from_jsonl",
           "from_texts", "from_tokens", "load", "patch_sweep", "placement", "process_weights", "replace", "run", "save"]
__version__ = "0.1.0"
