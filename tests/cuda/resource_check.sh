#!/usr/bin/env bash
# tests/cuda/resource_check.sh NVCC SRC_DIR: compiles the CUDA backend (src/cuda/backend.cu) for sm_90 with
# `nvcc --resource-usage` and fails when any kernel spills registers or uses a stack frame; prints each
# kernel's register count. A CTest (label "cuda"), so CI checks it on every change, with or without a GPU.
set -euo pipefail
nvcc=$1 src=$2
log=$(mktemp) obj=$(mktemp --suffix=.o)
trap 'rm -f "$log" "$obj"' EXIT
"$nvcc" -std=c++20 -O3 -arch=sm_90 --extended-lambda --resource-usage -I"$src/include" -I"$src/src" -I"$src/src/cuda" \
  -c "$src/src/cuda/backend.cu" -o "$obj" >"$log" 2>&1 || { cat "$log"; exit 1; }
# ptxas prints, per kernel: "Function properties for NAME", "N bytes stack frame, N bytes spill stores, N bytes
# spill loads", "Used N registers".
awk '
  /Function properties for/ { name = $NF }
  /bytes stack frame/ { k++; if ($1 + $5 + $9 > 0) { bad++; print "resource_check: " name ": " $0 } }
  /Used [0-9]+ registers/ { for (i = 1; i <= NF; i++) if ($i == "Used" && $(i + 1) + 0 > regs) regs = $(i + 1) + 0 }
  END {
    if (k == 0) { print "resource_check: no kernel found in nvcc'"'"'s report"; exit 1 }
    printf "resource_check: %d kernels, at most %d registers, %d with spills or a stack frame\n", k, regs, bad
    exit bad > 0
  }' "$log"
