#!/usr/bin/env bash
# bench/run_compare.sh: limoe against its PyTorch peer on the reference points of bench/README.md,
# side by side in one run, and a markdown table of throughputs and ratios on stdout.
#
#   bench/run_compare.sh [path/to/limoe]            (default: ./build/tools/limoe; builds nothing)
#
# Environment knobs:
#   THREADS="1 2"          thread counts to measure
#   PRECISIONS="fp32"      precisions to measure (fp32 and/or bf16: limoe --precision, the peer's autocast)
#   CASES=all              all: every workload; models: gemm, embed and train_step only
#   PEER_PY=/usr/bin/python3   the Python with torch (Debian's python3-torch, or a virtual environment with
#                          PyTorch 2 from PyPI: bench/README.md)
#   PEER_BLAS_DIR=auto     directory with the libblas.so.3 torch should load: auto = Debian's OpenBLAS (the
#                          openmp build, else the pthread one: /usr/lib/x86_64-linux-gnu/openblas-* if installed,
#                          else unpacked without installing from a libopenblas0-* .deb found in apt's cache or in
#                          $TMPDIR), none = the system's libblas.so.3 as it is (Debian's default is the reference
#                          BLAS, ~6 GFLOP/s), or a directory
#   PEER_CORETYPE=auto     OPENBLAS_CORETYPE for the peer: auto = the fastest of (unset) Haswell Zen SkylakeX
#                          Cooperlake on the 1-thread gemm; unset; or a name
#   QUICK=1                tiny sizes, one repeat: checks the script, measures nothing
#   OUT=dir                where the raw JSON lines go (default: a new folder under ${TMPDIR:-/tmp})
# Every case runs limoe then the peer; a failing case is recorded and the run goes on. Each precision and
# thread count starts with the machine's peak (limoe bench --workload peak), reported beside the ceiling.
set -u -o pipefail

LIMOE=${1:-./build/tools/limoe}
THREADS=${THREADS:-"1 2"}
PRECISIONS=${PRECISIONS:-fp32}
CASES=${CASES:-all}
PEER_PY=${PEER_PY:-/usr/bin/python3}
PEER_BLAS_DIR=${PEER_BLAS_DIR:-auto}
PEER_CORETYPE=${PEER_CORETYPE:-auto}
QUICK=${QUICK:-0}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PEER="$HERE/peer/peer.py"
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/limoe-compare.XXXXXX")}
mkdir -p "$OUT"
RAW="$OUT/results.jsonl"
: > "$RAW"

[ -x "$LIMOE" ] || { echo "run_compare: $LIMOE is not an executable (build it: cmake --build build --target limoe)" >&2; exit 2; }
"$PEER_PY" -c "import torch" 2>/dev/null || { echo "run_compare: $PEER_PY has no torch (apt-get install python3-torch)" >&2; exit 2; }

# ---- the peer's BLAS ------------------------------------------------------------------------------------------
blas_dir=""
case "$PEER_BLAS_DIR" in
  none) ;;
  auto)
    # Debian's OpenBLAS, OpenMP build first (it shares torch's libgomp pool), then the pthread build: installed,
    # or else unpacked (dpkg -x, nothing installed) from a .deb in apt's cache or in $TMPDIR.
    for v in openmp pthread; do
      sys=/usr/lib/x86_64-linux-gnu/openblas-$v
      if [ -e "$sys/libblas.so.3" ]; then blas_dir=$sys; break; fi
      deb=$(ls /var/cache/apt/archives/libopenblas0-${v}_*_amd64.deb "${TMPDIR:-/tmp}"/libopenblas0-${v}_*_amd64.deb 2>/dev/null | tail -n 1)
      if [ -n "$deb" ]; then
        dest="${TMPDIR:-/tmp}/limoe-peer-openblas-$v"
        [ -e "$dest$sys/libblas.so.3" ] || dpkg -x "$deb" "$dest"
        blas_dir="$dest$sys"
        break
      fi
    done
    if [ -z "$blas_dir" ]; then
      echo "run_compare: no OpenBLAS found; the peer uses the system libblas.so.3 as it is" \
           "(apt-get install libopenblas0-openmp, or 'apt-get download libopenblas0-openmp' into \$TMPDIR, for a fair peer)" >&2
    fi ;;
  *) blas_dir=$PEER_BLAS_DIR ;;
