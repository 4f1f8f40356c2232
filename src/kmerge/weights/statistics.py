"""Statistics of a model on data that weight-merge methods need: Fisher diagonals (Fisher
merging) and Gram matrices of Dense inputs (RegMean). The methods stay pure NumPy.

Whether a model outputs probabilities or logits is decided from the model itself
(:func:`output_kind`: its final activation, else its compiled loss), never from the values
it predicts: a single logit unit whose outputs happen to lie in [0, 1] is not a probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kmerge.errors import (
    InvalidArgumentError,
)

#: Values of ``outputs=`` (method="fisher"): what the model's output holds.
OUTPUTS = ("logits", "probabilities")

# Layers between the last activation and the output that do not change values at inference.
_TRANSPARENT = {"Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
                "GaussianDropout", "GaussianNoise", "AlphaDropout", "Identity",
                "ActivityRegularization"}
# activation name -> (probabilities?, independent two-class units?); None: not known
_ACTIVATIONS = {"softmax": (True, False), "sigmoid": (True, True), "linear": (False, None),
                "log_softmax": (False, False)}
# compiled loss (class or function name) -> independent two-class units?
_LOSSES = {"binary_crossentropy": True, "binary_focal_crossentropy": True,
           "categorical_crossentropy": False, "sparse_categorical_crossentropy": False,
           "categorical_focal_crossentropy": False}


@dataclass(frozen=True)
class OutputKind:
    """What a model's output holds, for the Fisher's label distribution.

    ``probabilities``: the output is p (else logits); ``bernoulli``: every output unit is an
    independent two-class distribution (sigmoid units, or one unit), else the last axis is
    one categorical distribution; ``decided_by``: how kmerge knows (recorded in the merge).
    """

    probabilities: bool
    bernoulli: bool
    decided_by: str


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



def _final_call(model):
    """The call that makes the model's single output, skipping value-preserving layers
    (Dropout, Identity, ...); None for a subclassed model or several outputs."""
    from kmerge.graph.replay import is_graph_model, walk

    if not is_graph_model(model):
        return None
    w = walk(model)
    if len(w.outputs) != 1:
        return None
    call = w.producer_call(w.outputs[0])
    while call is not None and type(call.op).__name__ in _TRANSPARENT and call.inputs:
        call = w.producer_call(call.inputs[0])
    return call


def _activation_name(op) -> str | None:
    """The activation a layer (or keras.ops operation) applies last; None when it has none."""
    cls = type(op).__name__
    if cls in ("Softmax", "Sigmoid", "LogSoftmax"):
        if cls == "Softmax" and getattr(op, "axis", -1) not in (-1, [-1], (-1,)):
            return f"softmax over axis {op.axis}"
        return {"Softmax": "softmax", "Sigmoid": "sigmoid", "LogSoftmax": "log_softmax"}[cls]
    act = getattr(op, "activation", None)
    if act is None:
        return None
    return getattr(act, "__name__", None) or type(act).__name__


def _loss_name(model) -> tuple[str, bool | None] | None:
    """(loss name, from_logits) of a compiled single-output classification loss, else None."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, (list, tuple)) and len(loss) == 1:
        loss = loss[0]
    if isinstance(loss, dict) and len(loss) == 1:
        loss = next(iter(loss.values()))
    if loss is None or isinstance(loss, (list, tuple, dict)):
        return None
    if isinstance(loss, str):
        name = loss
    else:
        fn = getattr(loss, "fn", loss)
        name = getattr(fn, "__name__", None) or type(loss).__name__
    name = name.lower()
    key = next((k for k in sorted(_LOSSES, key=len, reverse=True) if k in name
                or k.replace("_", "") in name), None)
    if key is None:
        return None
    return key, bool(getattr(loss, "from_logits", False))


def output_kind(model, outputs: str | None = None) -> OutputKind:
    """Whether ``model``'s single output holds probabilities or logits, decided from the
    model: the activation of the layer that makes the output (``softmax``/``sigmoid``:
    probabilities; ``linear``/``log_softmax``: logits; an ``Activation``/``Softmax`` layer
    counts), else the compiled loss's ``from_logits``. ``outputs="logits"|"probabilities"``
    says it explicitly (it wins over both).

    Sigmoid outputs, single-unit outputs and outputs trained with a binary cross-entropy
    are independent two-class units; otherwise the last axis is one categorical distribution.

    Raises:
        InvalidArgumentError: The model does not say (a ``relu`` or custom final activation,
            a subclassed model without a compiled classification loss), or its activation and
            compiled loss disagree; the message names the model and output layer, and the fix
            (``outputs="logits"`` or ``"probabilities"``).
    """
    if outputs is not None and outputs not in OUTPUTS:
        raise InvalidArgumentError(f"fisher: outputs must be one of {', '.join(OUTPUTS)} "
                                   f"(or None: decided from the model); received {outputs!r}")
    name = getattr(model, "name", type(model).__name__)
    units = None
    if getattr(model, "outputs", None) and len(model.outputs) == 1:
        units = model.outputs[0].shape[-1] if len(model.outputs[0].shape) > 1 else 1
    call = _final_call(model)
    act = _activation_name(call.op) if call is not None else None
    from_act = _ACTIVATIONS.get(act) if act is not None else None
    loss = _loss_name(model)
    where = (f"the output layer {call.name!r} ({type(call.op).__name__}) of model {name!r}"
             if call is not None else f"model {name!r}")
    fix = ("pass outputs='logits' or outputs='probabilities' (merge_weights(..., "
           "method='fisher', outputs=...)) to say what the output holds")
    bern_loss = None if loss is None else _LOSSES[loss[0]]

    def dist(bernoulli: bool | None) -> bool:
        if bernoulli is not None:
            return bernoulli
        if bern_loss is not None:
            return bern_loss
        return units == 1

    if outputs is not None:
        bern = from_act[1] if from_act is not None else None
        return OutputKind(outputs == "probabilities", dist(bern), f"outputs={outputs!r}")
    if from_act is not None and loss is not None and from_act[0] == loss[1]:
        # a softmax output trained with from_logits=True (or linear with from_logits=False)
        raise InvalidArgumentError(
            f"{where} applies {act!r} (so it outputs "
            f"{'probabilities' if from_act[0] else 'logits'}) but the model was compiled with "
            f"loss {loss[0]!r} from_logits={loss[1]}; kmerge cannot tell which is right: {fix}")
    if from_act is not None:
        return OutputKind(from_act[0], dist(from_act[1]),
                          f"activation {act!r} of {where}")
    if loss is not None:
        return OutputKind(not loss[1], dist(None),
                          f"compiled loss {loss[0]!r} from_logits={loss[1]} of model {name!r}")
    what = (f"{where} applies {act!r}" if act is not None else
            f"{where} has no activation kmerge can read" if call is not None else
            f"model {name!r} is subclassed (no output layer to read) and not compiled with a "
            "classification loss")
    raise InvalidArgumentError(
        f"method='fisher' needs to know whether the output is probabilities or logits, and "
        f"{what}: neither softmax/sigmoid (probabilities) nor linear (logits); {fix}")


