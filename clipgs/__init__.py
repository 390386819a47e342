"""clipgs: 3D Gaussian Splatting objects embedded in CLIP's image and text space.

The library knows nothing of Prefect; ``flows/`` orchestrates it. The data path, by folder:
``data`` (formats -> sources -> views -> shards) -> ``models`` (teacher, tokenizer, encoder)
-> ``train`` (loss, distributed, trainer) -> ``eval`` -> ``registry`` (MLflow model, promotion).
"""

__version__ = "0.1.0"
