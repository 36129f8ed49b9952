"""The dynamic-range TFLite model with the ops that matter given their float32 weights back.

A dynamic-range ("hybrid") op holds int8 weights and quantises its float32 input on the fly; with its float32
weights back it is the float32 model's op, computing exactly what that one computes (no other op changes).
Which ops get them back is measured on the calibration images (training images, never query/gallery): each
candidate alone is restored and the error of the model's embeddings against the float32 model's is measured
on the calibration images the unedited model gets most wrong (`WORST_IMAGES` of them; the worst-image gate is
the one quantisation misses, docs/EXPORT.md). The chosen set is the one with the largest summed gain whose
extra bytes fit the budget (`best_subset`, an exact 0/1 knapsack).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from rga_keras.export.flatbuffer import op_name, tflite_schema
from rga_keras.export.model import ExportError, cosine_rows

# The float32 weights given back may make the dynamic-range model this fraction larger (on the README demo
# model: 26.32 MiB → at most 26.98 MiB, under issue 12's 27 MiB).
FLOAT_WEIGHT_BUDGET = 0.025
WORST_IMAGES = 32  # calibration images the candidates are measured on: those the unedited model gets most wrong
_BYTES_PER_WEIGHT = 3  # float32 (4 bytes) instead of int8 (1 byte)
_KNAPSACK_UNITS = 100_000  # the knapsack counts costs in at most this many units of the budget (rounded up)


def int8_weight_ops(quantised: bytes) -> list[dict]:
    """The ops of a dynamic-range TFLite model with int8 constant inputs (their weights):
    [{"index" (in the op list), "op", "tensor" (the weight tensor's name), "weights" (count)}]."""
    schema, utils = tflite_schema()
    model = utils.read_model_from_bytearray(quantised)
    graph = model.subgraphs[0]
    ops = []
    for index, op in enumerate(graph.operators):
        for i in op.inputs:
            tensor = graph.tensors[i] if i >= 0 else None
            constant = tensor is not None and model.buffers[tensor.buffer].data is not None
            if constant and tensor.type == schema.TensorType.INT8:
                ops.append({"index": index, "op": op_name(model, op), "tensor": tensor.name.decode(),
                            "weights": int(np.prod(tensor.shape))})
    return ops


class WeightRestorer:
    """``restorer(ops)``: ``quantised`` (dynamic-range) with the int8 weights of the ops at ``ops`` (op-list
    indices) replaced by the float32 weights of the same ops in ``float32``, the float32 conversion of the same
    model (the two converters emit the same op list; checked op by op). Both models are parsed once, so many op
    sets are cheap to try; each edit is undone after writing."""

    def __init__(self, quantised: bytes, float32: bytes) -> None:
        self.schema, self.utils = tflite_schema()
        self.model = self.utils.read_model_from_bytearray(quantised)
        self.source = self.utils.read_model_from_bytearray(float32)
        graph, reference = self.model.subgraphs[0], self.source.subgraphs[0]
        if len(graph.operators) != len(reference.operators):
            raise ExportError(f"the float32 model has {len(reference.operators)} ops, the dynamic-range model "
                              f"{len(graph.operators)}: they are not conversions of the same model")

    def _pairs(self, index: int):
        """(int8 weight tensor, its float32 twin) of op ``index``."""
        graph, reference = self.model.subgraphs[0], self.source.subgraphs[0]
        op, twin = graph.operators[index], reference.operators[index]
        for slot, i in enumerate(op.inputs):
            tensor = graph.tensors[i] if i >= 0 else None
            if tensor is None or tensor.type != self.schema.TensorType.INT8:
                continue
            original = reference.tensors[twin.inputs[slot]]
            if original.name != tensor.name or list(original.shape) != list(tensor.shape) \
                    or original.type != self.schema.TensorType.FLOAT32:
                raise ExportError(f"op {index}'s weights {tensor.name.decode()} have no float32 twin in the float32 "
                                  f"model (found {original.name.decode()} {list(original.shape)})")
            yield tensor, original

    def __call__(self, ops: Sequence[int]) -> bytes:
        float32, buffers, undo = self.schema.TensorType.FLOAT32, self.model.buffers, []
        for index in ops:
            for tensor, original in self._pairs(index):
                undo.append((tensor, tensor.type, tensor.quantization, buffers[tensor.buffer].data))
                tensor.type, tensor.quantization = float32, None
                buffers[tensor.buffer].data = self.source.buffers[original.buffer].data
        try:
            return bytes(self.utils.convert_object_to_bytearray(self.model))
        finally:
            for tensor, dtype, quantization, data in reversed(undo):
                tensor.type, tensor.quantization, buffers[tensor.buffer].data = dtype, quantization, data


def best_subset(gains: Sequence[float], costs: Sequence[int], budget: int) -> list[int]:
    """The indices whose summed gain is largest with summed cost <= ``budget`` (0/1 knapsack by dynamic
    programming; items with gain <= 0 are never taken; ties: the earlier items). Costs are counted in units
    of ceil(budget / `_KNAPSACK_UNITS`), rounded up, so a large budget stays cheap and is never exceeded."""
    unit = max(1, -(-int(budget) // _KNAPSACK_UNITS))
    capacity = int(budget) // unit
    value = np.zeros(capacity + 1)  # best gain with at most this many units
    taken = np.zeros((len(gains), capacity + 1), bool)
    for n, (gain, cost) in enumerate(zip(gains, costs)):
        units = -(-int(cost) // unit)
        if gain <= 0 or units > capacity:
            continue
        with_it = value[: capacity + 1 - units] + gain
        better = with_it > value[units:]
        taken[n, units:] = better
        value[units:] = np.where(better, with_it, value[units:])
    chosen, left = [], capacity
    for n in reversed(range(len(gains))):
        if taken[n, left]:
            chosen.append(n)
            left -= -(-int(costs[n]) // unit)
    return sorted(chosen)


def choose_float_weights(quantised: bytes, float32: bytes, images: np.ndarray,
                         embed: Callable[[bytes, np.ndarray], np.ndarray], *,
                         budget: float | None = None, worst: int = WORST_IMAGES,
                         log: Callable[[str], None] | None = None) -> tuple[bytes, dict]:
    """The dynamic-range model ``quantised`` with the measured best ops back in float32 (see above).

    ``images``: calibration images (n, H, W, 3) raw pixels; ``embed(flatbuffer, images)``: embeddings of a
    TFLite model. Each candidate (an op whose float32 weights alone fit ``budget`` × the model's size;
    default `FLOAT_WEIGHT_BUDGET`) is scored by its gain: the drop of the mean of 1 − cosine to the float32
    model over the ``worst`` images.
    Returns the edited model and {"float_weight_ops": [{"index", "op", "tensor", "weights", "gain"}],
    "calibration_worst_images", "calibration_error" {"before", "after"}, "size_budget_bytes"}.
    """
    log = log or (lambda line: None)
    reference = embed(float32, images)
    error = 1.0 - cosine_rows(embed(quantised, images), reference)
    hardest = np.argsort(-error, kind="stable")[: max(1, min(worst, len(images)))]
    subset, reference = images[hardest], reference[hardest]
    before = float(error[hardest].mean())
    extra = int(len(quantised) * (FLOAT_WEIGHT_BUDGET if budget is None else budget))
    candidates = [c for c in int8_weight_ops(quantised) if _BYTES_PER_WEIGHT * c["weights"] <= extra]
    log(f"dynamic: measuring {len(candidates)} ops with float32 weights on the {len(subset)} calibration images "
        f"furthest from the float32 model (mean 1 - cosine {before:.5f})")
    restore = WeightRestorer(quantised, float32)
    for c in candidates:
        edited = restore([c["index"]])
        c["gain"] = before - float((1.0 - cosine_rows(embed(edited, subset), reference)).mean())
    chosen = [candidates[n] for n in best_subset([c["gain"] for c in candidates],
                                                 [_BYTES_PER_WEIGHT * c["weights"] for c in candidates], extra)]
    edited = restore([c["index"] for c in chosen])
    after = float((1.0 - cosine_rows(embed(edited, subset), reference)).mean())
    log(f"dynamic: {len(chosen)} op(s) given float32 weights (+{len(edited) - len(quantised)} bytes), mean "
        f"1 - cosine {before:.5f} -> {after:.5f}: " + (", ".join(c["tensor"] for c in chosen) or "none"))
    return edited, {"float_weight_ops": chosen, "calibration_worst_images": len(subset),
                    "calibration_error": {"before": before, "after": after},
                    "size_budget_bytes": len(quantised) + extra}
