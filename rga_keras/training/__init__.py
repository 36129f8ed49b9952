"""Training a re-id model with ``model.fit`` (docs/TRAINING.md).

    config        every option with the paper's values, the demo's, the bundled recipes (configs/), merging YAML
                  and overrides, validation, the learning-rate rule
    run           `run(config)`: dataset → P×K pipeline → fit → evaluation → checkpoints → summary → export
    model         the model from a config: precision, synchronised BatchNorm, compiled with the paper's losses
    distribution  tf.distribute strategies, TF_CONFIG, feeding whole identities to every replica
    callbacks     divergence guard, periodic evaluation, atomic checkpoints, history, backup and resume
    run_folder    one run per folder: a finished run, or another config's, is never mixed in

Import the module you need (``from rga_keras.training.run import run``); the package itself imports nothing.
"""
