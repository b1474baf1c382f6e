"""The stage runners: each takes its typed config tree (`trainer.configs`). Which runner a stage
has is declared in `trainer.registry`, which imports a runner's module when its stage runs."""
