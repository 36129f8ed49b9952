"""rga-keras: Relation-Aware Global Attention (Zhang et al., CVPR 2020) for person re-id in Keras 3."""
