# Two entry points on a fresh clone: `make run` (the main job) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build these machines carry on disk; a bare range would fetch a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,convert]"
	touch $(STAMP)

# The seed run of nanochat on a CPU: data, tokenizer, a 5M-parameter model, samples from its checkpoint.
SEED_RUN := --depth=4 --aspect-ratio=32 --head-dim=64 --max-seq-len=512 --device-batch-size=1 \
	--total-batch-size=4096 --num-iterations=100 --embedding-lr=0.3 --matrix-lr=0.02 \
	--unembedding-lr=0.004 --weight-decay=0.1
# Then finetuning on the generated conversations (about a minute), its scores on held-out generated tasks, and
# one answer from the chat model.
# One 512-token row a step. Finetuning takes the base lrs as given (nanochat's chat_sft does not scale them by
# batch size), tuned for 2^19-token batches: x 0.1875 here, that is 6 x sqrt(512 / 2^19).
SFT_RUN := --model-tag=d4 --device-batch-size=1 --total-batch-size=512 --num-iterations=300 --init-lr-frac=0.1875 \
	--eval-every=100
run: $(STAMP)
	$(PY) -m scripts.prepare_data
	$(PY) -m scripts.tok_train --vocab-size 8192 --max-chars 10000000
	$(PY) -m scripts.pretrain $(SEED_RUN) --save-every=50 --eval-every=50 --eval-tokens=131072 \
		--sample-every=50 --model-tag=d4
	$(PY) -m scripts.sample --model-tag=d4 --prompt "def main(" --prompt "import " --max-tokens 48
	$(PY) -m scripts.make_conversations
	$(PY) -m scripts.chat_sft $(SFT_RUN)
	$(PY) -m scripts.chat_eval --model-tag=d4 -x 50
	$(PY) -m scripts.chat_cli --model-tag=d4 -p "What is 12+30?"

# One pytest worker per core (pytest-xdist): on 2 cores the suite takes about 6.5 minutes.
test: $(STAMP)
	$(PY) -m pytest -q -n auto

lint: $(STAMP)
	$(PY) -m ruff check .
