# lic-deploy: `make demo` and `make test` each set up .venv when missing and install everything they use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= $(or $(LIC_DEPLOY_DATA),../shared/data)
OUT    ?= out
RUNS   ?= $(or $(LIC_DEPLOY_RUNS),../lic-runs)
GPU_MODELS ?= ../shared/models-gpu
# $(call resume_or,CKPT,ELSE): --resume CKPT when it exists (a training target run again continues), else ELSE
resume_or = $$( [ -f $(1) ] && echo --resume $(1) || echo $(2) )

.PHONY: demo test lint bench bench-gpu-models models-gpu bench-train bench-soap-bf16 bench-speed bench-convergence bench-export bench-codec bench-elic models-tcm bench-tcm bench-runtime clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e ".[export,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check lic_deploy tests
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check lic_deploy tests

demo: $(STAMP)
	$(PY) -m lic_deploy.bench.demo --data $(DATA) --out $(OUT)/demo

bench-export: $(STAMP)
	$(PY) -m lic_deploy.bench.export_bench --out $(OUT)/bench-export

DEMO_NOTE = **Small-scale demonstration.** The demo model set (models/): mbt2018-mean N=64/M=96 trained 1000 steps \
	on 2 CPU cores. Its Adam models sit near 21 dB on Kodak, far from trained, and their PSNR does not rise with \
	rate: read the SOAP/Adam comparison here as a demonstration of the harness, not as a finding. The study at a \
	meaningful scale is [docs/bench-gpu/report.md](../bench-gpu/report.md).
GPU_NOTE = **The robustness study at GPU scale.** Eight mbt2018-mean N=128/M=192 models trained on one NVIDIA \
	H200 (batch 16, 256 px crops; fixed wall-clock budgets with 3-4 runs sharing the GPU, so step counts \
	differ: see ../shared/models-gpu/README.md), measured here on the CPU with ONNX Runtime. One model per \
	point: the intervals cover the choice of test images, not training noise (another seed, another model).

# The quantization-robustness study (docs/bench.md) on Kodak with the shipped models; report + plots in docs/bench/.
bench: $(STAMP)
	LIC_DEPLOY_DATA=$(abspath $(DATA)) $(VENV)/bin/lic-deploy bench $(wildcard models/mbt-*.safetensors) \
		--data $(DATA)/kodak --calib calib/train-64.json --precisions fp32,fp16,int8 \
		--calib-methods minmax,percentile,entropy --backends ort,torch --repeat 5 --outlier-images 4 \
		--fallback-target 1 -o $(OUT)/bench
	$(VENV)/bin/lic-deploy report $(OUT)/bench/results.json -o docs/bench --note "$(DEMO_NOTE)"
	cp $(OUT)/bench/results.json docs/bench/

