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
    # One top-level package; the recipes (train/configs in the repository) travel inside it.
    packages=find_packages(include=["rga_keras", "rga_keras.*"]),
    package_data={"rga_keras.training": ["configs/*.yaml"], "rga_keras.retrieval": ["page.html"]},
    install_requires=REQUIREMENTS,
    extras_require={
        # Only needed to read PyTorch .pth files; .npz state dicts need nothing extra.
        "torch": ["torch>=2.0"],
        # jax: the backend-neutral tests also run on JAX (CPU). httpx: FastAPI's TestClient; playwright: the
        # rga-serve page in Debian's Chromium (apt-get install chromium; the test skips without it).
        "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "jax>=0.4.34", "httpx>=0.29", "playwright>=1.65"],
    },
    entry_points={
        "console_scripts": [
            "rga-train=rga_keras.cli.train:main",
            "rga-export=rga_keras.cli.export:main",
            "rga-synth=rga_keras.cli.synth:main",
            "rga-eval=rga_keras.cli.evaluate:main",
            "rga-visualize=rga_keras.cli.visualize:main",
            "rga-embed=rga_keras.cli.embed:main",
            "rga-search=rga_keras.cli.search:main",
            "rga-gallery=rga_keras.cli.gallery:main",
            "rga-serve=rga_keras.cli.serve:main",
        ]
    },
)
