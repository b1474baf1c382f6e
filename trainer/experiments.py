"""Named experiments: every run that `make demo` and the reproductions (`make repro-*`) make,
defined once, as a stage and the config overrides that make the method what it is, e.g.
"S1+S2 = finetune initialised from S1". Budgets (steps), seeds and paths are the caller's.

`python -m trainer.task --experiment=NAME` runs one; `command` writes that command line (so
every logged run can be rerun by hand) and `run` runs it with its output in a log. A value
"{name}" in an experiment's overrides is the model dir of the experiment `name` of the same
run set, e.g. S1+S2's `encoder.init_checkpoint` is "{s1}".

The papers' published figures that the reproductions print beside theirs are here too.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from trainer import console


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A named run.

    Attributes:
      name: Its key, and its model dir's path under a run set's root (e.g. 's1s2', 'ctr/s1s2').
      title: As the papers' tables name the method (e.g. 'S1+S2').
      stage: The `trainer.task` stage it runs.
      doc: What it is, in a line.
      sets: (config path, value) overrides; '{other}' values are other experiments' model dirs.
      parent: For a variant (`derive`), the experiment it adds overrides to.
    """

    name: str
    title: str
    stage: str
    doc: str
    sets: tuple[tuple[str, Any], ...] = ()
    parent: str = ""

    @property
    def needs(self) -> list[str]:
        """The experiments whose model dirs it uses."""
        return [v[1:-1] for _, v in self.sets if isinstance(v, str) and v.startswith("{")
                and v.endswith("}")]

    def derive(self, name: str, title: str, doc: str,
               sets: Sequence[tuple[str, Any]]) -> Experiment:
        """A variant: this experiment with more overrides."""
        return Experiment(name, title, self.stage, doc, self.sets + tuple(sets), self.name)


_ENCODERS = (
    Experiment("resnet_c", "ResNet-C", "classify",
               "the encoder trained as a category classifier (paper 000 Table 1 baseline)"),
    Experiment("s1", "S1", "pretrain",
               "self-supervised contrastive pretraining on catalog images (paper 000 Eq. 1)"),
    Experiment("s2", "S2", "finetune",
               "click-supervised contrastive fine-tuning with category negative pools, from a "
               "random initialisation (paper 000 Eq. 2)"),
    Experiment("s1s2", "S1+S2", "finetune", "S2 initialised from S1 (paper 000 §3.1)",
               (("encoder.init_checkpoint", "{s1}"),)),
    Experiment("courier", "COURIER", "courier",
               "contrastive user-intention reconstruction from S1's backbone (paper 002 Eq. 1-7)",
               (("encoder.init_checkpoint", "{s1}"), ("encoder.init_scope", "backbone"))),
)
# Paper 000 Table 2's other competitors: category classifiers on other backbones (§4.2: VGG [8],
# ViT [2]), trained as ResNet-C. Not in the demo: VGG-16 costs about 20 times ResNet-10 x0.5 per
# image, so VGG-C takes 200 steps of 32 images (a sixth of ResNet-C's 300 x 128), about 11
# minutes a seed on 2 cores. ViT is ViT-Ti/16 (4 x 4 patches of a 64-pixel image) at Adam 5e-4
# (a transformer from scratch; ResNet-C's 2e-3 overshoots in its first steps).
COMPETITORS = (
    Experiment("vgg_c", "VGG", "classify",
               "VGG-16 trained as a category classifier (paper 000 Table 2 competitor)",
               (("encoder.backbone", "vgg16"), ("train.global_batch_size", 32),
                ("train.steps", 200))),
    Experiment("vit_c", "ViT", "classify",
               "ViT-Ti/16 trained as a category classifier (paper 000 Table 2 competitor)",
               (("encoder.backbone", "vit"), ("encoder.vit_model", "vit-ti16"),
                ("train.learning_rate", 5e-4))),
)
# Paper 002 Table 5's other pre-training baselines, on S1's batch and budget (its SimCLR is S1 in
# the demo; the reproduction's SimCLR row is `simclr`, at App. E's tuned tau). Supervised trains
# on the world's early train days, before the CTR model's window (§4.2.1 keeps them apart).
BASELINES = (
    Experiment("supervised", "Supervised", "supervised",
               "the encoder trained end to end inside the CTR model on click labels of the days "
               "before the CTR model's window (paper 002 Table 5)",
               (("ctr.train_split", "early"),)),
    Experiment("simsiam", "SimSiam", "simsiam",
               "SimSiam on S1's augmented views: predictor and stop-gradient, no negatives "
               "(paper 002 Table 5)"),
    Experiment("clip", "CLIP", "clip",
               "CLIP on catalog images and titles, negatives across replicas (paper 002 "
               "Table 5)"),
    Experiment("maskclip", "MaskCLIP", "clip",
               "CLIP plus masked self-distillation from a moving-average teacher in both "
               "towers (paper 002 Table 5)", (("clip.masked_distillation", True),)),
)
# Paper 002 Table 5 as App. E runs it: "SimCLR ... tau = 0.2 performs best".
SIMCLR = Experiment("simclr", "SimCLR", "pretrain", "SimCLR (S1's loss and views) at paper 002 "
                    "App. E's tuned tau = 0.2 (Table 5)", (("pretrain.temperature", 0.2),))
