"""Distil a two-CNN ensemble into a student with at most half the FLOPs (kmerge.students.like,
width 0.5) on real digits; student accuracy as a fraction of ensemble accuracy (target >= 98%).
Also the time per epoch of kmerge.distill (teacher outputs cached) against Keras's Distiller
(teacher run every batch) on the same merged ensemble.

    KERAS_BACKEND=jax .venv/bin/python bench/bench_distill.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from _common import cnn, header, table  # noqa: E402

EPOCHS = 30


def _acc(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))


def main() -> int:
    import keras

    import kmerge
    from kmerge.demo import digits

    header("bench_distill: two-model ensemble -> half-FLOPs student")
    x_tr, x_te, y_tr, y_te = digits(0)
    a = cnn("a", seed=0, size=16, width=16, bn=True)
    b = cnn("b", seed=1, size=16, width=16, bn=True)
    for m in (a, b):  # teachers trained properly: distilling weak teachers proves nothing
        m.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
        m.fit(x_tr, y_tr, epochs=10, batch_size=32, verbose=0)
    ens = kmerge.parallel({"a": a, "b": b}, combine="average")
    ens_acc = _acc(ens, x_te, y_te)

    t0 = time.perf_counter()
    student = kmerge.students.like(a, width=0.5, seed=0)
    kmerge.distill([a, b], student, x_tr, y=y_tr, epochs=EPOCHS, batch_size=32, seed=0,
                   verbose=0)
    distill_s = time.perf_counter() - t0
    st_acc = _acc(student, x_te, y_te)

    keras.utils.set_random_seed(0)
    scratch = kmerge.students.like(a, width=0.5, seed=0)
    scratch.compile("adam", "sparse_categorical_crossentropy")
    scratch.fit(x_tr, y_tr, epochs=EPOCHS, batch_size=32, verbose=0)
    scratch_acc = _acc(scratch, x_te, y_te)

    # Keras's Distiller runs the (merged) ensemble on every batch: time a few epochs.
    few = 3
    keras_student = kmerge.students.like(a, width=0.5, seed=0)
    probs_to_logits = keras.Model(ens.inputs, keras.layers.Lambda(
        lambda p: keras.ops.log(keras.ops.clip(p, 1e-12, 1.0)))(ens.output))
    distiller = keras.distillation.Distiller(
        teacher=probs_to_logits, student=keras_student,
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=3.0, loss=keras.losses.KLDivergence()),
        student_loss_weight=0.1)
    distiller.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    t0 = time.perf_counter()
    distiller.fit(x_tr, y_tr, epochs=few, batch_size=32, verbose=0)
    keras_s = (time.perf_counter() - t0) / few
    t0 = time.perf_counter()
    kmerge.distill([a, b], kmerge.students.like(a, width=0.5, seed=0), x_tr, y=y_tr, epochs=few,
                   batch_size=32, seed=0, verbose=0)
    ours_s = (time.perf_counter() - t0) / few

    fl_t = kmerge.students.count_flops(a) + kmerge.students.count_flops(b)
    fl_s = kmerge.students.count_flops(student)
    rows = [
        ("ensemble a+b (average)", f"{fl_t:,}", "1.00", f"{ens_acc:.3f}", "1.000"),
        ("student, distilled", f"{fl_s:,}", f"{fl_s / fl_t:.2f}", f"{st_acc:.3f}",
         f"{st_acc / ens_acc:.3f}"),
        ("student, labels only", f"{fl_s:,}", f"{fl_s / fl_t:.2f}", f"{scratch_acc:.3f}",
         f"{scratch_acc / ens_acc:.3f}"),
    ]
    print(table(rows, ("model", "FLOPs/sample", "FLOPs ratio", "test acc", "acc / ensemble")))
    print(f"distill {EPOCHS} epochs: {distill_s:.1f} s")
    print(f"seconds per epoch ({few} epochs, incl. compile): kmerge.distill {ours_s:.2f}, "
          f"keras Distiller {keras_s:.2f}, ratio {ours_s / keras_s:.2f}")
    ok = fl_s <= fl_t / 2 and st_acc / ens_acc >= 0.98
    print("target (<= half FLOPs, >= 98% of ensemble accuracy) met:", ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