esac
peer_args=()
[ -n "$blas_dir" ] && peer_args+=(--blas-dir "$blas_dir")

if [ "$QUICK" = 1 ]; then
  LT="--tokens 256"; REP="--repeats 1 --warmup 0"; WIDTHS="64 128"; CFGS="tiny small-28"; BATCH=4; TREP="--repeats 1 --warmup 0"
else
  LT="--tokens 4096"; REP="--repeats 5 --warmup 1"; WIDTHS="384 768"; CFGS="S/32 B/32"; BATCH=32; TREP=""
fi

# ---- OPENBLAS_CORETYPE -----------------------------------------------------------------------------------------
coretype=""
coretype_note="unset"
if [ -n "$blas_dir" ]; then
  if [ "$PEER_CORETYPE" = auto ]; then
    best=0
    coretype_note=""
    for ct in "" Haswell Zen SkylakeX Cooperlake; do
      g=$("$PEER_PY" "$PEER" "${peer_args[@]}" --openblas-coretype "$ct" --workload gemm --threads 1 $LT --repeats 5 --warmup 1 \
          | "$PEER_PY" -c "import json,sys; print(json.loads(sys.stdin.read())['gflops'])") || g=0
      echo "run_compare: OPENBLAS_CORETYPE=${ct:-(unset)}: torch.mm ${g} GFLOP/s (1 thread)" >&2
      coretype_note="$coretype_note ${ct:-unset}=$(printf '%.1f' "$g")"
      if "$PEER_PY" -c "import sys; sys.exit(0 if float('$g') > float('$best') * 1.02 else 1)"; then best=$g; coretype=$ct; fi
    done
  elif [ "$PEER_CORETYPE" != unset ]; then
    coretype=$PEER_CORETYPE
  fi
fi
peer_args+=(--openblas-coretype "$coretype")

# ---- the cases -------------------------------------------------------------------------------------------------
run_case() {  # threads, args...
  local t=$1; shift
  local o
  if o=$("$LIMOE" bench "$@" --threads "$t" --precision "$PREC" 2>"$OUT/err"); then echo "$o" >> "$RAW"
  else echo "{\"workload\": \"error\", \"impl\": \"limoe\", \"args\": \"$* --threads $t\", \"error\": \"$(tr -d '"\n' < "$OUT/err")\"}" >> "$RAW"; fi
  if o=$("$PEER_PY" "$PEER" "${peer_args[@]}" "$@" --threads "$t" --precision "$PREC" 2>"$OUT/err"); then echo "$o" >> "$RAW"
  else echo "{\"workload\": \"error\", \"impl\": \"torch\", \"args\": \"$* --threads $t\", \"error\": \"$(tr -d '"\n' < "$OUT/err")\"}" >> "$RAW"; fi
  echo "run_compare: done $* --threads $t --precision $PREC ($(date +%T))" >&2
}

peak_case() {  # threads: the machine's ceiling at $PREC (limoe only: core/peak.hpp; the peer has no such loop)
  local o
  if o=$("$LIMOE" bench --workload peak --threads "$1" --precision "$PREC" --repeats "$PEAK_REPEATS" 2>"$OUT/err"); then
    echo "$o" >> "$RAW"
  elif grep -q "unit to measure" "$OUT/err"; then
    echo "run_compare: no $PREC peak on this processor ($(cat "$OUT/err"))" >&2  # not a failure: nothing to measure
  else
    echo "{\"workload\": \"error\", \"impl\": \"limoe\", \"args\": \"--workload peak --threads $1 --precision $PREC\", \"error\": \"$(tr -d '"\n' < "$OUT/err")\"}" >> "$RAW"
  fi
}
PEAK_REPEATS=5
[ "$QUICK" = 1 ] && PEAK_REPEATS=1

# The stock install for reference: torch with the system's libblas.so.3 as it is, gemm only, 1 thread.
STOCK=$("$PEER_PY" "$PEER" --workload gemm --threads 1 $LT --repeats 3 --warmup 1 --omp-wait-policy PASSIVE 2>/dev/null \
        | "$PEER_PY" -c "import json,sys; j=json.loads(sys.stdin.read()); print(f\"{j['gflops']:.1f} GFLOP/s with {', '.join(l for l in j['peer']['libs'] if 'blas' in l)}\")" || echo "failed")
export STOCK

