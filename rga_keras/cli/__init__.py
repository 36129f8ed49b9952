"""The programs, one module each, thin: parse the command line, call the library, print (docs/RELIABILITY.md
gives their exit statuses). Installed as console scripts; ``python -m rga_keras.cli.<name>`` runs one too.

    rga-train      train.py      train a re-id model from a config (rga_keras.training)
    rga-eval       evaluate.py   Rank-k, mAP, mINP of a model on a dataset (rga_keras.evaluation)
    rga-export     export.py     SavedModel, TFLite, ONNX, each checked (rga_keras.export)
    rga-visualize  visualize.py  ranked lists, attention, relations, Grad-CAM as PNG (rga_keras.visualize)
    rga-embed      embed.py      a gallery (features file or Milvus) from images, any model format (rga_keras.retrieval)
    rga-search     search.py     the nearest gallery images of queries (rga_keras.retrieval)
    rga-gallery    gallery.py    a features file's faiss index, a Milvus gallery's contents (rga_keras.retrieval)
    rga-serve      serve.py      a web page and JSON API to search a gallery (rga_keras.retrieval.web)
    rga-synth      synth.py      a synthetic dataset in the Market-1501 layout (rga_keras.data.synthetic)

`common` holds what they share. The library never imports this package.
"""