# Paper 002 App. E starts every Table 5 method from the same pre-trained weights (ImageNet's;
# here S1's backbone stands in) and trains it on the same data. Here each also passes the same
# number of images through the encoder: COURIER's epoch of `small`, 200 steps of 64 pages of 5
# page and 5 click images, 128,000 images; per batch element SimCLR and SimSiam encode 2 views,
# CLIP and Supervised 1 image.
TABLE_5_IMAGES = 128_000
_IMAGES_PER_EXAMPLE = {"pretrain": 2, "simsiam": 2, "clip": 1, "supervised": 1, "courier": 10}
_BATCH = {"pretrain": 128, "simsiam": 128, "clip": 128, "supervised": 128, "courier": 64}


def _equal_images(stage: str) -> int:
    return TABLE_5_IMAGES // (_BATCH[stage] * _IMAGES_PER_EXAMPLE[stage])


def _from_s1(base: Experiment) -> Experiment:
    return base.derive(f"{base.name}_s1", base.title,
                       f"{base.title} from S1's backbone on {TABLE_5_IMAGES:,} images (paper "
                       "002 Table 5 under App. E's protocol)",
                       (("encoder.init_checkpoint", "{s1}"), ("encoder.init_scope", "backbone"),
                        ("train.steps", _equal_images(base.stage)),
                        ("train.global_batch_size", _BATCH[base.stage])))


# Paper 002 Table 6 and Appendix D: (row, config flag).
COURIER_ABLATIONS = (("w/o UCS", "no_ucs"), ("w/o Contrast", "no_contrast"),
                     ("w/o Reconstruction", "self_attention"), ("w/o Neg PV", "no_neg_pv"),
                     ("w projection", "projection_head"))
MODES = ("vector", "simscore", "cluster_id")


def _courier_ablations() -> list[Experiment]:
    base = next(e for e in _ENCODERS if e.name == "courier")
    return [base.derive(f"courier_{flag}", row, f"COURIER {row} (paper 002 Table 6 / App. D)",
                        ((f"courier.{flag}", True),)) for row, flag in COURIER_ABLATIONS] + [
        base.derive("courier_clip", "COURIER+CLIP", "COURIER with a CLIP loss on the page "
                    "items' titles, L = L_COURIER + L_CLIP (paper 002 Table 8)",
                    (("courier.clip_weight", 1.0),))]


