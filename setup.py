"""Installable training package: visual features for CTR prediction (S1/S2/D and COURIER).

Reproducible installs use the verified lock: `pip install -r requirements.txt -c constraints.txt`
(what `make` does). The ranges below are what the code needs; the lock is what was tested.
"""
from setuptools import find_packages, setup

setup(
    name="visual-ctr-features",
    version="0.1.0",
    description="Contrastive image features for CTR prediction: S1/S2/D (visual search ads) and "
                "COURIER, on TensorFlow, TFRS and TF Serving.",
    packages=find_packages(include=["trainer", "trainer.*", "export", "export.*"]),
    python_requires=">=3.9,<3.13",
    install_requires=[
        "tensorflow~=2.17.1",
        "tf-keras~=2.17.0",
        "tensorflow-recommenders==0.7.7",
        "tf-models-official~=2.17.0",
        "tensorflow-io==0.37.1",
        "tensorflow-serving-api~=2.17.0",
        "faiss-cpu>=1.8",
        "numpy<2",
        "pyarrow<18",
        "tensorflow-metadata==1.17.3",
        "pillow",
    ],
    extras_require={"test": ["pytest", "scikit-learn"], "report": ["matplotlib"]},
)
