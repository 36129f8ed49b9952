"""Pictures, written as PNG: ranked lists, search results and training curves (`plots`), and what the RGA network
attends to — spatial attention, relations, Grad-CAM (`attention_maps`, which needs the model's backend).

Importing the package is cheap: the attention-map names load Keras on first use.
"""
from rga_keras._lazy import lazy_exports
from rga_keras.visualize.plots import (plot_ranked_lists, plot_search_results, plot_training_curves, read_history,
                                       spread_indices)

_MAPS = ("grad_cam", "heat_overlay", "plot_attention_maps", "plot_grad_cam", "plot_relation_maps",
         "relation_to_target")
__all__ = ["plot_ranked_lists", "plot_search_results", "plot_training_curves", "read_history", "spread_indices", *_MAPS]
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(_MAPS, "rga_keras.visualize.attention_maps"))
