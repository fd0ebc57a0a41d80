#!/usr/bin/env bash
# Writes tests/data/compat/: a checkpoint made by an earlier limoe (the `limoe` program given as $1), a batch,
# and that program's `limoe embed` output for it. test_checkpoint.cpp loads the checkpoint with the current
# code and checks it gives the same embeddings and routes: checkpoints of the previous version keep loading.
#
#   tests/reference/make_compat.sh OLD_LIMOE_BINARY [label]
# Needs python3 (standard library only) to write the batch.
set -euo pipefail
old=${1:?usage: make_compat.sh OLD_LIMOE_BINARY [label]}
label=${2:-v1}
out=$(cd "$(dirname "$0")/../data" && pwd)/compat
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$old" train --preset tiny --data fashion-mnist --steps 4 --batch 16 --seed 3 --out "$tmp/run" >/dev/null
cp "$tmp/run/checkpoint.safetensors" "$out/${label}_tiny.safetensors"
python3 - "$out/${label}_batch.safetensors" <<'PY'
import json, math, struct, sys
B, H, W, C, T = 3, 28, 28, 1, 16
images = [math.sin(0.37 * i) * 0.9 for i in range(B * H * W * C)]
texts = [(3 + (i * 7) % 20) if i % T < 4 + i // T else 0 for i in range(B * T)]
blobs = [struct.pack(f"<{len(images)}f", *images), struct.pack(f"<{len(texts)}i", *texts)]
header = {"images": {"dtype": "F32", "shape": [B, H, W, C], "data_offsets": [0, len(blobs[0])]},
          "texts": {"dtype": "I32", "shape": [B, T], "data_offsets": [len(blobs[0]), len(blobs[0]) + len(blobs[1])]}}
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + blobs[0] + blobs[1])
PY
"$old" embed --checkpoint "$out/${label}_tiny.safetensors" --input "$out/${label}_batch.safetensors" \
  --output "$out/${label}_emb.safetensors" --threads 1
echo "wrote $out/${label}_{tiny,batch,emb}.safetensors"