def ctr_experiment(encoder: str | None, mode: str = "vector", debias: bool = False,
                   spec: str = "synthetic") -> Experiment:
    """The CTR model with the image features of the encoder experiment `encoder` (None: no image
    features) in `mode`, with D or not, on the feature spec `spec`."""
    sets: list[tuple[str, Any]] = [("ctr.spec", spec)] if spec != "synthetic" else []
    prefix = "ctr" if spec == "synthetic" else f"ctr_{spec}"
    if encoder is None:
        return Experiment(f"{prefix}/no_image", "no image", "ctr",
                          f"the CTR model without image features ({spec} spec)", tuple(sets))
    enc = get(encoder)
    sets += [("images.encoder", encoder), ("images.model_dir", f"{{{encoder}}}")]
    name, title = encoder, enc.title
    if mode != "vector":
        sets.append(("ctr.image_feature_mode", mode))
        name, title = f"{encoder}_{mode}", f"{enc.title} ({mode})"
    if debias:
        sets.append(("images.s1_model_dir", "{s1}"))
        name, title = f"{name}_d", f"{title}+D"
    return Experiment(f"{prefix}/{name}", title, "debias" if debias else "ctr",
                      f"the CTR model with {enc.title}'s image features as {mode}"
                      f"{' and the debiasing network D (paper 000 Eq. 3-4)' if debias else ''}"
                      f" ({spec} spec)", tuple(sets))


# Evaluations: visual search of the encoder in the run's model dir, or of an untrained one.
EVALUATIONS = (
    Experiment("eval", "visual search", "eval_search",
               "HR, LR@K, CR@K of the encoder in the model dir (paper 000 §4.1, Table 1)"),
    Experiment("random", "untrained encoder", "eval_search",
               "visual search with an untrained encoder (Table 1's reference)",
               (("random_init", True),)),
)


def cluster_experiment(encoder: str) -> Experiment:
    """faiss k-means over the catalog vectors of the encoder experiment `encoder`, its centroids
    written beside them (`clusters.npz`, which a Cluster-ID CTR run copies instead of refitting)."""
    return Experiment(f"cluster_{encoder}", "Cluster-ID", "cluster",
                      f"faiss k-means over {encoder}'s catalog vectors (paper 002 App. B)",
                      (("images.model_dir", f"{{{encoder}}}"),))


# Table 5 from random weights (the second table): COURIER too, on its own budget.
COURIER_SCRATCH = Experiment("courier_scratch", "COURIER", "courier",
                             "COURIER from random weights (paper 002 Table 5, from scratch)")
TABLE_5_FROM_S1 = tuple(_from_s1(e) for e in (*BASELINES, SIMCLR))
_TRAINED = (*_ENCODERS, *COMPETITORS, *BASELINES, SIMCLR, COURIER_SCRATCH, *TABLE_5_FROM_S1,
            *_courier_ablations())
REGISTRY: dict[str, Experiment] = {e.name: e for e in (
    *_TRAINED, *EVALUATIONS, *(cluster_experiment(e.name) for e in _TRAINED))}


def get(name: str) -> Experiment:
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, REGISTRY, n=3)
    raise KeyError(f"no experiment '{name}'" + (f" (did you mean {', '.join(close)}?)" if close
                                                else "")
                   + f"; the encoders are {', '.join(e.name for e in _TRAINED)}, and each has "
                   "cluster_<encoder> and ctr/<encoder>[_simscore|_cluster_id|_d] (ctr_feed/ on "
                   "the feed spec); ctr/no_image, eval and random too")


ENCODERS = tuple(e.name for e in _ENCODERS)
# The demo's CTR runs: Table 2 (each encoder's vectors, D for S1+S2 and COURIER), Tables 5 / B1
# (S1 and COURIER in every mode), and the feed spec of paper 002 with COURIER's Cluster-ID.
DEMO_CTR = (ctr_experiment(None), *(ctr_experiment(e) for e in ENCODERS),
            ctr_experiment("s1s2", debias=True), ctr_experiment("courier", debias=True),
            *(ctr_experiment(e, m) for e in ("s1", "courier") for m in MODES[1:]))
DEMO_FEED = (ctr_experiment(None, spec="feed"),
             ctr_experiment("courier", "cluster_id", spec="feed"))
# Paper 002 Table 5: its rows in the paper's order (its SimCLR is S1) and its feature mode; the
# demo's CTR runs of the other rows (S1's and COURIER's Cluster-IDs are in DEMO_CTR).
TABLE_5 = ("supervised", "clip", "s1", "simsiam", "maskclip", "courier")
TABLE_5_MODE = "cluster_id"
# The reproduction's two Table 5s, rows in the paper's order: every method from S1's backbone on
# the same images (App. E's protocol), and every method from random weights; SimCLR at tau 0.2.
TABLE_5_PROTOCOLS = {
    "from S1": ("supervised_s1", "clip_s1", "simclr_s1", "simsiam_s1", "maskclip_s1", "courier"),
    "from scratch": ("supervised", "clip", "simclr", "simsiam", "maskclip", "courier_scratch"),
}


