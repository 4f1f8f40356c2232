"""Describe a model for people: layers, shapes, parameters, and good places to tap."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import keras

from kmerge.graph.rebuild import is_graph_model


@dataclass
class LayerRow:
    index: int | None  # what a tap by index means (top-level layers only; nested: by path)
    path: str
    type: str
    output_shape: str
    params: int
    trainable: bool


@dataclass
class ModelSummary:
    name: str
    kind: str
    format: str | None
    keras_version: str | None
    repairs: list[str]
    inputs: list[str]
    outputs: list[str]
    layers: list[LayerRow] = field(default_factory=list)
    suggested_taps: list[str] = field(default_factory=list)
    params: int = 0
    kmerge: dict | None = None  # kmerge.info(model) of a model kmerge made

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"model {self.name!r} ({self.kind}); format: {self.format or 'in memory'}"
                 f"{'; saved by Keras ' + self.keras_version if self.keras_version else ''}"]
        if self.repairs:
            lines.append(f"repairs ({len(self.repairs)}):")
            lines.extend(f"  - {r}" for r in self.repairs)
        else:
            lines.append("repairs: none needed")
        lines.append("inputs:  " + ", ".join(self.inputs))
        lines.append("outputs: " + ", ".join(self.outputs))
        rows = [("#", "layer", "type", "output shape", "params", "trainable")]
        rows += [("" if r.index is None else str(r.index), r.path, r.type, r.output_shape,
                  f"{r.params:,}", "yes" if r.trainable else "no") for r in self.layers]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        for j, r in enumerate(rows):
            lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
            if j == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        lines.append(f"parameters: {self.params:,}")
        lines.append("suggested taps for fuse: " + (", ".join(self.suggested_taps) or "none"))
        lines.append("taps and cuts take a name, a nested path ('block/conv') or the # index")
        lines.extend(_describe_meta(self.kmerge))
        return "\n".join(lines)


def _shape(layer) -> str:
    try:
        out = layer.output
    except (AttributeError, ValueError):
        return "?"
    shapes = [tuple(t.shape) for t in keras.tree.flatten(out)]
    return ", ".join(str(s) for s in shapes)


def _walk(model, prefix: str, rows: list[LayerRow]) -> None:
    for index, layer in enumerate(model.layers):
        if isinstance(layer, keras.layers.InputLayer) and prefix:
            continue  # nested inputs are fed by the outer graph
        path = prefix + layer.name
        rows.append(LayerRow(None if prefix else index, path, type(layer).__name__, _shape(layer),
                             int(layer.count_params()) if layer.built else 0, bool(layer.trainable)))
        if is_graph_model(layer):
            _walk(layer, path + "/", rows)


_FLATTENERS = ("Flatten", "GlobalAveragePooling", "GlobalMaxPooling")


def suggest_taps(rows: list[LayerRow]) -> list[str]:
    """The last feature map before flattening/pooling, and the penultimate dense layer."""
    taps = []
    flat = [r for r in rows if r.type not in ("Sequential", "Functional", "InputLayer")]
    for i, r in enumerate(flat):
        if r.type.startswith(_FLATTENERS) and i > 0:
            j = i - 1
            while j > 0 and flat[j].type in ("Dropout", "Activation", "SpatialDropout2D"):
                j -= 1
            taps.append(flat[j].path)
    dense = [r.path for r in flat if r.type == "Dense"]
    if len(dense) >= 2:
        taps.append(dense[-2])
    seen: list[str] = []
    for t in taps:
        if t not in seen:
            seen.append(t)
    return seen[-3:]


def _describe_meta(meta: dict | None) -> list[str]:
    """What kmerge recorded about a model it made, for people."""
    if not meta:
        return []
    lines = [f"made by kmerge: {meta.get('kind', '?')}"
             + (f", method {meta['method']}" if meta.get("method") else "")
             + (f", combine {meta['combine']}" if meta.get("combine") else "")
             + (f", head {meta['head']}" if meta.get("head") not in (None, "none") else "")]
    for name, src in (meta.get("sources") or {}).items():
        if isinstance(src, dict):
            lines.append(f"  source {name}: {'frozen' if src.get('frozen') else 'trainable'}"
                         f"{', from ' + src['path'] if src.get('path') else ''}")
    for adapter in meta.get("adapters") or []:
        lines.append(f"  adapter: {adapter}")
    if meta.get("source_paths"):
        lines.append(f"  derived from (kmerge.save never overwrites these): "
                     f"{', '.join(meta['source_paths'])}")
    return lines


def summarize(model: keras.Model) -> ModelSummary:
    from kmerge.io import load_info
    from kmerge.metadata import info as kmerge_info

    info = load_info(model)
    rows: list[LayerRow] = []
    if is_graph_model(model):
        _walk(model, "", rows)
    return ModelSummary(
        name=model.name,
        kind=type(model).__name__ if is_graph_model(model) else f"subclassed {type(model).__name__}",
        format=getattr(info, "format", None),
        keras_version=getattr(info, "keras_version", None),
        repairs=list(getattr(info, "repairs", ()) or ()),
        inputs=[f"{t.name} {tuple(t.shape)} {t.dtype}" for t in model.inputs],
        outputs=[f"{tuple(t.shape)} {t.dtype}" for t in model.outputs],
        layers=rows,
        suggested_taps=suggest_taps(rows),
        params=int(model.count_params()),
        kmerge=kmerge_info(model),
    )
