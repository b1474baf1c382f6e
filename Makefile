# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= data
WORLD ?= small
SEED ?= 0
export TF_USE_LEGACY_KERAS := 1

# Training seeds of the reproductions: a claim is judged across at least three
# (trainer/eval/significance.py: compare_seeds).
SEEDS ?= 0 1 2
RUNS ?= runs
# Seeds that train paper 002's Table 6 variants in repro-courier (empty: every seed of SEEDS).
ABLATION_SEEDS ?=
# Test processes: a test file runs whole on one of them (its module fixtures are built once).
TEST_WORKERS ?= 2

.PHONY: demo test test-e2e test-slow lint probe daily search-page browser repro-visual repro-ctr repro-courier repro-batch repro-unseen repro-dose sweep-tau bench-input bench-convert bench-bootstrap bench-crc bench-serving bench-embed bench-kmeans bench-export-vocab bench-train export validate docs lock clean

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==24.3.1
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# The default synthetic world (regenerated only when missing), and the same world written with the
# feed spec's `ctr` columns (paper 002's setting: no query photo, demographics or preferences).
$(DATA)/$(WORLD)/manifest.json: | $(VENV)/.installed
	$(PY) -m trainer.task --stage=synth --world=$(WORLD) --seed=$(SEED) --data_dir=$(DATA)/$(WORLD)

$(DATA)/$(WORLD)_feed/manifest.json: | $(VENV)/.installed
	$(PY) -m trainer.task --stage=synth --world=$(WORLD) --seed=$(SEED) --ctr_spec=feed \
	  --data_dir=$(DATA)/$(WORLD)_feed

# The whole chain on the default world in about 25 minutes on 2 cores: encoders (ResNet-C, S1, S2,
# S1+S2, COURIER, and Table 5's Supervised, SimSiam, CLIP, MaskCLIP), visual search, the
# vocabularies (Beam), clustering, the CTR model with and without D and each image feature, the
# feed spec's CTR model, the TF Serving exports and the catalog embedding; then report/index.md
# with its plots.
DEMO := $(RUNS)/demo
demo: $(VENV)/.installed $(DATA)/$(WORLD)/manifest.json $(DATA)/$(WORLD)_feed/manifest.json
	$(PY) -m trainer.task --stage=inspect --data_dir=$(DATA)/$(WORLD) --model_dir=$(DEMO)
	$(PY) scripts/demo.py --data_dir=$(DATA)/$(WORLD) --feed_data_dir=$(DATA)/$(WORLD)_feed \
	  --out_dir=$(DEMO) --seed=$(SEED)
	$(MAKE) --no-print-directory export
	$(PY) scripts/report.py --data_dir=$(DATA)/$(WORLD) --demo_dir=$(DEMO) --out_dir=report

# TF Serving exports of the demo's S1+S2 encoder, its S1+S2 CTR model and the feed spec's COURIER
# Cluster-ID CTR model into $(DEMO)/models (version 1, replacing an earlier demo's), their
# signatures, the catalog encoded with the exported encoder (embeddings, faiss index, cluster
# ids), the daily refresh: the CTR model as version 2 with that catalog embedding's items, and
# the visual search ad request over that catalog (export.search).
MODELS := $(DEMO)/models
export: $(VENV)/.installed
	rm -rf $(MODELS) $(DEMO)/catalog_embeddings
	$(PY) -m export.encoder --model_dir=$(DEMO)/s1s2 --export_dir=$(MODELS)/encoder --version=1
	$(PY) -m export.ctr --model_dir=$(DEMO)/ctr/s1s2 --export_dir=$(MODELS)/ctr --version=1
	$(PY) -m export.ctr --model_dir=$(DEMO)/ctr_feed/courier_cluster_id \
	  --export_dir=$(MODELS)/ctr_feed --version=1
	$(VENV)/bin/saved_model_cli show --dir $(MODELS)/encoder/1 --tag_set serve \
	  --signature_def serving_default
	$(VENV)/bin/saved_model_cli show --dir $(MODELS)/ctr_feed/1 --tag_set serve \
	  --signature_def serving_default
	$(PY) -m trainer.task --stage=embed --data_dir=$(DATA)/$(WORLD) --export_dir=$(MODELS)/encoder \
	  --model_dir=$(DEMO)/catalog_embeddings
	$(PY) -m export.ctr --model_dir=$(DEMO)/ctr/s1s2 --export_dir=$(MODELS)/ctr --version=2 \
	  --item_embeddings=$(DEMO)/catalog_embeddings/embeddings.npz
	$(PY) -m export.search --model_dir=$(DEMO)/ctr/s1s2 --export_dir=$(MODELS)/search --version=1 \
	  --item_embeddings=$(DEMO)/catalog_embeddings/embeddings.npz
	$(VENV)/bin/saved_model_cli show --dir $(MODELS)/search/1 --tag_set serve \
	  --signature_def request