def table_5_title(name: str) -> str:
    """An encoder experiment's row label in Table 5's layout: S1 is its SimCLR in the demo."""
    return "SimCLR (S1)" if name == "s1" else get(name).title


DEMO_TABLE_5 = tuple(ctr_experiment(e.name, TABLE_5_MODE) for e in BASELINES)
# Every CTR run on every trained encoder's features, by name (e.g. 'ctr/vgg_c',
# 'ctr_feed/courier_cluster_id', 'ctr/s1s2_d').
REGISTRY.update({e.name: e for spec in ("synthetic", "feed") for e in (
    ctr_experiment(None, spec=spec),
    *(ctr_experiment(x.name, m, spec=spec) for x in _TRAINED for m in MODES),
    *(ctr_experiment(x.name, debias=True, spec=spec) for x in _TRAINED))})


def resolved(exp: Experiment, dirs: Mapping[str, str],
             sets: Sequence[tuple[str, Any]] | None = None) -> list[tuple[str, Any]]:
    """`exp`'s overrides (or `sets`) with each '{name}' value replaced by `dirs[name]`, the model
    dir of the experiment `name`."""
    out = []
    for path, value in exp.sets if sets is None else sets:
        if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
            if value[1:-1] not in dirs:
                raise KeyError(f"experiment '{exp.name}' needs the model dir of "
                               f"'{value[1:-1]}' for {path}")
            value = dirs[value[1:-1]]
        out.append((path, value))
    return out


def command(exp: Experiment, data_dir: str, model_dir: str, dirs: dict[str, str],
            seed: int = 0, sets: Sequence[tuple[str, Any]] = (),
            flags: Sequence[str] = ()) -> list[str]:
    """The `python -m trainer.task --experiment=NAME` command line of `exp` (a variant that is
    not registered: its registered parent, then its own overrides), the model dirs of the
    experiments it builds on taken from `dirs` (name -> model dir), then the caller's `sets` and
    `flags`."""
    base = exp
    while base.name not in REGISTRY or REGISTRY[base.name] != base:
        if not base.parent:
            raise KeyError(f"experiment '{exp.name}' is not registered, nor is a parent of it")
        base = get(base.parent)
    args = [sys.executable, "-m", "trainer.task", f"--experiment={base.name}",
            f"--data_dir={data_dir}", f"--model_dir={model_dir}", f"--seed={seed}"]
    for need in base.needs:
        if need not in dirs:
            raise KeyError(f"experiment '{exp.name}' needs the model dir of '{need}'")
        args.append(f"--experiment_dir={need}={dirs[need]}")
    own = exp.sets[len(base.sets):]  # a variant's overrides come after its parent's
    for path, value in (*resolved(exp, dirs, own), *sets):
        args.append(f"--set={path}={_text(value)}")
    return args + list(flags)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return str(value)


def run(args: Sequence[str], log_path: str) -> float:
    """Runs a command line with its output appended to `log_path`; exits naming the log if it
    fails. Returns the seconds it took."""
    t0 = time.time()
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(args)}\n")
        log.flush()
        proc = subprocess.run(list(args), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(args)}; see {log_path}")
    return time.time() - t0


def trained(model_dir: str) -> bool:
    """Whether `model_dir` holds a finished training run: a checkpoint at the steps its
    config.json asked for (an interrupted run's earlier checkpoints do not count: rerunning its
    command resumes it)."""
    config = os.path.join(model_dir, "config.json")
    ckpt = os.path.join(model_dir, "ckpt")
    if not (os.path.exists(config) and os.path.isdir(ckpt)):
        return False
    with open(config) as f:
        steps = json.load(f).get("train", {}).get("steps")
    steps_done = [int(m.group(1)) for name in os.listdir(ckpt)
                  if (m := re.fullmatch(r"ckpt-(\d+)\.index", name))]
    return steps is not None and bool(steps_done) and max(steps_done) >= steps


