# One place for the commands the README and CI use.
PYTHON ?= python3
# The CPU build of torch, pinned: an unpinned torch pulls the newest CUDA build (gigabytes).
TORCH ?= torch==2.13.0

.PHONY: install demo test lint unit bench-model bench-gpu bench-tokenizer bench-data bench-train bench-finetune bench-s3 bench-predict bench-wait bench-recipe bench-imdb

install:
	$(PYTHON) -m pip install --quiet $(TORCH)
	$(PYTHON) -m pip install --quiet -e ".[dev]"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# The README's first command: the demo pipeline end to end (pretrain, fine-tune on IMDB, evaluate,
# promote, predict from the registry) on an in-process Ray and an SQLite MLflow store in the
# working directory (mlflow ui --backend-store-uri sqlite:///mlflow.db).
demo: install
	$(PYTHON) -m jobs.pipeline --config jobs/configs/demo.yaml

# The README's test command: set up, lint, run every test (unit and integration).
test: install lint
	$(PYTHON) -m pytest

unit:
	$(PYTHON) -m pytest -m "not slow"

bench-model:
	$(PYTHON) benchmarks/model_throughput.py

bench-gpu:
	$(PYTHON) benchmarks/gpu_check.py

bench-tokenizer:
	$(PYTHON) benchmarks/tokenizer_throughput.py

bench-data:
	$(PYTHON) benchmarks/data_throughput.py

bench-train:
	$(PYTHON) benchmarks/train_overhead.py

bench-finetune:
	$(PYTHON) benchmarks/finetune_throughput.py

# Reading documents from an S3-compatible server on 127.0.0.1 against local disk (needs moto[server]).
bench-s3:
	$(PYTHON) benchmarks/s3_reads.py

bench-wait:
	$(PYTHON) benchmarks/cluster_data_wait.py

bench-predict:
	$(PYTHON) benchmarks/batch_predict.py

# The pretraining recipe against the standard initialisation and a byte-level BERT (~7 min).
bench-recipe:
	$(PYTHON) benchmarks/pretrain_recipe.py --plot docs/pretrain_recipe.png

bench-imdb:
	$(PYTHON) benchmarks/imdb_classifiers.py
