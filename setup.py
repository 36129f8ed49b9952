"""Packaging for rga-keras (pip install -e ".[dev]")."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
REQUIREMENTS = [
    line.strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="rga-keras",
    version="0.2.0",
    description="Relation-Aware Global Attention (RGA, CVPR 2020) for person re-identification in Keras 3",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rga_keras", "rga_keras.*", "train", "export"]),
    package_data={"train": ["configs/*.yaml"]},
    install_requires=REQUIREMENTS,
    extras_require={
        # Only needed to read PyTorch .pth files; .npz state dicts need nothing extra.
        "torch": ["torch>=2.0"],
        # jax: the backend-neutral tests also run on JAX (CPU).
        "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "jax>=0.4.34"],
    },
    entry_points={
        "console_scripts": [
            "rga-train=train.__main__:main",
            "rga-export=export.__main__:main",
            "rga-synth=train.synth:main",
            "rga-eval=train.evaluate:main",
            "rga-visualize=train.visualize:main",
            "rga-embed=train.embed:main",
            "rga-search=train.search:main",
        ]
    },
)
