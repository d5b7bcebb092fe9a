#!/usr/bin/env bash
# Build .gpu/ (git-ignored): what a lent GPU machine needs beside the checkout to run
# bench/gpu_suite.py. That machine has torch, torchvision, timm, pyarrow, Pillow, numpy, PyYAML,
# safetensors and pytest but no pydantic, cannot reach a package index, and does not see
# ../shared. So this copies in:
#   .gpu/whl/        wheels for pydantic (+ its four dependencies) and timm, at the versions
#                    this checkout's venv runs (the encoder relies on timm's ViT arguments);
#   .gpu/nih/images/ 64 NIH PNGs for the data-path bench (attribution: ../shared/data/nih-cxr14-621/README.md).
# Usage (from the repository root):  bash scripts/gpu_carry.sh
# Env: PYVER (default 3.12, the GPU machine's Python), DEST (default .gpu), NIH, VENV_PY.
set -euo pipefail
PYVER=${PYVER:-3.12}
DEST=${DEST:-.gpu}
NIH=${NIH:-../shared/data/nih-cxr14-621}
VENV_PY=${VENV_PY:-.venv/bin/python}

mapfile -t pngs < <(find "$NIH/images" -name '*.png' 2>/dev/null | sort)  # no `| head`: SIGPIPE
if (( ${#pngs[@]} == 0 )); then
  echo "gpu_carry: no PNGs under $NIH/images (set NIH=path/to/nih-cxr14-621)" >&2
  exit 2
fi

versions=$("$VENV_PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in
      ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
       "timm")))
EOF
)
rm -rf "$DEST/whl" && mkdir -p "$DEST/whl" "$DEST/nih/images"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
# shellcheck disable=SC2086  # $versions is a list of requirement specifiers
"$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${platforms[@]}" -d "$DEST/whl" $versions
cp "${pngs[@]:0:64}" "$DEST/nih/images/"
cp "$NIH/README.md" "$DEST/nih/README.md"
echo "$DEST: $(ls "$DEST/whl" | wc -l) wheels, $(ls "$DEST/nih/images" | wc -l) PNGs," \
  "$(du -sh "$DEST" | cut -f1)"
