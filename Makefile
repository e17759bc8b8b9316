# wit-builder: every target takes RECIPE=path/to/recipe.toml (default: the demo).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= pipelines/recipes/demo.toml
RUN_DIR = $(shell $(BIN)/python -c "from wit_builder.recipe import load_recipe; print(load_recipe('$(RECIPE)').run_dir)")
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_AUTH_MODE := disabled

.PHONY: setup demo test test-fast lint docs queries candidates filter match download dedup balance shards corpus \
	train stamps-eval fashion stats report status sql bench clean

## setup: build .venv (idempotent); WordNet 3.0, Fashion-MNIST and Tux Paint's stamps if they are
## missing, and the stamps' web pages for the demo
STAMPS := runs/stamps
setup: $(VENV)/.installed /usr/share/wordnet/data.noun /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz \
	$(STAMPS)/held-out/caption-template.txt

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[ray,test,bench]'
	@touch $@

/usr/share/wordnet/data.noun:
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -q --no-install-recommends wordnet-base

# Fashion-MNIST: an evaluation set for decontamination and the trainer's zero-shot sanity check.
/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz:
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -q --no-install-recommends dataset-fashion-mnist

# Tux Paint's stamps (drawings with one-line descriptions): the demo's captioned images.
/usr/share/doc/tuxpaint-stamps-default/copyright:
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -q --no-install-recommends tuxpaint-stamps-default

$(STAMPS)/held-out/caption-template.txt: pipelines/demo/stamps.py | $(VENV)/.installed /usr/share/doc/tuxpaint-stamps-default/copyright
	$(BIN)/python -m pipelines.demo.stamps $(STAMPS)

## demo: run the demo recipe end to end and say where the result is
demo: setup
	$(BIN)/wit run $(RECIPE)
	@echo
	@$(BIN)/wit status $(RUN_DIR)
	@echo
	@$(BIN)/wit sql $(RUN_DIR) "SELECT s AS source, count(*) AS entries FROM (SELECT unnest(sources) AS s FROM queries) GROUP BY s ORDER BY entries DESC"
	@$(BIN)/wit sql $(RUN_DIR) "$$(cat wit_builder/reports/01_funnel.sql)"
	@$(BIN)/wit report $(RUN_DIR)
	@echo "Query list: $(RUN_DIR)/queries/queries.parquet"
	@echo "Report:     $(RUN_DIR)/report.html  (make stats prints every report)"
	@echo "Shards:     $(RUN_DIR)/shards/ (WebDataset tars, sizes.json, shards.parquet)"
	@echo "Ask it anything:  $(BIN)/wit sql $(RUN_DIR) \"SELECT reason, count(*) FROM dedup GROUP BY 1\""

## test: lint, then the whole test suite (slow tests included)
test: setup lint
	$(BIN)/python -m pytest -q --durations=20  # the slowest tests, to keep the suite near 20 minutes

## lint: ruff, with the project's rules (pyproject.toml)
lint: setup
	$(BIN)/ruff check .

## docs: regenerate docs/recipe.md from the recipe models (a test fails when it is stale)
docs: setup
	$(BIN)/python -m wit_builder.recipe_doc docs/recipe.md

## test-fast: the suite without the slow end-to-end tests
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

## queries, candidates, filter, match, download, dedup, balance, shards: one stage alone
STAGES := queries candidates filter match download dedup balance shards
$(STAGES): setup
	$(BIN)/wit run $(RECIPE) --stage $@

## corpus: every stage, queries to shards
corpus: setup
	$(BIN)/wit run $(RECIPE)

## train: train the tiny CLIP model on the run's shards (made first if missing; ~2.5 CPU minutes on
## the demo's); TRAIN_ARGS adds
## wit train options, e.g. TRAIN_ARGS="--model ViT-B-32 --steps 10000 --batch-size 256"
TRAIN_ARGS ?=
train: setup
	$(BIN)/wit run $(RECIPE)
	$(BIN)/wit train --data $(RUN_DIR)/shards --output $(RUN_DIR)/train --model wit-tiny --steps 1500 \
		--batch-size 32 --warmup 50 --workers 1 --save-every 500 --log-every 100 $(TRAIN_ARGS)
	@echo "Checkpoints and log.csv: $(RUN_DIR)/train"

## stamps-eval: zero-shot of the run's trained model on the stamps the demo held out: which of the
## 160 held-out descriptions each drawing matches (chance 0.6%), then their 15 categories
stamps-eval: setup
	$(BIN)/wit eval --data $(STAMPS)/held-out/captions --templates $(STAMPS)/held-out/caption-template.txt \
		--checkpoint $(RUN_DIR)/train --workers 1
	$(BIN)/wit eval --data $(STAMPS)/held-out/categories --checkpoint $(RUN_DIR)/train --workers 1

## fashion: the trainer's sanity check: Fashion-MNIST shards, ~4 CPU minutes of training from
## scratch, then zero-shot top-1/top-5 on the 10,000 test images
FASHION := runs/fashion
fashion: setup $(FASHION)/shards/classnames.txt
	$(BIN)/wit train --data '$(FASHION)/shards/train-*.tar' --output $(FASHION)/train --steps 300 \
		--batch-size 256 --warmup 30 --lr 1e-3 --workers 1 --save-every 100 --log-every 20 $(TRAIN_ARGS)
	$(BIN)/wit eval --data '$(FASHION)/shards/test-*.tar' --checkpoint $(FASHION)/train

$(FASHION)/shards/classnames.txt: | /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
	$(BIN)/python -m trainer.fashion $(FASHION)/shards

## stats: every built-in report (wit_builder/reports/*.sql) over the run
stats: setup
	$(BIN)/wit stats $(RUN_DIR)

## report: RUN_DIR/report.html, one self-contained page with plots
report: setup
	$(BIN)/wit report $(RUN_DIR)

status: setup
	$(BIN)/wit status $(RUN_DIR)

## sql: an interactive DuckDB prompt over the run's stage views
sql: setup
	$(BIN)/wit sql $(RUN_DIR)

## bench: every benchmark; figures go to bench/README.md by hand
bench: setup
	$(BIN)/python bench/dump_counting.py
	$(BIN)/python bench/unigram_table.py
	$(BIN)/python bench/match.py
	$(BIN)/python bench/download.py
	$(BIN)/python bench/corpus.py
	$(BIN)/python bench/neardup.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/stats.py
	$(BIN)/python bench/train_data.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/upload.py

clean:
	rm -rf runs
