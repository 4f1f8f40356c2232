"""kmerge.fuse with an intermediate tap and the final output vs the hand-written way.

Case 1: one CNN ``a`` (trained one epoch on scikit-learn digits), taps ``conv_mid``
(a 16x16x32 feature map) and the last layer (class probabilities):

  kmerge        kmerge.fuse({"a": (a, ["conv_mid", -1])}, head=None).predict(x)
                (one graph; every source layer runs once; the map is global-average
                pooled inside the graph, pooling="auto")
  hand-written  keras.Model(a.inputs, a.get_layer("conv_mid").output).predict(x)
                -> numpy mean over axes (1, 2); a.predict(x); np.concatenate
                (what users write: the prefix upsample/conv_1/conv_mid runs twice)

Case 2: two CNNs, each tapped at ``conv_mid`` and at its last layer, fused in one graph,
against the same hand-written way for each model (four predict calls).

Also shown, for honesty, is the best hand-written alternative: one multi-output
``keras.Model(a.inputs, [conv_mid, a.output])`` which does not recompute the prefix either.

The structural check counts, per source layer, how often it runs: in the kmerge graph
(layers named ``<source>_<layer>``, each with exactly one inbound node) and in the
hand-written way (the number of sub-models that contain it).

    KERAS_BACKEND=jax .venv/bin/python bench/bench_taps.py
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    cnn,
    digits_batch,
    digits_train,
    header,
    interleaved_medians,
    table,
    train_briefly,
)

BATCH = 256
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
TARGET = 0.9
MID = "conv_mid"


def source_layers(model):
    import keras

    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def kmerge_runs(merged, sources: dict) -> tuple[Counter, bool, list[str]]:
    """Per source layer, how many merged-graph layers copy it and how often they are called."""
    runs: Counter = Counter()
    one_node = True
    problems = []
    by_name = {layer.name: layer for layer in merged.layers}
    for src_name, model in sources.items():
        for layer in source_layers(model):
            copy = by_name.get(f"{src_name}_{layer.name}")
            if copy is None:
                problems.append(f"{src_name}/{layer.name}: no copy named "
                                f"{src_name}_{layer.name} in the merged model")
                continue
            calls = len(copy._inbound_nodes)
            runs[f"{src_name}/{layer.name}"] += calls
            if calls != 1:
                one_node = False
                problems.append(f"{copy.name}: {calls} inbound nodes")
    prefixed = [
        layer.name for layer in merged.layers
        if any(layer.name.startswith(f"{s}_") for s in sources)
    ]
    if len(prefixed) != sum(len(source_layers(m)) for m in sources.values()):
        problems.append(f"{len(prefixed)} prefixed layers in the merged model: {prefixed}")
    return runs, one_node, problems


def handwritten_runs(subs: dict[str, list]) -> Counter:
    """Per source layer, how many of the hand-written sub-models run it."""
    runs: Counter = Counter()
    for src_name, models in subs.items():
        for sub in models:
            for layer in source_layers(sub):
                runs[f"{src_name}/{layer.name}"] += 1
    return runs


def main() -> int:
    t_start = time.perf_counter()
    import keras

    import kmerge

    header("bench_taps: kmerge.fuse (intermediate + final tap) vs hand-written sub-models")
    x = digits_batch(repeat=1)
    x_tr, y_tr = digits_train()
    a = cnn("cnn_a", seed=1, size=16, mid_name=MID)
    b = cnn("cnn_b", seed=2, size=16, mid_name=MID)
    train_briefly(a, x_tr, y_tr)
    train_briefly(b, x_tr, y_tr)
    print(f"data: {len(x)} real digit images (8x8x1), batch_size={BATCH}, repeats={REPEATS}; "
          f"taps: {MID!r} {tuple(a.get_layer(MID).output.shape)} and -1 (probs, (None, 10))")

    sources = {"a": a, "b": b}
    fused1 = kmerge.fuse({"a": (a, [MID, -1])}, head=None)
    fused2 = kmerge.fuse({"a": (a, [MID, -1]), "b": (b, [MID, -1])}, head=None)
    mids = {n: keras.Model(m.inputs, m.get_layer(MID).output, name=f"{n}_upto_mid")
            for n, m in sources.items()}
    # The best a user can do by hand: one model with two outputs (no recomputation).
    multi = {n: keras.Model(m.inputs, [m.get_layer(MID).output, m.output], name=f"{n}_multi")
             for n, m in sources.items()}

    def hand(names):
        feats = []
        for n in names:
            feats.append(mids[n].predict(x, batch_size=BATCH, verbose=0).mean(axis=(1, 2)))
            feats.append(sources[n].predict(x, batch_size=BATCH, verbose=0))
        return np.concatenate(feats, axis=-1)

    def hand_multi(names):
        feats = []
        for n in names:
            fmap, probs = multi[n].predict(x, batch_size=BATCH, verbose=0)
            feats += [fmap.mean(axis=(1, 2)), probs]
        return np.concatenate(feats, axis=-1)

    ways = {
        "kmerge_1": lambda: fused1.predict(x, batch_size=BATCH, verbose=0),
        "hand_1": lambda: hand(["a"]),
        "multi_1": lambda: hand_multi(["a"]),
        "kmerge_2": lambda: fused2.predict(x, batch_size=BATCH, verbose=0),
        "hand_2": lambda: hand(["a", "b"]),
        "multi_2": lambda: hand_multi(["a", "b"]),
    }

    # -- structure: every layer runs once in the kmerge graph ---------------------------
    ok_struct = True
    print()
    for label, merged, used, subs in [
        ("case 1 (a: conv_mid + last)", fused1, {"a": a}, {"a": [mids["a"], a]}),
        ("case 2 (a, b: conv_mid + last)", fused2, sources,
         {n: [mids[n], sources[n]] for n in sources}),
    ]:
        k_runs, one_node, problems = kmerge_runs(merged, used)
        h_runs = handwritten_runs(subs)
        twice = sorted(k for k, v in h_runs.items() if v > 1)
        ok = one_node and not problems and all(v == 1 for v in k_runs.values())
        ok_struct &= ok
        print(f"{label}: kmerge graph runs {sum(k_runs.values())} source-layer calls "
              f"({len(k_runs)} distinct layers, each exactly once, one inbound node each: {ok}); "
              f"hand-written runs {sum(h_runs.values())} "
              f"({len(twice)} prefix layers run twice: {', '.join(twice)})")
        for p in problems:
            print(f"  problem: {p}")

    # -- numbers agree -------------------------------------------------------------------
    agree = {}
    for case in ("1", "2"):
        got, want, best = ways[f"kmerge_{case}"](), ways[f"hand_{case}"](), ways[f"multi_{case}"]()
        ok = got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-6)
        ok_m = best.shape == want.shape and np.allclose(best, want, rtol=1e-5, atol=1e-6)
        diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("nan")
        agree[case] = ok and ok_m
        print(f"agree [case {case}]: kmerge vs hand-written allclose={ok} shape={got.shape} "
              f"max|diff|={diff:.2e}; multi-output vs hand-written allclose={ok_m}")

    # -- timing --------------------------------------------------------------------------
    med = interleaved_medians(ways, repeats=REPEATS, warmup=0)  # agreement warmed up
    rows = []
    ratios = []
    for case, label in (("1", "case 1: a[conv_mid, -1]"), ("2", "case 2: a,b[conv_mid, -1]")):
        k, h, mu = med[f"kmerge_{case}"], med[f"hand_{case}"], med[f"multi_{case}"]
        ratios.append(k / h)
        rows.append((label, f"{k:.3f}", f"{h:.3f}", f"{k / h:.2f}", f"{mu:.3f}", f"{k / mu:.2f}"))
    print()
    print(table(rows, ("fuse", "kmerge s", "hand-written s", "ratio kmerge/hand",
                       "multi-output s", "ratio kmerge/multi")))
    worst = max(ratios)
    verdict = "MEETS" if worst <= TARGET else "MISSES"
    print()
    print(f"verdict: {verdict} target kmerge/hand-written <= {TARGET} "
          f"(ratios {', '.join(f'{r:.2f}' for r in ratios)}); every layer runs once: {ok_struct}; "
          f"features agree: {all(agree.values())}; wall {time.perf_counter() - t_start:.0f} s")
    return 0 if ok_struct and all(agree.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
