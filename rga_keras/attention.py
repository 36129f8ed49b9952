"""Every attention a backbone can place, in one table: the RGA modes of the paper's Table 1 and the comparison
schemes of its Table 2 (`rga_keras.schemes`, docs/SCHEMES.md).

``ATTENTIONS[name].make(name=..., dtype=..., synchronized_bn=..., rga_options=...)`` makes one module; it sits
after each chosen stage (as RGA), or, where ``in_blocks``, on the residual branch of every bottleneck of the
chosen stages before the addition (as SE-ResNet). The names are what `RGAResNetBackbone` (``attention=``), the
presets, the configs (``model.attention``) and the programs (``--attention``) accept; None is the baseline.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import keras

from rga_keras.layers import RGA
from rga_keras.schemes import CBAM, FCAttention, NonLocal, SimplifiedNonLocal, SqueezeExcitation


@dataclasses.dataclass(frozen=True)
class Attention:
    """One attention design: what it is, how to make its layer, where it sits, and the layer's class."""

    description: str
    make: Callable[..., keras.layers.Layer]
    layer_class: type
    in_blocks: bool = False
    table: int = 1  # the paper's table that compares it: 1 (RGA modes) or 2 (the other schemes)


def _rga(mode: str) -> Callable[..., keras.layers.Layer]:
    def make(*, name: str, dtype: Any = None, synchronized_bn: bool = False, rga_options: Any = None):
        return RGA(mode, rga_options, synchronized_bn, name=name, dtype=dtype)

    return make


def _scheme(layer_class: type, *args: Any, batch_norm: bool = True) -> Callable[..., keras.layers.Layer]:
    """A maker of a Table 2 layer; ``batch_norm=False`` for layers without BatchNorm (no ``synchronized_bn``)."""
    def make(*, name: str, dtype: Any = None, synchronized_bn: bool = False, rga_options: Any = None):
        extra = {"synchronized_bn": synchronized_bn} if batch_norm else {}
        return layer_class(*args, name=name, dtype=dtype, **extra)

    return make


ATTENTIONS: dict[str, Attention] = {
    "s": Attention("RGA-S after each stage (Table 1)", _rga("s"), RGA),
    "c": Attention("RGA-C after each stage (Table 1)", _rga("c"), RGA),
    "sc": Attention("RGA-S then RGA-C after each stage: the paper's model (Table 1)", _rga("sc"), RGA),
    "cs": Attention("RGA-C then RGA-S after each stage (Table 1)", _rga("cs"), RGA),
    "s//c": Attention("RGA-S and RGA-C in parallel, X·a_s·a_c (Table 1, S//C)", _rga("s//c"), RGA),
    # Ratios: SE 16 (SE-ResNet-50), CBAM-C and FC 8, NL C/4 inner width: the standard designs that reproduce the
    # paper's Table 3 counts (docs/SCHEMES.md).
    "se": Attention("SE, reduction 16, in every bottleneck (SE-ResNet-50; Table 2, channel)",
                    _scheme(SqueezeExcitation, 16, batch_norm=False), SqueezeExcitation, in_blocks=True, table=2),
    "cbam_c": Attention("CBAM channel attention, reduction 8, after each stage (Table 2, channel)",
                        _scheme(CBAM, "c", 8), CBAM, table=2),
    "cbam_s": Attention("CBAM spatial attention, 7×7 conv, after each stage (Table 2, spatial)",
                        _scheme(CBAM, "s"), CBAM, table=2),
    "cbam_cs": Attention("CBAM channel then spatial attention, after each stage (Table 2, both)",
                         _scheme(CBAM, "cs", 8), CBAM, table=2),
    "fc_s": Attention("FC spatial attention, 1×1 embedding C/8, FCs N→N/8→N, after each stage (Table 2, spatial)",
                      _scheme(FCAttention, "s", 8), FCAttention, table=2),
    "fc_c": Attention("FC channel attention, 1×1 embedding C/8, FC C/8→C, after each stage (Table 2, channel)",
                      _scheme(FCAttention, "c", 8), FCAttention, table=2),
    "fc_s/c": Attention("FC spatial and channel attention in parallel, after each stage (Table 2, both)",
                        _scheme(FCAttention, "s/c", 8), FCAttention, table=2),
    "nl": Attention("Non-local block, inner width C/4, after each stage (Table 2, spatial)",
                    _scheme(NonLocal, 4), NonLocal, table=2),
    "snl": Attention("Simplified non-local block (GCNet §3.3), after each stage (Table 2, spatial)",
                     _scheme(SimplifiedNonLocal, batch_norm=False), SimplifiedNonLocal, table=2),
}
ATTENTION_LAYERS = tuple(dict.fromkeys(spec.layer_class for spec in ATTENTIONS.values()))


def attention_slug(name: str) -> str:
    """``name`` as it appears in layer, model and preset names ("s//c" → "s_par_c", "fc_s/c" → "fc_s_c")."""
    return name.replace("//", "_par_").replace("/", "_")


def check_attention(name: str | None) -> None:
    """None (the baseline) or a name of `ATTENTIONS`; a ValueError listing them otherwise."""
    if name is not None and name not in ATTENTIONS:
        raise ValueError(f"attention must be None or one of {tuple(ATTENTIONS)}, got {name!r}")
