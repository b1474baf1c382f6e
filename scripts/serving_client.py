"""Client of the exported models on TF Serving (gRPC PredictionService or REST).

    python scripts/serving_client.py --grpc=localhost:8500 encode a.jpg b.png
    python scripts/serving_client.py --rest=http://localhost:8501 rank --request=request.json \
        --feature_spec=runs/demo/models/ctr [--photo=query.jpg]

`encode` prints each image's embedding size, norm and first values; `rank` prints the candidates
ordered by predicted click probability: by ids only (`serving_default`), or, with `--photo`, for
the photo the user has just taken (`rank`: the model encodes it; a candidate with an "image"
path, such as an item added since the export, is sent with its image). The request format is in
docs/serving.md.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from export import client as client_lib
from trainer import console


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main() -> None:
    ap = console.CommandLine(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--grpc", help="host:port of the gRPC API (TF Serving: 8500)")
    where.add_argument("--rest", help="base URL of the REST API (TF Serving: http://host:8501)")
    ap.add_argument("--encoder_model", default="encoder")
    ap.add_argument("--ctr_model", default="ctr")
    ap.add_argument("--timeout", type=float, default=10.0)
    sub = ap.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="embed image files with the encoder")
    enc.add_argument("images", nargs="+")
    rank = sub.add_parser("rank", help="score a user's candidate list with the CTR model")
    rank.add_argument("--request", required=True, help='JSON {"user": {...}, "candidates": [...]}')
    rank.add_argument("--photo", default="", help="the query photo (JPEG/PNG): rank the page for "
                      "it with the 'rank' signature")
    rank.add_argument("--feature_spec", default="synthetic",
                      help="The CTR model's feature spec: its export (base path or version), a "
                           "spec file or a built-in name.")
    args = ap.parse_args()

    client = (client_lib.GrpcClient(args.grpc, args.timeout) if args.grpc
              else client_lib.RestClient(args.rest, args.timeout))
    if args.command == "encode":
        emb = client.encode([_read(p) for p in args.images], args.encoder_model)
        for path, v in zip(args.images, emb, strict=True):
            print(f"{path}: D={len(v)} norm={np.linalg.norm(v):.4f} "
                  f"[{', '.join(f'{x:.4f}' for x in v[:4])}, ...]")
    else:
        with open(args.request) as f:
            request = json.load(f)
        if "user" not in request or "candidates" not in request:
            sys.exit(f"{args.request}: needs 'user' and 'candidates'")
        spec = client_lib.spec_of_export(args.feature_spec)
        candidates = request["candidates"]
        if args.photo:
            photos = {f.name: _read(args.photo) for f in spec.photos}
            images = [_read(c["image"]) if c.get("image") else b"" for c in candidates]
            candidates = [{k: v for k, v in c.items() if k != "image"} for c in candidates]
            scores = client.rank_page(request["user"], candidates, spec, photos, images,
                                      args.ctr_model)
        else:
            scores = client.rank(request["user"], candidates, spec, args.ctr_model)
        for i in np.argsort(-scores):
            print(f"item {request['candidates'][i].get(spec.item, i)}: ctr {scores[i]:.4f}")


if __name__ == "__main__":
    main()
