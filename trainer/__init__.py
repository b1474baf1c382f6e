"""Visual features for CTR prediction: S1/S2/D (paper 000) and COURIER (paper 002).

TFRS and tf-models-official are Keras-2 only, so the legacy Keras (tf_keras) must be
selected before TensorFlow is imported anywhere in the process.
"""
import os
import warnings

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ INFO/WARNING lines (CUDA probing on CPU machines) drown real output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# google.api_core (pulled in by tf-models-official) warns about Python 3.11 end of life on import.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.api_core\..*")

__version__ = "0.1.0"
