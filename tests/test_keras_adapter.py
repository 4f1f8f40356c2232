"""Every private Keras name kmerge uses, called once (kmerge/_keras.py): a Keras release that
moves one fails here, by name, rather than somewhere deep in a merge."""

from pathlib import Path

import keras
import numpy as np

from kmerge import _keras


def _model():
    keras.utils.set_random_seed(0)
    block = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, name="inner")],
                             name="block")
    inp = keras.Input((4,), name="x")
    h = keras.layers.Dense(3, name="d")(inp)
    h = keras.layers.Dropout(0.5, name="drop")(block(h))
    return keras.Model(inp, keras.ops.relu(h), name="m"), block


def test_graph_access():
    m, block = _model()
    assert _keras.is_functional(m) and not _keras.is_functional(block)
    seq_graph = _keras.sequential_graph(block)
    assert _keras.is_functional(seq_graph)
    nodes = _keras.graph_nodes(m)
    assert [type(n.operation).__name__ for n in nodes] == ["Dense", "Sequential", "Dropout",
                                                           "Relu"]
    first = nodes[0]
    args, kwargs = _keras.node_call_args(first)
    assert args[0] is m.inputs[0] and kwargs == {}
    filled, _ = _keras.fill_in(first, {id(m.inputs[0]): "value"})
    assert filled == ("value",)
    op, node_index, tensor_index = _keras.history(m.outputs[0])
    assert type(op).__name__ == "Relu" and (node_index, tensor_index) == (0, 0)
    assert _keras.inputs_struct(m) is not None and _keras.inputs_struct(block) is None


def test_layer_access():
    m, block = _model()
    names = [layer.name for layer in _keras.sublayers(m)]
    assert names[0] == "m" and {"d", "block", "inner", "drop"} <= set(names)
    gens = list(_keras.seed_generators(m))
    assert len(gens) == 1 and isinstance(gens[0], keras.random.SeedGenerator)
    assert _keras.call_has_training_arg(m.get_layer("drop"))

    class Plain(keras.layers.Layer):
        def call(self, x):
            return x

    assert not _keras.call_has_training_arg(Plain())


def test_build_shapes_of_a_subclassed_model():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    s = Sub()
    s(np.zeros((1, 5), "float32"))
    assert _keras.build_shapes(s) == [(1, 5)]


def test_saving_internals():
    m, _ = _model()
    config = m.get_config()
    with _keras.skeleton_scope():
        skeleton = keras.Model.from_config(config)
    assert [layer.name for layer in skeleton.layers] == [layer.name for layer in m.layers]
    with _keras.safe_mode_scope(True):
        pass
    # the Keras 2 path: a file written by tf_keras 2.21 (tests/data/make_legacy.py)
    import kmerge

    model = kmerge.load(Path(__file__).parent / "data" / "legacy" / "mlp.h5")
    assert model.count_params() > 0


def test_node_counts_and_truncate_nodes():
    inp = keras.Input((3,))
    dense = keras.layers.Dense(2)
    keras.Model(inp, dense(inp))
    before = _keras.node_counts(dense)
    assert before == (1, 0)
    dense(keras.Input((3,)))  # a second call records a second inbound node
    assert _keras.node_counts(dense) == (2, 0)
    _keras.truncate_nodes(dense, before)
    assert _keras.node_counts(dense) == before