def ensure(exp: Experiment, data_dir: str, model_dir: str, dirs: dict[str, str], seed: int,
           log_path: str) -> str:
    """`model_dir`, trained as `exp` with its stage's defaults unless it is `trained`."""
    if not trained(model_dir):
        print(f"  training {exp.title} into {model_dir}", flush=True)
        run(command(exp, data_dir, model_dir, dirs, seed), log_path)
    return model_dir


def spread(values: Sequence[float] | np.ndarray, fmt: str = ".4f") -> str:
    """The seeds' mean ± half-range (the mean alone for one seed): a repro table's cell."""
    v = np.asarray(values, dtype=float)
    return f"{v.mean():{fmt}}" + (f" ± {(v.max() - v.min()) / 2:{fmt.lstrip('+')}}"
                                  if len(v) > 1 else "")


def delta_cell(runs: Sequence[float], bases: Sequence[float]) -> str:
    """runs - bases per seed in percentage points (mean ± half-range), the runs' raw mean in
    parentheses: a paper 002 table's cell."""
    d = (np.asarray(runs, dtype=float) - np.asarray(bases, dtype=float)) * 100
    return f"{spread(d, '+.2f')} ({np.mean(runs):.4f})"


def over_seeds(seeds: str, out_dir: str, report_only: bool,
               run_seed: Callable[[int, str], object]) -> dict:
    """{seed: results} for the comma-separated `seeds`: `run_seed(seed, <out_dir>/seed<N>)`, which
    writes results.json there, or with `report_only` the results.json an earlier run wrote (as
    JSON reads it back: string keys)."""
    per_seed = {}
    for seed in [int(s) for s in seeds.split(",")]:
        out = os.path.join(out_dir, f"seed{seed}")
        if not report_only:
            print(f"seed {seed}:", flush=True)
            os.makedirs(out, exist_ok=True)
            run_seed(seed, out)
        with open(os.path.join(out, "results.json")) as f:
            per_seed[seed] = json.load(f)
    return per_seed


def repro_flags(doc: str, out_dir: str, visual_dir: bool = True, ctr_steps: bool = True,
                extra: bool = False) -> argparse.ArgumentParser:
    """The flags the repro scripts share: --data_dir, --out_dir, --seeds, --report_only; and
    --visual_dir (repro_visual.py's encoders, which the later tables build on), --ctr_steps,
    --extra (flags for every stage run) where the script takes them."""
    p = console.CommandLine(description=doc.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    if visual_dir:
        p.add_argument("--visual_dir", default="runs/visual",
                       help="Where repro_visual.py keeps the encoders (trained here if missing).")
    p.add_argument("--out_dir", default=out_dir)
    p.add_argument("--seeds", default="0")
    if ctr_steps:
        p.add_argument("--ctr_steps", type=int, default=470,
                       help="CTR steps (one epoch of `small` at batch 512).")
    if extra:
        p.add_argument("--extra", default="", help="Flags passed to every stage run, space "
                       "separated.")
    p.add_argument("--report_only", action="store_true",
                   help="Only write the report from the seeds' results.json (no training).")
    return p


def reproduce(a: argparse.Namespace, run_seed: Callable[[int, str], object],
              report: Callable[[dict], str], filename: str) -> None:
    """A repro script's body: every seed run (`over_seeds`), then its report with the total time
    printed and written to <out_dir>/<filename>."""
    t0 = time.time()
    text = report(over_seeds(a.seeds, a.out_dir, a.report_only, run_seed))
    if not a.report_only:
        text += f"\n\nTotal time: {(time.time() - t0) / 60:.1f} min."
    write_report(text, os.path.join(a.out_dir, filename))


def write_report(text: str, path: str) -> None:
    """Prints a reproduction's report and writes it as Markdown."""
    print("\n" + text)
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"\nwrote {path}")