# The served search on a web page: the stand-in model server with make export's search model,
# and the page at http://127.0.0.1:8080 (Ctrl-C stops both).
search-page: $(VENV)/.installed
	$(PY) -m serving.stand_in_server --model=search=$(MODELS)/search --port=8500 \
	  --rest_api_port=8501 & trap "kill $$!" EXIT; \
	  $(PY) -m serving.search_page --data_dir=$(DATA)/$(WORLD) --export_dir=$(MODELS)/search \
	  --model_server=http://127.0.0.1:8501

# Debian's chromium and chromedriver, for the search page's browser test (the test installs them
# itself when missing).
browser:
	sh scripts/install_browser.sh

# Encoder images/s through the SavedModel vs. Keras; CTR p50/p99 latency (needs make demo's runs).
bench-serving: $(VENV)/.installed
	$(PY) scripts/bench_serving.py --encoder_dir=$(DEMO)/s1s2 --ctr_dir=$(DEMO)/ctr/s1s2

# Catalog encoding images/s: the Beam embed pipeline beside an in-process loop (needs make demo's
# encoder export).
bench-embed: $(VENV)/.installed $(DATA)/$(WORLD)/manifest.json
	$(PY) scripts/bench_embed.py --data_dir=$(DATA)/$(WORLD) --export_dir=$(MODELS)/encoder

# Cluster-ID k-means against raw faiss at 200k x 1,000 and 1M x 10,000, with a projection.
bench-kmeans: $(VENV)/.installed
	$(PY) scripts/bench_kmeans.py

# A CTR export with vocabularies of 10k to 1M ids: sizes, load time, p99 of a page of 100.
bench-export-vocab: $(VENV)/.installed
	$(PY) scripts/bench_export_vocab.py

# Training-step images/s of S1 and COURIER, their share of a matmul peak, input keep-up.
bench-train: $(VENV)/.installed $(DATA)/$(WORLD)/manifest.json
	$(PY) scripts/bench_train.py --data_dir=$(DATA)/$(WORLD)

# The daily cycle over two weeks of the `moving` world (docs/daily.md): S1 and the CTR model on
# day 0, then each day (a) the daily cycle, (b) a model from scratch on every day so far, (c) day
# 0's model frozen, scored on the day's held-out pages: report/daily/index.md and daily.png.
daily: $(VENV)/.installed $(DATA)/moving/manifest.json
	$(PY) scripts/daily.py --data_dir=$(DATA)/moving --out_dir=$(RUNS)/daily \
	  --report_dir=report/daily --seed=$(SEED)

$(DATA)/moving/manifest.json: | $(VENV)/.installed
	$(PY) -m trainer.task --stage=synth --world=moving --seed=$(SEED) --data_dir=$(DATA)/moving

