"""What the backend-neutral tests need that differs per Keras backend: arrays back, and gradients."""
import keras
import numpy as np

BACKEND = keras.backend.backend()


def to_numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def value_and_grads(fn, variables: list):
    """``fn()`` (a scalar computed from ``variables``) and its gradients with respect to them, as NumPy."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = fn()
        grads = tape.gradient(value, variables)
    elif BACKEND == "jax":
        import jax

        def pure(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn()

        value, grads = jax.value_and_grad(pure)([v.value for v in variables])
    elif BACKEND == "torch":
        import torch

        value = fn()
        grads = torch.autograd.grad(value, [v.value for v in variables])
    else:
        raise NotImplementedError(BACKEND)
    return to_numpy(value), [to_numpy(g) for g in grads]