# The papers' figures, printed beside the reproductions' for orientation (their data is not
# public). Paper 000 Table 1: HR, LR@10, LR@100, CR@10, CR@100.
PAPER_TABLE_1 = {
    "ResNet-C": (0.2626, 0.5126, 0.5123, 0.8132, 0.7791),
    "S1": (0.8504, 0.5001, 0.5059, 0.6357, 0.5524),
    "S2": (0.8510, 0.5184, 0.5174, 0.7178, 0.6318),
    "S1+S2": (0.8825, 0.5259, 0.5207, 0.7540, 0.6850),
}
# Paper 000 Table 2: AUC on the bottom 10% impression items, the top 10%, overall.
PAPER_TABLE_2 = {
    "ResNet-C": (0.7061, 0.6959, 0.7042), "VGG": (0.6667, 0.6679, 0.6779),
    "ViT": (0.7047, 0.6971, 0.6981), "S1": (0.6874, 0.6942, 0.7034),
    "S2": (0.7340, 0.7240, 0.7293), "S1+S2": (0.7673, 0.7494, 0.7515),
    "S1+S2+D": (0.7681, 0.7495, 0.7518),
}
# Paper 002 Table 5: delta AUC (women's clothing), delta AUC, delta GAUC (%, all categories)
# against the CTR model without image features, by the experiment of the row (SimCLR's is S1).
PAPER_TABLE_5 = {"supervised": (0.06, -0.14, -0.06), "clip": (0.26, 0.04, -0.09),
                 "s1": (0.28, 0.05, -0.08), "simsiam": (0.10, -0.10, -0.29),
                 "maskclip": (0.31, 0.03, -0.03), "courier": (0.46, 0.16, 0.19)}
# Paper 002 Table B1 (a summary) and Table 6: delta AUC (women's clothing), delta AUC, delta GAUC.
PAPER_TABLE_B1 = ("V1-V4: vector +0.06-0.09%, simscore +0.14-0.18%, cluster_id +0.22-0.28%")
PAPER_TABLE_6 = {"w/o UCS": (0.06, -0.13, 0.11), "w/o Contrast": (0.23, 0.03, -0.11),
                 "w/o Reconstruction": (0.25, 0.02, -0.11), "w/o Neg PV": (0.30, 0.07, -0.06),
                 "w projection": (0.29, 0.06, -0.04), "COURIER": (0.46, 0.16, 0.19)}


@dataclasses.dataclass(frozen=True)
class Claim:
    """One of the papers' orderings, judged by a paired bootstrap (`trainer.eval.significance`):
    run `a` above run `b` in `metric`, or with `not_below`, `a` not below `b` by more than
    `margin` ("keeps the AUC"; the margin is part of the claim's text). `a` and `b` are
    experiment names: encoders for visual search, CTR experiments (e.g. 'ctr/s1s2_d') for the
    CTR model; the demo's report and the reproductions judge the same claims on their own runs.
    `paper` is the paper's own sentence (or table) that the claim tests."""

    text: str
    a: str
    b: str
    metric: str
    not_below: bool = False
    margin: float = 0.0
    paper: str = ""

    def __post_init__(self) -> None:
        if self.not_below and self.margin <= 0:
            raise ValueError(f"claim '{self.text}': 'not below' needs a margin > 0")

    def judge(self, outputs: Mapping[int, Mapping[str, Any]],
              compare: Callable[..., Any]) -> Any:
        """The claim across the seeds of `outputs` {seed: {experiment name: its outputs}} with
        `compare` (`significance.compare_ctr_seeds` or `compare_search_seeds`): a
        `significance.SeedComparison`, or None if a seed lacks one of the two runs."""
        if not outputs or not all(self.a in o and self.b in o for o in outputs.values()):
            return None
        return compare({s: (o[self.a], o[self.b]) for s, o in outputs.items()}, self.metric)

    @property
    def key(self) -> str:
        """'a > b: metric' (or 'a >= b - margin: metric'): how claims.json files name it."""
        op = f">= {self.b} - {self.margin:g}" if self.not_below else f"> {self.b}"
        return f"{self.a} {op}: {self.metric}"


def _title(name: str) -> str:
    return get(name).title


def _ctr(encoder: str | None, mode: str = "vector", debias: bool = False) -> str:
    return ctr_experiment(encoder, mode, debias).name


