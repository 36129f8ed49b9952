"""The paper's network variants by name (Tables 1, 2 and 4 of Zhang et al., CVPR 2020).

Architecture only: the official code publishes no trained weights to download. Each preset is the
backbone's configuration; ``RGAReID.from_preset(name, num_classes=…)`` adds the re-id head.
"""
from __future__ import annotations

from typing import Any

from rga_keras.attention import ATTENTIONS, attention_slug

PRESETS: dict[str, dict[str, Any]] = {
    "baseline_resnet50": {"description": "ResNet-50, last stride 1, no attention (the paper's baseline)",
                          "attention": None},
    "rga_s_resnet50": {"description": "RGA-S after every stage (Table 1)", "attention": "s"},
    "rga_c_resnet50": {"description": "RGA-C after every stage (Table 1)", "attention": "c"},
    "rga_sc_resnet50": {"description": "RGA-S then RGA-C after every stage: the paper's model", "attention": "sc"},
    "rga_cs_resnet50": {"description": "RGA-C then RGA-S (Table 1)", "attention": "cs"},
    "rga_s_par_c_resnet50": {"description": "RGA-S and RGA-C in parallel, X·a_s·a_c (Table 1, S//C)",
                             "attention": "s//c"},
    "rga_sc_wo_rel_resnet50": {"description": "RGA-SC without the relation term (Table 1, w/o Rel.)",
                               "attention": "sc", "rga_options": {"use_relation": False}},
    "rga_sc_wo_ori_resnet50": {"description": "RGA-SC without the original feature (Table 1, w/o Ori.)",
                               "attention": "sc", "rga_options": {"use_original": False}},
    "rga_sc_symmetric_resnet50": {"description": "RGA-SC with one shared embedding θ = φ (Table 4)",
                                  "attention": "sc", "rga_options": {"embedding": "symmetric"}},
    "rga_sc_no_embedding_resnet50": {"description": "RGA-SC, affinities of the raw features (Table 4)",
                                     "attention": "sc", "rga_options": {"embedding": "none"}},
}
# The comparison schemes of Table 2 (rga_keras.schemes; docs/SCHEMES.md): "se_resnet50", "cbam_cs_resnet50", ...
PRESETS.update({f"{attention_slug(name)}_resnet50": {"description": spec.description, "attention": name}
                for name, spec in ATTENTIONS.items() if spec.table == 2})


def backbone_config(preset: str) -> dict[str, Any]:
    """The `RGAResNetBackbone` arguments of a preset (a clear error naming the presets otherwise)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; the presets are {sorted(PRESETS)}")
    return {k: v for k, v in PRESETS[preset].items() if k != "description"}
