"""Activations with hand-written derivatives equal jax.nn's values and derivatives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcirc.models.activations import ACTIVATIONS, activation

REFERENCE = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_values_and_derivatives_match_jax(name):
    x = jnp.linspace(-9.0, 9.0, 2001, dtype=jnp.float32)
    mine, ref = ACTIVATIONS[name], REFERENCE[name]
    np.testing.assert_array_equal(np.asarray(activation(name, x)), np.asarray(ref(x)))
    slope = jax.vmap(jax.grad(mine))(x)
    np.testing.assert_allclose(np.asarray(slope), np.asarray(jax.vmap(jax.grad(ref))(x)), atol=5e-6, rtol=0)
    # Under differentiation the value comes from the JVP rule: the same numbers, to rounding.
    primal, tangent = jax.jvp(mine, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(np.asarray(primal), np.asarray(ref(x)), atol=1e-6, rtol=0)
    # And the slope is the derivative (central differences in float64).
    x64 = np.linspace(-4.0, 4.0, 81)
    h = 1e-3
    numeric = (np.asarray(ref(jnp.asarray(x64 + h, jnp.float32)), np.float64)
               - np.asarray(ref(jnp.asarray(x64 - h, jnp.float32)), np.float64)) / (2 * h)
    at = np.abs(x64) > 2 * h  # relu's kink
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(mine))(jnp.asarray(x64, jnp.float32)))[at], numeric[at],
                               atol=2e-3)
    # Second derivatives exist (the rule is itself differentiable).
    assert np.isfinite(np.asarray(jax.vmap(jax.grad(jax.grad(mine)))(x))).all()


def test_unknown_activation_names_the_supported_ones():
    with pytest.raises(ValueError, match="gelu_new.*silu"):
        activation("swish2", jnp.zeros(3))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_bfloat16_stays_bfloat16_under_differentiation(name):
    x = jnp.linspace(-4.0, 4.0, 33, dtype=jnp.bfloat16)
    primal, tangent = jax.jvp(ACTIVATIONS[name], (x,), (jnp.ones_like(x),))
    assert primal.dtype == tangent.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(primal, np.float32), np.asarray(REFERENCE[name](x), np.float32),
                               atol=3e-2, rtol=2e-2)