# How far below still counts as "not below" in the papers' non-inferiority claims: half an AUC
# point (an eighth of what the image features add here; D's effect on the overall AUC was +0.0023
# and -0.0010 on two seeds of repro-ctr).
AUC_MARGIN = 0.005
_P000_T1 = ("paper 000 §4.1: S1+S2 \"outperforms using only self-supervision and click signals "
            "(i.e., S1 and S2 alone) in terms of all metrics\"")
_P000_T1_C = ("paper 000 §4.1: \"Although the conventional ResNet Classifier produces the highest "
              "CR, its HR is the lowest\"")
_P000_T2_D = ("paper 000 §4.2: \"S1+S2+D is able to further improve predictions on low "
              "impression items over S1+S2, while preserving the overall accuracy for all items\"")
# Paper 000 §4.1, Table 1: visual search.
VISUAL_CLAIMS = (
    *(Claim(f"S1+S2 has a higher {k} than {_title(e)}", "s1s2", e, k, paper=_P000_T1)
      for e in ("s1", "s2") for k in ("HR", "LR@10", "LR@100", "CR@10", "CR@100")),
    Claim("S1+S2 has a higher HR than ResNet-C", "s1s2", "resnet_c", "HR", paper=_P000_T1_C),
    *(Claim(f"ResNet-C has a lower HR than {_title(e)}", e, "resnet_c", "HR", paper=_P000_T1_C)
      for e in ("s1", "s2")),
    *(Claim(f"ResNet-C has a higher {k} than {_title(e)}", "resnet_c", e, k, paper=_P000_T1_C)
      for k in ("CR@10", "CR@100") for e in ("s1", "s2", "s1s2")),
)
# Paper 000 §4.2, Table 2: the CTR model with each encoder's vectors, and D.
CTR_CLAIMS = (
    *(Claim(f"S1+S2+D above the competitor {_title(c)} (overall AUC)", _ctr("s1s2", debias=True),
            _ctr(c), "AUC", paper="paper 000 §4.2: \"compared with the best competitor ResNet, "
            "the proposed framework S1+S2+D increases AUC on testing set by 5%\"")
      for c in ("resnet_c", *(e.name for e in COMPETITORS))),
    *(Claim(f"S1+S2 > {_title(e)} (overall AUC)", _ctr("s1s2"), _ctr(e), "AUC",
            paper="paper 000 §4.2: \"neither S1 nor S2 alone can achieve optimal results\"")
      for e in ("s2", "s1")),
    Claim("S2 > S1 (overall AUC)", _ctr("s2"), _ctr("s1"), "AUC",
          paper="paper 000 Table 2: S2 0.7293, S1 0.7034 overall"),
    Claim("D raises the bottom-10% AUC (S1+S2+D > S1+S2)", _ctr("s1s2", debias=True),
          _ctr("s1s2"), "AUC_bottom10", paper=_P000_T2_D),
    Claim(f"D keeps the overall AUC (S1+S2+D not below S1+S2 by more than {AUC_MARGIN})",
          _ctr("s1s2", debias=True), _ctr("s1s2"), "AUC", not_below=True, margin=AUC_MARGIN,
          paper=_P000_T2_D),
    Claim("image features help (S1+S2 > no image, overall AUC)", _ctr("s1s2"), _ctr(None),
          "AUC", paper="paper 000 abstract: \"Extracting expressive visual features is crucial for "
                       "accurate Click-Through-Rate (CTR) prediction\""),
)
# Paper 002 Tables 5 and B1: COURIER's features above S1's (SimCLR's) in every mode.
COURIER_CLAIMS = tuple(Claim(f"COURIER beats S1 features ({m}, AUC)", _ctr("courier", m),
                             _ctr("s1", m), "AUC",
                             paper="paper 002 Table B1 and Table 5: COURIER above SimCLR in "
                                   "every usage of its features")
                       for m in MODES)


