"""Reading and editing TFLite flatbuffers with TensorFlow's own schema and tools (shared by the model edits of
`rga_keras.export.tflite` and `rga_keras.export.hybrid`)."""
from __future__ import annotations

import functools


def tflite_schema():
    """(schema_py_generated, flatbuffer_utils): TFLite's object schema and its read/write helpers."""
    from tensorflow.lite.python import schema_py_generated
    from tensorflow.lite.tools import flatbuffer_utils

    return schema_py_generated, flatbuffer_utils


def op_name(model, op) -> str:
    """The builtin name ("CONV_2D", "ADD", ...) of ``op``, an operator of the parsed ``model``. Codes above 127
    live in ``builtinCode`` only, older ones in ``deprecatedBuiltinCode`` too: the larger of the two is the code."""
    code = model.operatorCodes[op.opcodeIndex]
    return _builtin_names()[max(code.builtinCode, code.deprecatedBuiltinCode)]


@functools.cache
def _builtin_names() -> dict[int, str]:
    schema, _ = tflite_schema()
    return {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
