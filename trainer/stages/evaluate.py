"""`evaluate`: an exported CTR model judged on a day's records by the Beam evaluate job
(`trainer.pipelines.evaluate`) on the in-process DirectRunner or the runner
`evaluate.beam_options` names: Table 2's metrics without one process holding the day."""
from __future__ import annotations

import dataclasses
import json
import shlex

from trainer import configs
from trainer.pipelines import evaluate as evaluate_pipeline
from trainer.stages import common


def run_evaluate(cfg: configs.EvaluateStage) -> None:
    """AUC, GAUC and the slice AUCs of a CTR export on a day's records, the per-row predictions
    and per-page statistics as sharded Parquet."""
    ev = cfg.evaluate
    if bool(ev.model_export) == bool(ev.checkpoint_dir):
        raise common.UsageError("--stage=evaluate needs one model: the CTR export (--export_dir, "
                                "evaluate.model_export) or a trained ctr/debias model dir "
                                "(--set evaluate.checkpoint_dir=DIR)")
    out_dir = ev.out_dir or cfg.model_dir
    if not out_dir:
        raise common.UsageError("--stage=evaluate needs --model_dir (or evaluate.out_dir) for "
                                "its outputs")
    ev = dataclasses.replace(
        ev, records_pattern=common.pattern(cfg, ev.records_pattern, "ctr", "test"),
        catalog_pattern=common.pattern(cfg, ev.catalog_pattern, "catalog"), out_dir=out_dir)
    metrics = evaluate_pipeline.run(ev, shlex.split(ev.beam_options), cfg.skip_bad_records)
    configs.save(out_dir, dataclasses.replace(cfg, model_dir=out_dir, evaluate=ev))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                      for k, v in metrics.items() if k != "counters"}))
    print(f"evaluate: wrote {out_dir}/metrics.json, the predictions in {out_dir}/"
          f"{evaluate_pipeline.PREDICTIONS_DIR} and the pages in {out_dir}/"
          f"{evaluate_pipeline.PAGES_DIR}")