# Paper 000 Table 1: ResNet-C, S1, S2, S1+S2 and visual search; about 15 min per seed on 2 cores.
# Trained stages are kept (a rerun only evaluates); SEEDS="0 1" runs two seeds.
repro-visual: $(VENV)/.installed $(DATA)/$(WORLD)/manifest.json
	$(PY) scripts/repro_visual.py --data_dir=$(DATA)/$(WORLD) --out_dir=$(RUNS)/visual \
	  --seeds=$(shell echo $(SEEDS) | tr ' ' ',')

# Paper 000 Table 2: the CTR predictor with the ResNet-C, VGG and ViT competitors' features, with
# S1, S2, S1+S2 features and S1+S2+D, and without image features; reuses the encoders of
# repro-visual (training them if missing) and trains VGG-C and ViT-C beside them.
repro-ctr: $(VENV)/.installed $(DATA)/$(WORLD)/manifest.json
	$(PY) scripts/repro_ctr.py --data_dir=$(DATA)/$(WORLD) --visual_dir=$(RUNS)/visual \
	  --out_dir=$(RUNS)/ctr --seeds=$(shell echo $(SEEDS) | tr ' ' ',')

# Paper 002 Tables 5, 8, B1 and 6: COURIER (from repro-visual's S1, trained if missing), its
# ablations and COURIER + CLIP, S1 and COURIER features as vector / simscore / cluster_id in the
# CTR model; Table 5 twice, every method from S1's backbone on the same images and every method
# from random weights (SimCLR at tau 0.2, Supervised on the early train days, the CTR models on
# the late ones).
repro-courier: $(VENV)/.installed $(DATA)/$(WORLD)/manifest.json
	$(PY) scripts/repro_courier.py --data_dir=$(DATA)/$(WORLD) --visual_dir=$(RUNS)/visual \
	  --out_dir=$(RUNS)/courier --seeds=$(shell echo $(SEEDS) | tr ' ' ',') \
	  --ablation_seeds=$(shell echo $(ABLATION_SEEDS) | tr ' ' ',')

# Paper 002 Table 7: COURIER at global batch sizes 64 up (over 2 replicas, negatives gathered
# across them) until one does not fit, each size's Cluster-ID features in the CTR model.
repro-batch: $(VENV)/.installed $(DATA)/$(WORLD)/manifest.json
	$(PY) scripts/repro_batch.py --data_dir=$(DATA)/$(WORLD) --visual_dir=$(RUNS)/visual \
	  --out_dir=$(RUNS)/batch --seeds=$(shell echo $(SEEDS) | tr ' ' ',')

# Paper 002 Fig. 4: S1 and COURIER pre-trained on half of the categories (the others absent from
# their images and page views), their CTR gains per category.
repro-unseen: $(VENV)/.installed $(DATA)/$(WORLD)/manifest.json
	$(PY) scripts/repro_unseen.py --data_dir=$(DATA)/$(WORLD) \
	  --out_dir=$(RUNS)/unseen --seeds=$(shell echo $(SEEDS) | tr ' ' ',')

# When does each method help? The dose-response study: three properties of the data at strengths
# 0 to 1 on the `dose` world, the pair each should separate, over SEEDS (docs/results.md); a rerun
# continues where the last stopped.
repro-dose: $(VENV)/.installed
	$(PY) scripts/repro_dose.py --data_root=$(DATA)/dose --out_dir=$(RUNS)/dose \
	  --seeds=$(shell echo $(SEEDS) | tr ' ' ',')

# Paper 002 Fig. 3: downstream CTR gain against COURIER's temperature (reuses repro-courier's runs).
sweep-tau: $(VENV)/.installed $(DATA)/$(WORLD)/manifest.json
	$(PY) scripts/sweep_tau.py --data_dir=$(DATA)/$(WORLD) --visual_dir=$(RUNS)/visual \
	  --out_dir=$(RUNS)/courier --seeds=$(shell echo $(SEEDS) | tr ' ' ',')

