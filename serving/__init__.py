"""Tools around the exports, for tests, benchmarks and local trials: the TF Serving stand-in
(`stand_in_server`) and the checks of `serving_config/` against TF Serving's protos (`protos`).
Nothing here is needed to serve with the real model server."""
import trainer  # noqa: F401  (the legacy Keras and TensorFlow's log level before TensorFlow loads)
