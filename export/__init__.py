"""Exports of trained models as SavedModels for TF Serving (encoder, CTR model)."""
