"""The CTR predictor and what it is built from: the declared feature spec (`spec`), the
vocabularies and frozen image tables of the training data (`tables`), the model (`model`, TFRS),
the debiasing network D (`debias`, paper 000 Eq. 3-4), training, evaluation and restoring
(`task`), and paper 002 Table 5's Supervised baseline (`supervised`)."""
