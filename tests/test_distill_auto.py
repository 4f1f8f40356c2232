"""distill(alpha="auto"): labels alone is a candidate and wins unless distillation is better on
held-out data; per-example trust; the search is recorded; explicit alpha is plain Hinton; bad
arguments are typed errors before any training."""

import keras
import numpy as np
import pytest
from conftest import same_weights

import kmerge
from kmerge.distillation import _Trainer, output_kind, teacher_logits, teacher_trust
from kmerge.errors import InvalidArgumentError

# The student sees few labelled examples for many epochs: labels alone overfit them, the teacher's
# soft targets do not (measured: held-out 0.86 labels alone, 0.98 distilled on jax).
N, EPOCHS, SPLIT = 150, 30, 0.3


def mlp(name, hidden, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(hidden, activation="relu"),
                             keras.layers.Dense(10, activation="softmax")], name=name)


@pytest.fixture(scope="module")
def setup():
    from kmerge.demo import digits

    x_tr, x_te, y_tr, y_te = digits(0)
    teacher = mlp("teacher", 32, 0)
    teacher.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    teacher.fit(x_tr, y_tr, epochs=8, batch_size=64, verbose=0)
    # useless: the same teacher with its classes rotated, confidently wrong on every example
    useless = keras.models.clone_model(teacher)
    useless.set_weights(teacher.get_weights())
    k, b = useless.layers[-1].get_weights()
    perm = np.roll(np.arange(10), 3)
    useless.layers[-1].set_weights([k[:, perm], b[perm]])
    return x_tr, y_tr, x_te, y_te, teacher, useless


def _acc(m, x, y):
    return float(np.mean(np.argmax(m.predict(x, verbose=0), -1) == y))


def _run(teacher, x, y, **kw):
    kw.setdefault("optimizer", keras.optimizers.Adam(1e-2))
    kw.setdefault("validation_split", SPLIT)
    kw.setdefault("epochs", EPOCHS)
    return kmerge.distill(teacher, mlp("student", 32, 1), x, y=y, batch_size=32, seed=0,
                          verbose=0, **kw)


def test_auto_distills_from_a_good_teacher_and_records_the_search(setup):
    x, y, x_te, y_te, teacher, _ = setup
    x, y = x[:N], y[:N]
    s = _run(teacher, x, y)
    d = kmerge.info(s)["distill"]
    search = d["search"]
    assert d["alpha"] > 0 and d["trust"] == "confidence"
    alphas = [c["alpha"] for c in search["candidates"]]
    assert alphas[0] == 0.0 and len(alphas) == 3
    assert search["baseline"] == search["candidates"][0]
    chosen = search["chosen"]
    assert (chosen["alpha"], chosen["temperature"]) == (d["alpha"], d["temperature"])
    assert chosen["wins"] - chosen["losses"] > 0
    assert chosen["accuracy"] > search["baseline"]["accuracy"]
    assert search["held_out"] == pytest.approx(SPLIT * N, abs=10)
    assert search["trial_epochs"] == EPOCHS and search["cost_epochs"] > 0
    # the labels-only student at the same budget (same loop, seed, batch order) is worse
    base = _run(teacher, x, y, alpha=0.0)
    assert kmerge.info(base)["distill"]["alpha"] == 0.0 and "search" not in kmerge.info(base)[
        "distill"]
    assert _acc(s, x_te, y_te) > _acc(base, x_te, y_te)


def test_auto_keeps_the_labels_when_the_teacher_is_useless(setup):
    # more data, fewer epochs: the student does not overfit, so soft targets cannot help as a
    # regulariser (in the small-data setting a rotated teacher at T=4, trusted at ~3%, acts as
    # label smoothing and can legitimately win on held-out data)
    x, y, _, _, _, useless = setup
    x, y = x[:600], y[:600]
    s = _run(useless, x, y, epochs=4)
    d = kmerge.info(s)["distill"]
    assert d["alpha"] == 0.0
    assert d["search"]["chosen"] == d["search"]["baseline"]
    assert d["trust_mean"] < 0.2  # confidently wrong everywhere: trusted nowhere
    # choosing labels alone gives exactly the labels-only student (same loop and seed)
    base = _run(useless, x, y, alpha=0.0, epochs=4)
    assert same_weights([np.array(w) for w in s.get_weights()],
                        [np.array(w) for w in base.get_weights()])
    assert s.layers[-1].activation.__name__ == "softmax"  # restored after the trials