# Two tiers, both run by CI (.ci/run). `make test`: every test but the slow reproductions and
# the end-to-end runs (about 15 minutes on 2 cores). `make test-e2e`: the runs of whole command
# chains and clusters of processes (tests marked `e2e`: docs/data.md's section as written, the
# daily cycles beyond the first, parameter-server, multi-worker and Dask clusters).
# The longest files first, so the two processes finish together (pytest collects a file once).
# The trained tiny-world models that several files use are built once per run, by whichever
# worker asks first (tests/conftest.py: shared_dir).
LONG_TESTS := tests/test_export_ctr.py tests/test_daily.py tests/test_evaluate.py \
  tests/test_visual_stages.py tests/test_search.py tests/test_backbones.py tests/test_ctr.py \
  tests/test_reliability.py tests/test_task.py tests/test_export_encoder.py
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not e2e" --durations=10 \
	  $(LONG_TESTS) tests

E2E_TESTS := tests/test_daily.py tests/test_bring_your_own_data.py tests/test_dask.py \
  tests/test_parameter_server.py tests/test_distributed.py
test-e2e: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m e2e --durations=10 $(E2E_TESTS) tests

# The learning-quality reproductions among the tests (S1 and S1+S2 beat a random encoder on the
# tiny world's visual search: about 3 minutes).
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow tests

# ruff (E, F, I, B, UP; line length 100) over the code, mypy (check_untyped_defs; every def typed
# in the new and moved modules) over trainer/, export/, serving/ and scripts/. The same two run
# before each commit with `pre-commit install` (.pre-commit-config.yaml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check trainer export serving scripts tests
	$(VENV)/bin/mypy

# Where TFRecord checksums cost time: validate (a clean data dir, a corrupt frame) and the Beam
# convert of a 100,000-row table; INSTALLS="new=.venv/bin/python old=../old/.venv/bin/python:../old"
# times several installs side by side.
bench-crc: $(VENV)/.installed $(DATA)/$(WORLD)/manifest.json
	$(PY) scripts/bench_crc.py --data_dir=$(DATA)/$(WORLD) $(foreach i,$(INSTALLS),--install=$(i))

# Peak memory of the streaming paired bootstrap on 10^6 and 10^7 predictions (their ratio).
bench-bootstrap: $(VENV)/.installed
	$(PY) scripts/bench_bootstrap.py --sizes 1000000 10000000

# Peak memory of the Parquet converter on N and 4N rows (their ratio: 1.0 = it does not grow).
bench-convert: $(VENV)/.installed
	$(PY) scripts/bench_convert.py

# Every kind of bad record against validate and every training stage (about 30 min on 2 cores).
probe: $(VENV)/.installed
	$(PY) scripts/probe_bad_input.py

bench-input: $(VENV)/.installed $(DATA)/$(WORLD)/manifest.json
	$(PY) scripts/bench_input.py --data_dir=$(DATA)/$(WORLD)

validate: $(VENV)/.installed $(DATA)/$(WORLD)/manifest.json
	$(PY) -m trainer.task --stage=validate --data_dir=$(DATA)/$(WORLD)

# The documentation site (docs/ -> site/, MkDocs + Material, the API reference from docstrings;
# strict: a broken link or anchor fails), after regenerating docs/data_format.md's tables.
docs: $(VENV)/.installed
	$(PY) -m trainer.data_format docs/data_format.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Re-resolves the lock from requirements.txt (then verify with `make test`).
lock:
	rm -rf /tmp/lock-venv && $(PYTHON) -m venv /tmp/lock-venv
	/tmp/lock-venv/bin/pip install -q -r requirements.txt
	(echo "# Full verified lock (Python 3.11, CPU). Regenerate with 'make lock'."; \
	 /tmp/lock-venv/bin/pip freeze) > constraints.txt

clean:
	rm -rf $(VENV) *.egg-info
