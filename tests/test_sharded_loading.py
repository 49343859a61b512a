"""Loading a bf16 sharded-safetensors checkpoint straight onto a (data, model) mesh of 8 forced host
devices: the placement, the dtype kept, and logits equal to the single-device load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxcirc

ROOT = Path(__file__).resolve().parents[1]


def save_bf16_llama(directory: Path) -> Path:
    """A random-init HF Llama (GQA 4/2, biases, untied head, vocab 64) saved in bfloat16 as
    several safetensors shards with an index."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(directory, max_shard_size="20KB")
    shards = set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1
    return directory


def test_bf16_sharded_checkpoint_loads_onto_a_mesh(tmp_path):
    path = save_bf16_llama(tmp_path / "llama")
    tokens = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    script = textwrap.dedent(f"""
        import json
        import jax, numpy as np
        import jaxcirc
        from jaxcirc.sharding import make_mesh

        assert jax.device_count() == 8, jax.devices()
        mesh = make_mesh(data=2, model=4)
        tokens = np.load({str(tmp_path / 'tokens.npy')!r})
        model = jaxcirc.load({str(path)!r}, mesh=mesh)
        logits, _ = jaxcirc.run(model, tokens)
        processed = jaxcirc.load({str(path)!r}, mesh=mesh, dtype="float32", fold_ln=True, center_unembed=True,
                                 fold_value_biases=True)
        processed_logits, _ = jaxcirc.run(processed, tokens)
        W_Q = model.params["blocks"]["attn"]["W_Q"]
        json.dump({{
            "placement": jaxcirc.placement(model.params),
            "processed_placement": jaxcirc.placement(processed.params),
            "dtypes": sorted({{str(x.dtype) for x in jax.tree.leaves(model.params)}}),
            "config_dtype": model.config.dtype,
            "W_Q_shard": list(W_Q.addressable_shards[0].data.shape),
            "W_Q_devices": len(W_Q.sharding.device_set),
            "source_hash": model.source_hash,
            "processing": list(processed.config.weight_processing),
        }}, open({str(tmp_path / 'out.json')!r}, "w"))
        np.savez({str(tmp_path / 'out.npz')!r}, logits=np.asarray(logits, np.float32),
                 processed=np.asarray(processed_logits, np.float32))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    # Meanwhile, on one device: "auto" keeps the checkpoint's bfloat16.
    one = jaxcirc.load(path)
    assert one.config.dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(one.params)} == {"bfloat16"}
    one_logits = np.asarray(jaxcirc.run(one, tokens)[0], np.float32)
    f32 = jaxcirc.load(path, dtype="float32")
    f32_logprobs = np.asarray(jax.nn.log_softmax(jaxcirc.run(f32, tokens)[0], axis=-1))
    with pytest.raises(ValueError, match="float dtype name"):
        jaxcirc.load(path, dtype="bf16")
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]

    out = json.loads((tmp_path / "out.json").read_text())
    place = {k: tuple(v) for k, v in out["placement"].items()}
    assert place["blocks.attn.W_Q"] == (None, None, "model", None)  # [layer, d_model, head, d_head]
    assert place["blocks.attn.W_O"] == (None, "model", None, None)
    assert place["blocks.mlp.W_in"] == place["blocks.mlp.W_gate"] == (None, None, "model")
    assert place["blocks.mlp.W_out"] == (None, "model", None)
    assert place["W_E"] == ("model", None) and place["W_U"] == (None, "model")
    assert place["blocks.attn.W_K"] == (None,) * 4  # 2 kv heads do not split over 4 devices
    assert place["blocks.ln1.w"] == (None, None)
    assert out["W_Q_shard"] == [2, 32, 1, 8] and out["W_Q_devices"] == 8
    assert out["dtypes"] == ["bfloat16"] and out["config_dtype"] == "bfloat16"
    assert out["source_hash"] == one.source_hash  # the same parameters, bit for bit

    arrays = np.load(tmp_path / "out.npz")
    # bfloat16 keeps ~3 significant digits; the sharded program sums in another order.
    scale = np.abs(one_logits).max()
    assert np.abs(arrays["logits"] - one_logits).max() <= 0.05 * scale
    assert (arrays["logits"].argmax(-1) == one_logits.argmax(-1)).mean() > 0.9
    # float32, processed on the mesh (re-laid out: b_O created, W_U untied) vs the plain load.
    processed = jax.nn.log_softmax(arrays["processed"], axis=-1)
    assert np.abs(processed - f32_logprobs).max() < 2e-5
    assert out["processing"] == ["fold_ln", "center_unembed", "fold_value_biases"]
    assert tuple(out["processed_placement"]["W_U"]) == (None, "model")
    assert tuple(out["processed_placement"]["blocks.attn.b_O"]) == (None, None)