def table_5_claims(rows: Sequence[str] = TABLE_5, prefix: str = "", label: str = ""
                   ) -> tuple[Claim, ...]:
    """Paper 002 Table 5's orderings over its six rows (`rows`: the encoder experiments of
    Supervised, CLIP, SimCLR, SimSiam, MaskCLIP and COURIER, in that order), each row's CTR run
    in Table 5's mode, named `prefix` + its experiment name: COURIER best; CLIP, SimCLR and
    MaskCLIP above Supervised and SimSiam."""
    sup, clip, simclr, simsiam, maskclip, courier = rows
    tag = f"Table 5{' ' + label if label else ''}"

    def run(e: str) -> str:
        return prefix + _ctr(e, TABLE_5_MODE)

    def name(e: str) -> str:
        return "SimCLR" if e == simclr else get(e).title

    return (
        *(Claim(f"{tag}: COURIER above {name(e)} ({TABLE_5_MODE}, {metric})", run(courier),
                run(e), metric,
                paper="paper 002 §4.2.4: \"Our COURIER also performs best with 0.16% improvement "
                      "in AUC\" (and GAUC +0.19%, every other method's below 0)")
          for metric in ("AUC", "GAUC") for e in rows if e != courier),
        *(Claim(f"{tag}: {name(hi)} above {name(lo)} ({TABLE_5_MODE}, AUC)", run(hi), run(lo),
                "AUC", paper="paper 002 Table 5, all categories: CLIP +0.04%, SimCLR +0.05%, "
                             "MaskCLIP +0.03% against Supervised -0.14%, SimSiam -0.10%")
          for hi in (clip, simclr, maskclip) for lo in (sup, simsiam)),
    )


# Paper 002 Table 5 as the demo runs it (SimCLR is S1, the baselines from random weights).
TABLE_5_CLAIMS = table_5_claims()
# The reproduction runs Table 5 under other protocols than the demo's, so a demo claim's
# run-to-run spread is read from the same ordering under App. E's protocol (every method from
# S1's backbone): {demo claim key: (reproduction claim key, how the reproduction ran it)}.
REPRO_EQUIVALENT = {
    demo.key: (repro.key, "every method from S1's backbone on the same images, App. E")
    for demo, repro in zip(TABLE_5_CLAIMS,
                           table_5_claims(TABLE_5_PROTOCOLS["from S1"], "table5/", "from S1"),
                           strict=True)}
# Paper 002 Table 8: adding CLIP makes COURIER worse (a strict claim, as the paper states it).
TABLE_8_CLAIM = Claim(f"Table 8: COURIER+CLIP is worse than COURIER ({TABLE_5_MODE}, AUC)",
                      _ctr("courier", TABLE_5_MODE), _ctr("courier_clip", TABLE_5_MODE), "AUC",
                      paper="paper 002 §4.3.4: \"such multi-task training leads to worse "
                            "downstream CTR performance\"")


def judge_claims(claims: Sequence[Claim], outputs: Mapping[int, Mapping[str, Any]],
                 compare: Callable[..., Any]) -> tuple[list[str], list[dict]]:
    """Every claim whose two runs each seed of `outputs` holds, judged across the seeds
    (`Claim.judge`): its report lines ('- text: **verdict** (...)', the paper's sentence below)
    and its records for claims.json."""
    lines, records = [], []
    for c in claims:
        judged = c.judge(outputs, compare)
        if judged is None:
            continue
        lines.append(f"- {c.text}: {judged.describe(c.metric, c.not_below, c.margin)}"
                     + (f"\n  ({c.paper})" if c.paper else ""))
        records.append({"key": c.key, "text": c.text, "metric": c.metric,
                        "verdict": judged.judged(c.not_below, c.margin), **judged.record()})
    return lines, records


CLAIMS_FILE = "claims.json"


def write_claims(records: list[dict], out_dir: str) -> None:
    """A reproduction's judged claims as <out_dir>/claims.json: each claim's seeds, per-seed
    differences and their spread, which the demo's report prints beside its one-run verdicts."""
    with open(os.path.join(out_dir, CLAIMS_FILE), "w") as f:
        json.dump(records, f, indent=1)


def read_claims(paths: Sequence[str]) -> dict[str, dict]:
    """{claim key: record} from the claims.json files of `paths` that exist (later files win)."""
    out: dict[str, dict] = {}
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                out.update({r["key"]: r for r in json.load(f)})
    return out