# The same study on the eight GPU-trained mbt2018-mean N=128/M=192 models (docs/bench-gpu/; ONNX Runtime on the
# CPU, about 90 minutes on 2 cores). Interrupted? Run it again: it resumes after the last finished model.
bench-gpu-models: $(STAMP)
	LIC_DEPLOY_DATA=$(abspath $(DATA)) $(VENV)/bin/lic-deploy bench $(sort $(wildcard $(GPU_MODELS)/*.safetensors)) \
		--data $(DATA)/kodak --calib calib/train-64.json --precisions fp32,fp16,int8 \
		--calib-methods minmax,percentile,entropy --backends ort --repeat 3 --outlier-images 4 \
		--fallback-target 1 --resume -o $(OUT)/bench-gpu
	$(VENV)/bin/lic-deploy report $(OUT)/bench-gpu/results.json -o docs/bench-gpu --note "$(GPU_NOTE)"
	cp $(OUT)/bench-gpu/results.json docs/bench-gpu/

# SOAP against Adam: steps and seconds to Adam's final validation loss (lambda 0.013 of the model set). The SOAP
# log is the equal-quality run: the same SOAP run (same seed, data, lambda), validated every 25 steps.
bench-convergence: $(STAMP)
	$(VENV)/bin/lic-deploy convergence --adam models/mbt-adam-0.013.jsonl --soap models/mbt-soap-eq-0.013.jsonl \
		-o docs/convergence

# The model set itself (about 75 minutes on 2 cores; resumable: rerun to continue).
models: $(STAMP)
	$(PY) -m lic_deploy.train.model_set --data $(DATA)/train --val $(DATA)/kodak --runs $(RUNS) --models models

# The model set at N=128/M=192 on one NVIDIA GPU: the eight equal-budget runs concurrently (batch 16, 256 px
# crops, each stopped at 10000 steps or GPU_SECONDS (420) of training, whichever first), then SOAP to Adam's loss
# at lambda 0.013; published to models-gpu/. Budget: about 10 minutes of training plus validation and publishing on
# one H200 (not yet run there by this recipe; ../shared/models-gpu was made by an equivalent loop).
GPU_SECONDS ?= 420
models-gpu: $(STAMP)
	$(PY) -m lic_deploy.train.model_set --preset gpu --max-seconds $(GPU_SECONDS) --data $(DATA)/train \
		--val $(DATA)/kodak --runs $(RUNS)/gpu --models models-gpu

# Codec speed, step by step, against CompressAI's compress/decompress of the same models (not a timed test).
SPEED_MODELS ?= models/mbt-soap-0.013.safetensors $(wildcard $(GPU_MODELS)/mbt128-soap-0.013.safetensors)
bench-speed: $(STAMP)
	$(PY) -m lic_deploy.bench.speed_bench $(SPEED_MODELS) --data $(DATA)/kodak --images 4 \
		--paths ort:fp32,ort:fp32@ort,ort:int8 --entropy-bits 16,8 --out $(OUT)/bench-speed

# Training speed: SOAP against Adam per step and in the optimizer part, and the data pipeline's images per second.
bench-train: $(STAMP)
	$(PY) -m lic_deploy.bench.train_bench --data $(DATA)/train

# SOAP with bfloat16 products (--soap-bf16) against float32 SOAP: N=128/M=192 at lambda 0.013, per seed of
# SOAP_BF16_SEEDS (the seed-to-seed difference is the noise floor), SOAP_BF16_STEPS steps each (about 7 min per 400
# on 2 cores; resumable, and a larger SOAP_BF16_STEPS extends the runs); then validation loss per step and a plot.
SOAP_BF16_STEPS ?= 400
SOAP_BF16_SEEDS ?= 0 1
SOAP_BF16_TRAIN = --data $(DATA)/train --val $(DATA)/kodak --val-count 6 --N 128 --M 192 --optimizer soap \
	--lmbda 0.013 --batch 8 --patch 128 --val-every 100 --ckpt-every 100 --log-every 25 --align-every 100 --threads 2
bench-soap-bf16: $(STAMP)
	mkdir -p $(RUNS)/soap-bf16
	for seed in $(SOAP_BF16_SEEDS); do for p in fp32 bf16; do ck=$(RUNS)/soap-bf16/$$p-s$$seed.pt; \
		$(VENV)/bin/lic-deploy train $(SOAP_BF16_TRAIN) --steps $(SOAP_BF16_STEPS) --seed $$seed -o $$ck \
			$$( [ $$p = bf16 ] && echo --soap-bf16 ) $(call resume_or,$$ck,) || exit 1; done; done
	$(PY) -m lic_deploy.bench.soap_precision $(RUNS)/soap-bf16 -o $(OUT)/soap-bf16.png

# The integer entropy model and the codec against CompressAI's float path, on the shipped Adam models.
bench-codec: $(STAMP)
	$(PY) -m lic_deploy.bench.codec_bench models/mbt-adam-0.0035.safetensors models/mbt-adam-0.0067.safetensors \
		models/mbt-adam-0.013.safetensors models/mbt-adam-0.025.safetensors --data $(DATA)/kodak --out $(OUT)/bench-codec

# A small ELIC pair (N=32, M=160, SOAP and Adam, 300 steps at lambda 0.013; about 15 min on 2 cores, resumable),
# then its integer entropy path and codec timing against CompressAI's compress/decompress on Kodak.
ELIC_TRAIN = --arch elic --N 32 --M 160 --context-widths 32,32 --lmbda 0.013 --data $(DATA)/train \
	--val $(DATA)/kodak --val-count 2 --steps 300 --batch 4 --patch 128 --threads 1 --val-every 100 --ckpt-every 100
# TCM: a narrow pair (SOAP, Adam) trained here (resumable: run again to continue): a base model per optimizer at
# TCM_BASE from scratch for TCM_STEPS, then every lambda of TCM_LAMBDAS (TCM_BASE too) from that base for
# TCM_FT_STEPS more (--init), so all four points have had the same training; then the integer entropy path against
# the float reference, speed, and INT8 PTQ loss SOAP against Adam.
TCM_LAMBDAS ?= 0.0035 0.0067 0.013 0.025
TCM_BASE ?= 0.013
TCM_STEPS ?= 600
TCM_FT_STEPS ?= 150
TCM_TRAIN = --arch tcm --data $(DATA)/train --val $(DATA)/kodak --val-count 2 --N 32 --M 160 \
	--arch-config slices=5,depth=1,attn=32,cc1=64,cc2=32,Z=64 --patch 256 --batch 4 \
	--ckpt-every 50 --val-every 150 --log-every 25 --align-every 50
TCM_CKPTS = $(foreach l,$(TCM_LAMBDAS),$(RUNS)/tcm/tcm-small-soap-ft-$(l).pt $(RUNS)/tcm/tcm-small-adam-ft-$(l).pt)
models-tcm: $(STAMP)
	mkdir -p $(RUNS)/tcm
	for opt in soap adam; do base=$(RUNS)/tcm/tcm-small-$$opt-$(TCM_BASE).pt; \
		$(VENV)/bin/lic-deploy train $(TCM_TRAIN) --steps $(TCM_STEPS) --lmbda $(TCM_BASE) --optimizer $$opt \
			-o $$base $(call resume_or,$$base,) || exit 1; done
	for l in $(TCM_LAMBDAS); do for opt in soap adam; do ck=$(RUNS)/tcm/tcm-small-$$opt-ft-$$l.pt; \
		$(VENV)/bin/lic-deploy train $(TCM_TRAIN) --steps $(TCM_FT_STEPS) --warmup 20 --lmbda $$l --optimizer $$opt \
			-o $$ck $(call resume_or,$$ck,--init $(RUNS)/tcm/tcm-small-$$opt-$(TCM_BASE).pt) || exit 1; done; done
bench-tcm: $(STAMP)
	for opt in soap adam; do $(PY) -m lic_deploy.bench.codec_bench \
		$(foreach l,$(TCM_LAMBDAS),$(RUNS)/tcm/tcm-small-$$opt-ft-$(l).pt) --data $(DATA)/kodak \
		--out $(OUT)/bench-tcm-codec-$$opt || exit 1; done
	for opt in soap adam; do $(PY) -m lic_deploy.bench.tcm_ablation \
		$(foreach l,$(TCM_LAMBDAS),$(RUNS)/tcm/tcm-small-$$opt-ft-$(l).pt) --data $(DATA)/kodak --images 6 \
		--packages $(OUT)/bench-tcm-codec-$$opt --out $(OUT)/bench-tcm-ablation-$$opt || exit 1; done
	$(PY) -m lic_deploy.bench.speed_bench $(RUNS)/tcm/tcm-small-soap-ft-$(TCM_BASE).pt \
		$(RUNS)/tcm/tcm-small-adam-ft-$(TCM_BASE).pt --data $(DATA)/kodak --images 2 --repeat 2 --paths ort:fp32 \
		--out $(OUT)/bench-tcm-speed
	LIC_DEPLOY_DATA=$(abspath $(DATA)) $(VENV)/bin/lic-deploy bench $(TCM_CKPTS) --data $(DATA)/kodak --images 8 \
		--calib calib/train-64.json \
		--precisions fp32,int8 --calib-methods minmax --backends ort --repeat 1 --outlier-images 2 --resume \
		-o $(OUT)/bench-tcm
	$(VENV)/bin/lic-deploy report $(OUT)/bench-tcm/results.json

bench-elic: $(STAMP)
	mkdir -p $(RUNS)/elic
	for opt in soap adam; do ck=$(RUNS)/elic/elic-$$opt-0.013.pt; \
		$(VENV)/bin/lic-deploy train $(ELIC_TRAIN) --optimizer $$opt -o $$ck $$( [ -f $$ck ] && echo --resume $$ck ) \
		|| exit 1; done
	$(PY) -m lic_deploy.bench.codec_bench $(RUNS)/elic/elic-adam-0.013.pt $(RUNS)/elic/elic-soap-0.013.pt \
		--data $(DATA)/kodak --out $(OUT)/bench-elic

# Install size and start-up time of the runtime layer alone, in a fresh venv.
bench-runtime: $(STAMP)
	$(PY) -m lic_deploy.bench.footprint $(OUT)/bench-export/package --out $(OUT)/bench-runtime

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
