"""Batch jobs on Apache Beam: convert (Parquet -> records), embed (the encoder export over the
catalog), join (image features into `ctr` records), vocab (the CTR model's vocabularies). Each
calls the same library code as the stages and runs on any Beam runner.

Beam is imported here, once, with its import-time warnings about optional Google Cloud clients
dropped (`trainer.console`).
"""
from trainer import console

with console.import_noise_dropped():
    import apache_beam  # noqa: F401