def _log_probs_fn(kind: OutputKind):
    """out (batch, ..., k) -> log-probabilities (batch, m): every column one outcome of an
    independent distribution, so the Fisher is sum over columns of p (d log p)^2."""
    import keras

    ops = keras.ops

    def f(out):
        b = ops.shape(out)[0]
        k = ops.shape(out)[-1] if len(ops.shape(out)) > 1 else 1
        z = ops.reshape(out, (b, -1, k))
        if kind.bernoulli:
            if kind.probabilities:
                p = ops.clip(z, 1e-12, 1.0)
                q = ops.clip(1.0 - z, 1e-12, 1.0)
                lp = ops.stack([ops.log(q), ops.log(p)], axis=-1)
            else:
                lp = ops.stack([ops.log_sigmoid(-z), ops.log_sigmoid(z)], axis=-1)
        elif kind.probabilities:
            lp = ops.log(ops.clip(z, 1e-12, 1.0))
        else:
            lp = ops.log_softmax(z, axis=-1)
        return ops.reshape(lp, (b, -1))

    return f


def fisher_diagonals(model, x, *, samples: int = 256, batch: int = 32,
                     outputs: str | None = None,
                     kind: OutputKind | None = None) -> list[np.ndarray]:
    """Diagonal Fisher of every variable of ``model`` (zeros for non-trainable ones).

    F = mean_x sum_c p(c|x) (d log p(c|x) / d theta)^2: the exact expectation over the model's
    own label distribution (Matena & Raffel, 2022). One per-example Jacobian per batch:
    ``jax.jacrev`` + ``vmap``, ``tf.GradientTape.jacobian`` or ``torch.autograd.grad``.
    Whether the output is probabilities or logits comes from :func:`output_kind` (``outputs``
    overrides it; ``kind`` passes one already decided). Sigmoid units are independent
    two-class distributions (their Fishers add); otherwise each position's last axis is one
    categorical distribution.
    """
    import keras

    from kmerge.arguments import model_inputs

    xs = model_inputs(model, x, "data x")
    if len(xs) != 1:
        raise InvalidArgumentError(
            f"method='fisher' supports models with one input; {model.name!r} has {len(xs)}")
    x = xs[0][:samples]
    kind = kind or output_kind(model, outputs)
    if kind.probabilities and kind.decided_by.startswith("outputs="):
        first = predict_numpy(model, x[:batch])
        if first.min() < 0 or first.max() > 1:
            raise InvalidArgumentError(
                f"outputs='probabilities' but model {model.name!r} predicts values in "
                f"[{first.min():.3g}, {first.max():.3g}] on data x, outside [0, 1]: they are "
                "not probabilities; pass outputs='logits'")
    to_logp = _log_probs_fn(kind)
    trainable = list(model.trainable_variables)
    acc = [np.zeros(tuple(v.shape), np.float64) for v in trainable]
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        ntv = [v.value for v in model.non_trainable_variables]

        def logp_one(tv, xi):
            out, _ = model.stateless_call(tv, ntv, xi[None], training=False)
            lp = to_logp(out)[0]
            return lp, lp

        # one compiled function: the per-example Jacobian and the log-probabilities
        jac = jax.jit(jax.vmap(jax.jacrev(logp_one, has_aux=True), in_axes=(None, 0)))
        tv = [v.value for v in trainable]
        for s in range(0, len(x), batch):
            xb = jnp.asarray(x[s:s + batch])
            jacs, logp = jac(tv, xb)
            p = np.exp(np.asarray(logp, dtype=np.float64))
            for a, j in zip(acc, jacs):
                j = np.asarray(j, np.float64)
                a += np.tensordot(p, j ** 2, axes=([0, 1], [0, 1]))
    elif backend == "tensorflow":
        import tensorflow as tf

        for s in range(0, len(x), batch):
            xb = tf.convert_to_tensor(x[s:s + batch])
            with tf.GradientTape() as tape:
                logp = to_logp(model(xb, training=False))
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
            logp = to_logp(model(xb, training=False))
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
