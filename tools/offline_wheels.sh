#!/usr/bin/env bash
# Download, on a machine with internet, the wheels a GPU machine without internet needs to run dsv4 on CUDA
# (docs/cuda.md, "Offline GPU machines"). Torch itself is expected there already (a CUDA build).
#
# usage: tools/offline_wheels.sh DEST [PYTHON_VERSION] [--tilelang]
#   DEST            folder for the wheels (copy it to the GPU machine)
#   PYTHON_VERSION  the GPU machine's Python, e.g. 3.12 (default: 3.12)
#   --tilelang      also fetch TileLang and its runtime dependencies (optional: dsv4's CUDA kernels are Triton)
#   (always fetched too: the `serve` extra for `dsv4 serve` / `dsv4 bench serve` with its dependencies)
#   TRITON=...      environment: the triton requirement (default "triton>=3.6"); match the GPU machine's torch,
#                   e.g. TRITON=triton==3.6.0 for torch 2.11 (pip show torch lists the triton it requires)
# on the GPU machine:
#   pip install --no-index --find-links DEST triton click safetensors tokenizers numpy   # if missing
#   pip install --no-index --find-links DEST --no-deps -e .                                # dsv4 from a checkout
#   pip install --no-index --find-links DEST fastapi uvicorn jinja2                       # for dsv4 serve
#   pip install --no-index --find-links DEST --no-deps tilelang apache-tvm-ffi torch-c-dlpack-ext z3-solver
set -euo pipefail
dest=${1:?usage: $0 DEST [PYTHON_VERSION] [--tilelang]}
python_version=${2:-3.12}
mkdir -p "$dest"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
fetch() {   # wheels only, for the target Python and platform, no dependency resolution (torch stays out)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    "${platforms[@]}" -d "$dest" "$@"
}
fetch "${TRITON:-triton>=3.6}" "click>=8" "safetensors>=0.4" "tokenizers>=0.15" numpy
# the serve extra (dsv4 serve, dsv4 bench serve) and everything it pulls in
fetch fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-extensions typing-inspection \
  anyio idna opentelemetry-api uvicorn h11 jinja2 markupsafe
if [[ "${3:-}" == "--tilelang" ]]; then
  # the set verified on an H100 (torch 2.11+cu130, Python 3.12) in November 2026
  fetch tilelang==0.1.15 apache-tvm-ffi==0.1.12 torch-c-dlpack-ext==0.1.5 z3-solver==4.15.4.0
fi
ls -1 "$dest"
