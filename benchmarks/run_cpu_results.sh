#!/usr/bin/env bash
# Reproduce benchmarks/results/cpu-*.{json,md,png}: export the three models with random weights
# (speed does not depend on the weights; nothing is downloaded), then benchmark each against its
# PyTorch source, their calls interleaved (fair ratios even when other jobs share the CPU).
# Run from the repository root, ideally on an otherwise idle machine:
#     pip install -e ".[export,bench]" && bash benchmarks/run_cpu_results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p artifacts models

[ -f artifacts/vit-b-32/manifest.json ] ||
    clipfast export --model ViT-B-32 --pretrained none --out artifacts/vit-b-32 --quiet
[ -f artifacts/vit-b-32-quickgelu/manifest.json ] ||
    clipfast export --model ViT-B-32-quickgelu --pretrained none \
        --out artifacts/vit-b-32-quickgelu --quiet
[ -f models/align-base/config.json ] ||
    python -c "import sys; sys.path.insert(0, 'tests'); from hf_models import save_align; \
save_align('models/align-base', full=True)"
[ -f artifacts/align-base/manifest.json ] ||
    clipfast export --model transformers:models/align-base --out artifacts/align-base --quiet

uptime  # the results README says whether other jobs were running (load average > 1.5)
clipfast bench artifacts/vit-b-32 --backends onnxruntime,torch --batch-sizes 1,8,32 \
    --towers image,text --device cpu --images examples/images --warmup 1 --interleave \
    --out benchmarks/results/cpu-vit-b-32.json
clipfast bench artifacts/vit-b-32-quickgelu --backends onnxruntime,torch --batch-sizes 1,8,32 \
    --towers image,text --device cpu --warmup 1 --interleave \
    --out benchmarks/results/cpu-vit-b-32-quickgelu.json
clipfast bench artifacts/align-base --backends onnxruntime,torch --batch-sizes 1,8,32 \
    --towers image,text --device cpu --warmup 1 --interleave \
    --out benchmarks/results/cpu-align-base.json
python benchmarks/headline.py benchmarks/results/cpu-*.json
