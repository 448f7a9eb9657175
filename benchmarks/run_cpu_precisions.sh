#!/usr/bin/env bash
# Reproduce benchmarks/results/cpu-precisions-*.{json,md,png}: every precision of ViT-B-32, the
# MetaCLIP QuickGELU tower and ALIGN (random weights; nothing is downloaded), each benchmarked at
# batch 32 against eager PyTorch in the same run, calls interleaved. Exports are skipped when
# their artifact exists. Run from the repository root, ideally on an otherwise idle machine:
#     pip install -e ".[export,bench]" && bash benchmarks/run_cpu_precisions.sh [export|bench]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p artifacts models
what="${1:-all}"

export_one() {  # NAME MODEL [export flags...]
    local name=$1 model=$2
    shift 2
    [ -f "artifacts/$name/manifest.json" ] ||
        clipfast export --model "$model" --pretrained none --out "artifacts/$name" --quiet "$@"
}

if [ "$what" != bench ]; then
    [ -f models/align-base/config.json ] ||
        python -c "import sys; sys.path.insert(0, 'tests'); from hf_models import save_align; \
save_align('models/align-base', full=True)"
    for p in fp32 fp16 int8; do
        export_one "vit-b-32-$p" ViT-B-32 --precision $p
        export_one "vit-b-32-quickgelu-$p" ViT-B-32-quickgelu --precision $p
        # The int8 guard refuses the random-weight ALIGN image tower (EfficientNet's depthwise
        # convolutions; see benchmarks/results/README.md): that refusal is the expected outcome.
        export_one "align-base-$p" transformers:models/align-base --precision $p ||
            echo "align-base $p export refused (see the error above)"
    done
    export_one vit-b-32-int8-dynamic ViT-B-32 --precision int8 --int8-method dynamic
fi

if [ "$what" != export ]; then
    uptime
    common=(--backends onnxruntime,torch --batch-sizes 32 --towers image,text --device cpu
            --warmup 1 --min-seconds 2 --interleave)
    clipfast bench artifacts/vit-b-32-{fp32,fp16,int8,int8-dynamic} "${common[@]}" \
        --out benchmarks/results/cpu-precisions-vit-b-32.json
    clipfast bench artifacts/vit-b-32-quickgelu-{fp32,fp16,int8} "${common[@]}" --no-peak \
        --out benchmarks/results/cpu-precisions-vit-b-32-quickgelu.json
    align=(artifacts/align-base-fp32 artifacts/align-base-fp16)
    [ -f artifacts/align-base-int8/manifest.json ] && align+=(artifacts/align-base-int8)
    clipfast bench "${align[@]}" "${common[@]}" --no-peak \
        --out benchmarks/results/cpu-precisions-align-base.json
    uptime
fi