START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
UPTIME_START=$(uptime)
for PREC in $PRECISIONS; do
for t in $THREADS; do
  peak_case "$t"
  for d in $WIDTHS; do run_case "$t" --workload gemm --width "$d" $LT $REP; done
  [ "$CASES" = models ] || for d in $WIDTHS; do
    for bw in "" --backward; do
      run_case "$t" --workload dense_mlp --width "$d" $LT $REP $bw
      run_case "$t" --workload moe_layer --width "$d" $LT --experts 8 --top-k 1 --capacity-factor 1.0 $REP $bw
    done
  done
  for c in $CFGS; do
    run_case "$t" --workload embed --config "$c" --batch "$BATCH" ${TREP:---repeats 3 --warmup 1}
    case "$c" in
      B/32) run_case "$t" --workload train_step --config "$c" --batch "$BATCH" ${TREP:---repeats 2 --warmup 1} ;;
      *)    run_case "$t" --workload train_step --config "$c" --batch "$BATCH" ${TREP:---repeats 3 --warmup 1} ;;
    esac
  done
done
done
END=$(date -u +%Y-%m-%dT%H:%M:%SZ)
UPTIME_END=$(uptime)

# ---- the table -------------------------------------------------------------------------------------------------
MODEL=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
export RAW START END UPTIME_START UPTIME_END MODEL LIMOE coretype_note
export CORES=$(nproc) REV=$(git -C "$HERE/.." describe --always --dirty 2>/dev/null || echo unknown)
"$PEER_PY" - <<'EOF'
import json, os
rows = [json.loads(l) for l in open(os.environ["RAW"]) if l.strip()]
errors = [r for r in rows if r["workload"] == "error"]
rows = [r for r in rows if r["workload"] != "error"]
# The machine's ceiling (limoe bench --workload peak): GFLOP/s and the unit, per threads and precision.
peaks = {(r["threads"], r.get("precision", "fp32")): r for r in rows if r["workload"] == "peak"}
rows = [r for r in rows if r["workload"] != "peak"]

def key(r):
    return (r["workload"], r.get("config") or "", r["width"], bool(r["backward"]), r["threads"], r.get("precision", "fp32"))

by = {}
for r in rows:
    by[(r["impl"],) + key(r)] = r
threads = sorted({r["threads"] for r in rows})
precs = sorted({r.get("precision", "fp32") for r in rows}, key=lambda p: p != "fp32")
ceiling = {(t, pr): max([r["gflops"] for r in rows if r["workload"] == "gemm" and r["threads"] == t
                         and r.get("precision", "fp32") == pr] or [float("nan")])
           for t in threads for pr in precs}
peer = next((r["peer"] for r in rows if r["impl"] == "torch"), {})

def f(x, d=1):
    return "–" if x is None or x != x else f"{x:,.{d}f}"

print(f"### limoe vs PyTorch peer ({os.environ['START']} .. {os.environ['END']})\n")
print(f"- machine: {os.environ['MODEL']}, {os.environ['CORES']} cores; limoe {os.environ['LIMOE']} at {os.environ['REV']}")
print(f"- load: start `{os.environ['UPTIME_START'].strip()}`; end `{os.environ['UPTIME_END'].strip()}`")
print(f"- peer: torch {peer.get('torch')}, CPU capability {peer.get('cpu_capability')}, mkldnn {peer.get('mkldnn')}, "
      f"libraries {', '.join(peer.get('libs', []))}")
print(f"- peer settings (first peer row; thread variables follow N): {json.dumps(peer.get('env', {}))}; torch.set_num_threads(N), interop 1, "
      f"inference_mode for forward-only; OPENBLAS_CORETYPE trial (1-thread GFLOP/s; kept only if 2% faster than the best before it): {os.environ['coretype_note'].strip()}")
print(f"- stock peer (torch with the system libblas.so.3 as installed), torch.mm 1 thread: {os.environ['STOCK']}")
print(f"- ceiling = best gemm GFLOP/s of the run at that precision (limoe gemm, the faster of B as it lies and B packed once, and torch.mm; D = 384 and 768, T = 4096): "
      + ", ".join(f"{pr} {t} thread{'s' if t > 1 else ''}: {f(ceiling[(t, pr)])}" for pr in precs for t in threads))
