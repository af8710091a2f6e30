#!/usr/bin/env bash
# The prepared GPU benchmark (issue 16): throughput, ratio to the reference-loop port, peak GPU memory and bf16
# agreement with fp32 for AnomalyCLIP, VAND and AA-CLIP at ViT-L-14-336@518 and WinCLIP and InCTRL at
# ViT-B-16-plus-240@240, in fp32 and bf16, random weights (benchmarks/bench_predict.py prints what each field is).
#
# Usage (from the repository root):
#   bash benchmarks/gpu.sh download [full]   # here, with internet: the wheels into .wheels/ (git-ignored)
#   bash benchmarks/gpu.sh                   # on the GPU machine (no internet): install what is missing, run
#   bash benchmarks/gpu.sh --device cpu      # the same script's CPU path: zsad-tiny@112, 2 images (a smoke run)
#
# The GPU machine needs python3 with torch and a matching torchvision (open_clip imports it; its wheel must match
# the installed torch, so it is not carried). Every other dependency it lacks is installed from .wheels/ into
# /tmp/zsadkit-site, never over what is installed. `download` fetches the few that a CUDA image with the scientific
# stack lacks (open_clip_torch, ftfy, wcwidth: about 2 MB); `download full` fetches every pinned dependency of
# pyproject.toml but torch, torchvision and the notebook tools, for CPython 3.12 on manylinux x86-64 (about 80 MB:
# more than the 64 MiB a device call carries, so carry `full` only where the machine lacks the scientific stack).
# Environment: PYTHON (default python3), IMAGES (images per measured pass, default 32 on a GPU), REPEATS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=.wheels

# module imported -> distribution pinned in pyproject.toml (or required by one of them)
declare -A DISTRIBUTIONS=(
  [open_clip]="open_clip_torch==3.3.0" [ftfy]="ftfy==6.3.1" [wcwidth]="wcwidth==0.9.4" [numpy]="numpy==2.4.6"
  [scipy]="scipy==1.17.1" [pandas]="pandas==3.1.1" [dateutil]="python-dateutil" [six]="six" [tzdata]="tzdata"
  [PIL]="pillow==13.0.0" [yaml]="pyyaml==6.0.3" [tqdm]="tqdm==4.70.1" [regex]="regex"
  [safetensors]="safetensors==0.8.0" [huggingface_hub]="huggingface_hub" [timm]="timm" [sklearn]="scikit-learn==1.9.1"
  [joblib]="joblib" [threadpoolctl]="threadpoolctl" [filelock]="filelock" [fsspec]="fsspec" [packaging]="packaging"
  [requests]="requests" [typing_extensions]="typing_extensions"
)
MINIMAL=(open_clip ftfy wcwidth)

if [[ "${1:-}" == "download" ]]; then
  mkdir -p "$WHEELS"  # git-ignored (.gitignore); a device call carries it with carry=[".wheels"]
  modules=("${MINIMAL[@]}")
  [[ "${2:-}" == "full" ]] && modules=("${!DISTRIBUTIONS[@]}")
  specs=(); for module in "${modules[@]}"; do specs+=("${DISTRIBUTIONS[$module]}"); done
  ${PYTHON} -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${specs[@]}"
  du -sh "$WHEELS"
  exit 0
fi

DEVICE=cuda
[[ "${1:-}" == "--device" ]] && DEVICE=${2:?--device needs a value}

# Install what is missing (and only that) from the carried wheels.
missing=()
for module in "${!DISTRIBUTIONS[@]}"; do
  ${PYTHON} -c "import ${module}" 2>/dev/null || missing+=("${module}")
done
${PYTHON} -c "import torch, torchvision" || { echo "gpu.sh: python3 needs torch and a matching torchvision" >&2; exit 1; }
if (( ${#missing[@]} > ${#MINIMAL[@]} )) && ! ${PYTHON} -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))"; then
  echo "gpu.sh: the carried 'full' wheels are for CPython 3.12; this python is $(${PYTHON} -V)" >&2; exit 1
fi
if (( ${#missing[@]} )); then
  wheels=()
  for module in "${missing[@]}"; do
    name=${DISTRIBUTIONS[$module]%%==*}
    pattern=$(echo "$name" | tr '-' '_')
    found=$(ls "$WHEELS"/ 2>/dev/null | grep -i "^${pattern}-" | head -1 || true)
    [[ -n "$found" ]] || { echo "gpu.sh: ${module} is missing and ${WHEELS}/ has no ${name} wheel" \
                                "(bash benchmarks/gpu.sh download [full])" >&2; exit 1; }
    wheels+=("$WHEELS/$found")
  done
  echo "# installing into /tmp/zsadkit-site: ${wheels[*]}"
  ${PYTHON} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/zsadkit-site "${wheels[@]}"
  export PYTHONPATH=/tmp/zsadkit-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

REPEATS=${REPEATS:-3}
if [[ "$DEVICE" == cpu ]]; then
  IMAGES=${IMAGES:-2}
  runs=("zsad-tiny 112 anomalyclip vand aaclip" "zsad-tiny 112 winclip inctrl")
else
  IMAGES=${IMAGES:-32}
  ${PYTHON} -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('#', torch.cuda.get_device_name())"
  runs=("ViT-L-14-336 518 anomalyclip vand aaclip" "ViT-B-16-plus-240 240 winclip inctrl")
fi
for run in "${runs[@]}"; do
  read -r backbone size methods <<< "$run"
  # shellcheck disable=SC2086 # methods is a list
  ${PYTHON} benchmarks/bench_predict.py --device "$DEVICE" --backbone "$backbone" --image-size "$size" \
    --methods $methods --precision fp32 bf16 --images "$IMAGES" --batch-sizes 1 "$IMAGES" --repeats "$REPEATS" \
    --agreement
done
