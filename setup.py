"""ldro: Lookahead-DRO and multitask weighting methods as optax transformations."""
from setuptools import find_packages, setup

setup(
    name="ldro",
    version="0.1.0",
    description=("Lookahead-DRO (L-DRO): balancing average and worst-case "
                 "accuracy in multitask learning, in JAX/optax."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ldro", "ldro.*", "experiments", "experiments.*",
                                    "gin_configs", "gin_configs.*"]),
    # The configs (found through gin's search path from any directory, see
    # experiments/runner/paths.py) and the SentencePiece vocabulary.
    package_data={"gin_configs": ["*.gin", "*/*.gin"], "ldro.data": ["assets/spm/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30", "jaxlib>=0.4.30", "flax>=0.10", "optax>=0.2.4", "chex>=0.1.87", "numpy",
    ],
    extras_require={
        "experiments": ["gin-config", "absl-py", "orbax-checkpoint", "matplotlib",
                        "tensorboardX", "scipy"],
        "data": ["tensorflow", "tensorflow-datasets", "seqio", "tensorflow-text",
                 "sentencepiece", "importlib_resources", "pillow"],
        "dev": ["pytest", "hypothesis", "scipy"],
    },
)
