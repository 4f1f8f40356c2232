"""Statistics of a model on data that weight-merge methods need: Fisher diagonals (Fisher
merging) and Gram matrices of Dense inputs (RegMean). The methods stay pure NumPy."""

from __future__ import annotations

import numpy as np

from kmerge.errors import (
    InvalidArgumentError,
)


def predict_numpy(model, x) -> np.ndarray:
    """The single output of ``model`` on ``x`` (checked first; the variables are never written:
    see :mod:`kmerge.arguments`)."""
    from kmerge.arguments import outputs

    outs = outputs(model, x, "data x")
    if len(outs) != 1:
        raise InvalidArgumentError(
            f"model {model.name!r} has {len(outs)} outputs; accuracy and Fisher statistics need "
            "a model with one output")
    return outs[0]


def looks_like_probs(out: np.ndarray) -> bool:
    if out.ndim < 2 or out.shape[-1] == 1:
        return bool(out.min() >= 0 and out.max() <= 1)
    return bool(out.min() >= 0 and np.allclose(out.sum(-1), 1.0, atol=1e-3))


def _log_probs_fn(probs: bool, binary: bool):
    import keras

    ops = keras.ops

    def f(out):
        if binary:
            s = out[:, :1] if probs else ops.sigmoid(out[:, :1])
            p = ops.concatenate([1.0 - s, s], axis=-1)
            return ops.log(ops.clip(p, 1e-12, 1.0))
        if probs:
            return ops.log(ops.clip(out, 1e-12, 1.0))
        return ops.log_softmax(out, axis=-1)

    return f


def fisher_diagonals(model, x, *, samples: int = 256, batch: int = 32) -> list[np.ndarray]:
    """Diagonal Fisher of every variable of ``model`` (zeros for non-trainable ones).

    F = mean_x sum_c p(c|x) (d log p(c|x) / d theta)^2: the exact expectation over the model's
    own label distribution (Matena & Raffel, 2022). One per-example Jacobian per batch:
    ``jax.jacrev`` + ``vmap``, ``tf.GradientTape.jacobian`` or ``torch.autograd.grad``.
    """
    import keras

    from kmerge.arguments import model_inputs

    xs = model_inputs(model, x, "data x")
    if len(xs) != 1:
        raise InvalidArgumentError(
            f"method='fisher' supports models with one input; {model.name!r} has {len(xs)}")
    x = xs[0][:samples]
    first = predict_numpy(model, x[:2]).reshape(2, -1)
    probs, binary = looks_like_probs(first), first.shape[-1] == 1
    to_logp = _log_probs_fn(probs, binary)
    trainable = list(model.trainable_variables)
    acc = [np.zeros(tuple(v.shape), np.float64) for v in trainable]
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        ntv = [v.value for v in model.non_trainable_variables]

        def logp_one(tv, xi):
            out, _ = model.stateless_call(tv, ntv, xi[None], training=False)
            return to_logp(jnp.reshape(out, (1, -1)))[0]

        jac = jax.jit(jax.vmap(jax.jacrev(logp_one), in_axes=(None, 0)))
        tv = [v.value for v in trainable]
        for s in range(0, len(x), batch):
            xb = jnp.asarray(x[s:s + batch])
            p = np.exp(np.asarray(jax.vmap(lambda xi: logp_one(tv, xi))(xb)), dtype=np.float64)
            for a, j in zip(acc, jac(tv, xb)):
                j = np.asarray(j, np.float64)
                a += np.tensordot(p, j ** 2, axes=([0, 1], [0, 1]))
    elif backend == "tensorflow":
        import tensorflow as tf

        for s in range(0, len(x), batch):
            xb = tf.convert_to_tensor(x[s:s + batch])
            with tf.GradientTape() as tape:
                logp = to_logp(tf.reshape(model(xb, training=False), (len(xb), -1)))
            jacs = tape.jacobian(logp, [v.value for v in trainable])
            p = np.exp(logp.numpy().astype(np.float64))
            for a, j in zip(acc, jacs):
                if j is not None:
                    a += np.tensordot(p, j.numpy().astype(np.float64) ** 2, axes=([0, 1], [0, 1]))
    elif backend == "torch":
        import torch

        params = [v.value for v in trainable]
        for s in range(0, len(x), batch):
            xb = torch.as_tensor(x[s:s + batch])
            logp = to_logp(torch.reshape(model(xb, training=False), (len(xb), -1)))
            p = torch.exp(logp).detach().double().cpu().numpy()
            for i in range(logp.shape[0]):
                for c in range(logp.shape[1]):
                    grads = torch.autograd.grad(logp[i, c], params, retain_graph=True,
                                                allow_unused=True)
                    for a, g in zip(acc, grads):
                        if g is not None:
                            a += p[i, c] * g.detach().double().cpu().numpy() ** 2
    else:
        raise InvalidArgumentError(f"method='fisher' supports the jax, tensorflow and torch "
                                   f"backends; the current backend is {backend!r}")
    by_path = {v.path: a / len(x) for v, a in zip(trainable, acc)}
    return [by_path.get(v.path, np.zeros(tuple(v.shape))) for v in model.weights]


def dense_grams(model, x, *, samples: int = 256) -> dict[int, np.ndarray]:
    """Gram matrix X^T X of the inputs of each top-level Dense layer, keyed by the index of
    its kernel in ``model.weights`` (paths differ between models: they hold model names).

    Dense layers inside nested models, and shared Dense layers (several call sites), are
    left out (RegMean then averages them).
    """
    import keras

    from kmerge.graph.replay import is_graph_model, submodel, walk

    if not is_graph_model(model):
        return {}
    w = walk(model)
    calls = [c for c in w.leaf_calls if isinstance(c.op, keras.layers.Dense) and not c.path
             and len(w.calls_of(c.op)) == 1]
    dense = [c.op for c in calls]
    if not dense:
        return {}
    from kmerge.arguments import model_inputs
    from kmerge.graph.compiled import predict

    xs = [a[:samples] for a in model_inputs(model, x, "data x")]
    # a probe sharing the model's layers: run statelessly, never through Keras's predict
    outs = predict(submodel(model.inputs, [w.tensors[c.inputs[0]] for c in calls]), xs)
    index = {id(v): i for i, v in enumerate(model.weights)}
    grams = {}
    for layer, X in zip(dense, outs):
        X = np.asarray(X, np.float64).reshape(-1, X.shape[-1])
        grams[index[id(layer.kernel)]] = X.T @ X
    return grams
