"""Exports of trained models as SavedModels for TF Serving (encoder, CTR model).

`trainer` is imported first: it selects the legacy Keras and TensorFlow's C++ log level before
TensorFlow loads (`python -m export.ctr` reaches TensorFlow through this package).
"""
import trainer  # noqa: F401
