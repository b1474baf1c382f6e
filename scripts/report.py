"""Writes the demo's report (`trainer.report`): report/index.md with the Table 1, 2, 5 and
B1 analogues and its PNG plots, from the runs of `scripts/demo.py` and `make export`.

  python scripts/report.py --data_dir=data/small --demo_dir=runs/demo --out_dir=report
"""
from __future__ import annotations

import os

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import console, report


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--demo_dir", default="runs/demo")
    p.add_argument("--out_dir", default="report")
    p.add_argument("--models_dir", default=None, help="make export's models (default "
                   "DEMO_DIR/models).")
    a = p.parse_args()
    print(report.write(a.data_dir, a.demo_dir, a.out_dir, a.models_dir))
    print(f"wrote {os.path.join(a.out_dir, 'index.md')} and its plots")


if __name__ == "__main__":
    main()
