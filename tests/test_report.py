"""The demo report's labels: one run's verdicts beside the reproductions' across seeds, and a run
described by the settings it ran with."""
import json

from trainer import experiments, report


def test_a_claim_prints_the_reproductions_verdict_across_seeds_or_says_none_holds_it(tmp_path):
    claim = experiments.VISUAL_CLAIMS[0]
    record = {"key": claim.key, "verdict": "holds", "difference": 0.0237, "low": 0.0052,
              "high": 0.041, "seed_sd": 0.0117, "by_seed": {"0": 0.03, "1": 0.03, "2": 0.01}}
    path = tmp_path / experiments.CLAIMS_FILE
    path.write_text(json.dumps([record]))
    repro = experiments.read_claims([str(path)])
    text = report._across_seeds(claim, repro)
    assert "across 3 training seeds" in text and "**holds**" in text
    assert "+0.0237 [+0.0052, +0.0410]" in text and "run-to-run sd 0.0117" in text
    assert "no reproduction" in report._across_seeds(experiments.VISUAL_CLAIMS[1], repro)


def test_a_demo_table_5_claim_prints_the_same_ordering_as_the_reproduction_ran_it(tmp_path):
    demo = experiments.TABLE_5_CLAIMS[0]  # COURIER above Supervised, the demo's protocol
    repro_key, _ = experiments.REPRO_EQUIVALENT[demo.key]
    assert repro_key == "table5/ctr/courier_cluster_id > table5/ctr/supervised_s1_cluster_id: AUC"
    record = {"key": repro_key, "verdict": "within noise", "difference": 0.001, "low": -0.004,
              "high": 0.006, "seed_sd": 0.002, "by_seed": {"0": 0.0, "1": 0.001, "2": 0.002}}
    path = tmp_path / experiments.CLAIMS_FILE
    path.write_text(json.dumps([record]))
    text = report._across_seeds(demo, experiments.read_claims([str(path)]))
    assert "across 3 training seeds" in text and "S1's backbone" in text
    assert "**within noise**" in text


def test_a_run_that_predates_its_experiments_settings_is_described_as_it_ran(tmp_path):
    exp = experiments.get("supervised")  # ctr.train_split=early since the equal-protocol Table 5
    run = tmp_path / "supervised"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"ctr": {"spec": "synthetic"}}))
    assert "no ctr.train_split" in report._not_as_registered(exp, str(run))
    (run / "config.json").write_text(json.dumps({"ctr": {"train_split": "train"}}))
    assert report._not_as_registered(exp, str(run)) == " (this run: ctr.train_split=train)"
    (run / "config.json").write_text(json.dumps({"ctr": {"train_split": "early"}}))
    assert report._not_as_registered(exp, str(run)) == ""
    assert report._not_as_registered(exp, str(tmp_path / "absent")) == ""
