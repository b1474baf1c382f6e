"""Visual features for CTR prediction: S1/S2/D (paper 000) and COURIER (paper 002).

TFRS and tf-models-official are Keras-2 only, so the legacy Keras (tf_keras) must be
selected before TensorFlow is imported anywhere in the process.
"""
import os
import sys
import warnings

from trainer import console

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ INFO and WARNING lines drown a command's own output; `--verbosity=0` (or -v 0)
# on the command line brings them back (trainer.console).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL",
                      "2" if console.verbosity_in(sys.argv[1:]) <= console.QUIET else "0")
# google.api_core (pulled in by tf-models-official) warns about Python 3.11 end of life on import.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.api_core\..*")

__version__ = "0.1.0"