if peaks:
    print("- machine peak = `limoe bench --workload peak` (independent multiply-adds from registers on the widest unit, "
          f"all threads at once; the fastest of {next(iter(peaks.values()))['repeats']}): "
          + ", ".join(f"{pr} {t} thread{'s' if t > 1 else ''}: {f(peaks[(t, pr)]['gflops_best'])} ({peaks[(t, pr)].get('kernel')})"
                      for pr in precs for t in threads if (t, pr) in peaks))
kern = next((r.get("kernel") for r in rows if r["impl"] == "limoe" and r["workload"] == "gemm" and r.get("precision") == "bf16"), None)
if kern:
    print(f"- limoe's bf16 kernel: {kern}")
print()
print("| workload | prec | config / D | pass | thr | limoe | peer | unit | limoe/peer | limoe GFLOP/s | limoe % ceil | peer GFLOP/s | peer % ceil | limoe 2T/1T | peer 2T/1T | drop limoe / peer | RSS MB limoe / peer |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
seen = []
for r in rows:
    k = key(r)
    if k in seen:
        continue
    seen.append(k)
    l, p = by.get(("limoe",) + k), by.get(("torch",) + k)
    l1 = by.get(("limoe",) + k[:4] + (1, k[5]))
    p1 = by.get(("torch",) + k[:4] + (1, k[5]))
    t, pr = k[4], k[5]
    tl = l["throughput"] if l else None
    tp = p["throughput"] if p else None
    sc_l = tl / l1["throughput"] if (l and l1 and t > 1) else None
    sc_p = tp / p1["throughput"] if (p and p1 and t > 1) else None
    what = k[1] if k[1] else f"D={k[2]}"
    pas = "fwd+bwd" if k[3] else "fwd"
    if k[0] == "gemm":
        what, pas = f"[4096,{k[2]}]x[{k[2]},{4*k[2]}]", "–"
    print(f"| {k[0]} | {pr} | {what} | {pas} | {t} | {f(tl)} | {f(tp)} | {(l or p)['unit']} | "
          f"{f(tl / tp if tl and tp else None, 2)} | {f(l['gflops'] if l else None)} | "
          f"{f(100 * l['gflops'] / ceiling[(t, pr)] if l else None, 0)} | {f(p['gflops'] if p else None)} | "
          f"{f(100 * p['gflops'] / ceiling[(t, pr)] if p else None, 0)} | {f(sc_l, 2)} | {f(sc_p, 2)} | "
          f"{f(l.get('drop_fraction') if l else None, 3)} / {f(p.get('drop_fraction') if p else None, 3)} | "
          f"{f(l['peak_rss_mb'] if l else None, 0)} / {f(p['peak_rss_mb'] if p else None, 0)} |")

print("\nMoE layer over the dense MLP of equal per-token compute (throughput ratio; drop fraction of the MoE run):\n")
print("| prec | D | pass | thr | limoe moe/dense | limoe drop | peer moe/dense | peer drop |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["workload"] != "moe_layer" or r["impl"] != "limoe":
        continue
    k = key(r)
    out = []
    for impl in ("limoe", "torch"):
        m, d = by.get((impl,) + k), by.get((impl, "dense_mlp") + k[1:])
        out += [f(m["throughput"] / d["throughput"], 3) if m and d else "–", f(m["drop_fraction"], 3) if m else "–"]
    print(f"| {k[5]} | {k[2]} | {'fwd+bwd' if k[3] else 'fwd'} | {k[4]} | " + " | ".join(out) + " |")

# ---- the targets of the performance issue ----
def get(impl, w, cfg, width=None, bw=None, t=1, pr="fp32"):
    for r in rows:
        if r["impl"] == impl and r["workload"] == w and (r.get("config") or "") == cfg and r["threads"] == t \
                and (width is None or r["width"] == width) and (bw is None or bool(r["backward"]) == bw) \
                and r.get("precision", "fp32") == pr:
            return r
    return None

def ratio(a, b):
    return a["throughput"] / b["throughput"] if a and b else None

def verdict(x, need):
    return "–" if x is None else ("holds" if x >= need else "misses")

print("\nTargets (same run, same threads):\n")
print("| target | measured | need | verdict |")
print("|---|---|---|---|")
for r in rows:
    if r["workload"] == "moe_layer" and r["impl"] == "limoe":
        pr = r.get("precision", "fp32")
        x = ratio(r, get("limoe", "dense_mlp", "", r["width"], bool(r["backward"]), r["threads"], pr))
        print(f"| MoE / dense {pr}, D={r['width']}, {'fwd+bwd' if r['backward'] else 'fwd'}, {r['threads']}T | {f(x, 3)} | >= 0.95 | {verdict(x, 0.95)} |")
# Mixed precision (issue "mixed precision on the CPU"): limoe over the peer at the same precision and threads.
for pr in precs:
    need = 1.2 if pr == "bf16" else 1.1
    for w, cfg in (("train_step", "S/32"), ("embed", "B/32")):
        for t in threads:
            x = ratio(get("limoe", w, cfg, t=t, pr=pr), get("torch", w, cfg, t=t, pr=pr))
            if x is not None:
                print(f"| {w} {cfg} {pr} limoe / peer ({'autocast' if pr == 'bf16' else 'fp32'}), {t}T | {f(x, 2)} | >= {need} | {verdict(x, need)} |")
    for t in threads:
        e = get("limoe", "embed", "B/32", t=t, pr=pr)
        if e:
            x = e["gflops"] / ceiling[(t, pr)]
            print(f"| embed B/32 {pr} limoe GFLOP/s / {pr} ceiling, {t}T | {f(x, 2)} | >= 0.90 | {verdict(x, 0.9)} |")
    # What the machine allows: each side's rate over the peak, and what the target asks of it (its ratio times
    # the peer's rate, over the peak: above 1.00 no program on this machine can meet it).
    for w, cfg in (("train_step", "S/32"), ("embed", "B/32")):
        for t in threads:
            l, p, pk = get("limoe", w, cfg, t=t, pr=pr), get("torch", w, cfg, t=t, pr=pr), peaks.get((t, pr))
            if l and p and pk and pk["gflops_best"] > 0:
                g = pk["gflops_best"]
                print(f"| {w} {cfg} {pr}, {t}T: limoe / peer / target ({need}x the peer) as a share of the machine's peak | "
                      f"{f(l['gflops'] / g, 2)} / {f(p['gflops'] / g, 2)} / {f(need * p['gflops'] / g, 2)} | reported | – |")
for cfg in sorted({r.get("config") for r in rows if r["workload"] == "train_step"}):
    for t, need in ((1, 1.3), (2, 1.5)):
        x = ratio(get("limoe", "train_step", cfg, t=t), get("torch", "train_step", cfg, t=t))
        if cfg == "S/32" or x is not None and cfg != "B/32":
            print(f"| train_step {cfg} limoe / peer, {t}T | {f(x, 2)} | >= {need} | {verdict(x, need)} |")
for cfg in sorted({r.get("config") for r in rows if r["workload"] == "embed"}):
    if cfg != "B/32" and "B/32" in {r.get("config") for r in rows}:
        continue
    x = ratio(get("limoe", "embed", cfg, t=1), get("torch", "embed", cfg, t=1))
    print(f"| embed {cfg} limoe / peer, 1T | {f(x, 2)} | >= 1.1 | {verdict(x, 1.1)} |")
    for t in threads:
        e = get("limoe", "embed", cfg, t=t)
        x = e["gflops"] / ceiling[(t, "fp32")] if e else None
        print(f"| embed {cfg} limoe GFLOP/s / ceiling, {t}T | {f(x, 2)} | >= 0.85 | {verdict(x, 0.85)} |")
if 2 in threads:
    for w in ("train_step", "embed"):
        for cfg in sorted({r.get("config") for r in rows if r["workload"] == w}):
            x = ratio(get("limoe", w, cfg, t=2), get("limoe", w, cfg, t=1))
            print(f"| {w} {cfg} limoe 2T / 1T | {f(x, 2)} | >= 1.8 | {verdict(x, 1.8)} |")
for cfg in sorted({r.get("config") for r in rows if r["workload"] == "train_step"}):
    for t in threads:
        l, p = get("limoe", "train_step", cfg, t=t), get("torch", "train_step", cfg, t=t)
        print(f"| peak RSS train_step {cfg} batch {l['batch'] if l else '?'}, {t}T (limoe / peer) | "
              f"{f(l['peak_rss_mb'] if l else None, 0)} / {f(p['peak_rss_mb'] if p else None, 0)} MB | reported | – |")

if errors:
    print("\nFailed cases:\n")
    for e in errors:
        print(f"- {e['impl']} {e['args']}: {e['error']}")
EOF
echo "run_compare: raw results in $RAW" >&2