def test_explicit_alpha_is_plain_hinton_without_search(setup):
    x, y, _, _, teacher, _ = setup
    s = _run(teacher, x[:N], y[:N], alpha=0.9, epochs=2)
    d = kmerge.info(s)["distill"]
    assert (d["alpha"], d["temperature"], d["trust"]) == (0.9, 3.0, "uniform")
    assert "search" not in d and len(d["history"]["loss"]) == 2
    # the loss is Keras's LogitsDistillation blend, a_i = alpha for every row
    rng = np.random.default_rng(0)
    t, sl = rng.normal(size=(5, 10)).astype("float32"), rng.normal(size=(5, 10)).astype("float32")
    lab = np.arange(5)
    tr = _Trainer(mlp("m", 4, 0), classes=10, temperature=1.0, alpha=0.0, labels="sparse",
                  student_probs=False, per_sample=True)
    packed = np.concatenate([t, lab[:, None], np.full((5, 1), 0.9), np.full((5, 1), 3.0)],
                            1).astype("float32")
    ours = float(keras.ops.convert_to_numpy(tr.compute_loss(y=packed, y_pred=sl)))
    kd = keras.distillation.LogitsDistillation(
        temperature=3.0, loss=keras.losses.KLDivergence()).compute_loss(t, sl)
    ce = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(lab, sl, from_logits=True))
    ref = 0.9 * float(keras.ops.convert_to_numpy(kd)) + 0.1 * float(keras.ops.convert_to_numpy(ce))
    assert ours == pytest.approx(ref, rel=1e-4)


def test_trust_and_teacher_kind(setup):
    x, y, _, _, teacher, useless = setup
    logits = teacher_logits([teacher], x[:50])
    onehot = np.eye(10, dtype="float32")[y[:50]]
    w = teacher_trust(logits, onehot)
    right = logits.argmax(-1) == y[:50]
    assert np.all(w[right] == pytest.approx(1.0)) and np.all(w <= 1.0 + 1e-6)
    assert np.all(teacher_trust(teacher_logits([useless], x[:50]), onehot) < 1.0)
    # read from the final layer, not from the values: softmax -> probabilities, Dense -> logits
    assert output_kind(teacher) == "probabilities"
    lin = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                            keras.layers.Dense(10)])
    assert output_kind(lin) == "logits"
    ens = kmerge.parallel({"a": teacher, "b": useless}, combine="average")
    assert output_kind(ens) == "probabilities"
    np.testing.assert_allclose(teacher_logits([ens], x[:5]), np.log(ens.predict(x[:5], verbose=0)),
                               atol=1e-4)


@pytest.mark.parametrize("kw, match", [
    ({"alpha": "best"}, "alpha must be 'auto' or a number"),
    ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
    ({"temperature": 0}, "temperature must be a number > 0"),
    ({"temperature": "auto"}, "temperature must be a number"),
    ({"validation_split": 1.0}, r"validation_split must be a number in \(0, 1\)"),
    ({"trial_epochs": 0}, "trial_epochs must be an integer >= 1"),
    ({"trust": "some"}, "trust must be 'auto', 'confidence' or 'uniform'"),
])
def test_bad_arguments_are_typed_errors_before_training(setup, kw, match):
    x, y, _, _, teacher, _ = setup
    student = mlp("student", 8, 1)
    w0 = [np.array(w) for w in student.get_weights()]
    with pytest.raises(InvalidArgumentError, match=match):
        kmerge.distill(teacher, student, x, y=y, epochs=1, verbose=0, **kw)
    assert same_weights(w0, [np.array(w) for w in student.get_weights()])


def test_auto_with_too_few_examples_says_what_to_do(setup):
    x, y, _, _, teacher, _ = setup
    with pytest.raises(InvalidArgumentError, match="holds out .* pass more data, or a number"):
        kmerge.distill(teacher, mlp("student", 8, 1), x[:3], y=np.array([0, 1, 2]), epochs=1,
                       verbose=0)
