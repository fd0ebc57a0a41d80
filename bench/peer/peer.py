#!/usr/bin/python3
"""PyTorch peer of `limoe bench` (bench/README.md): the same workloads, shapes and semantics, the
same flags, and one JSON line with the same fields (plus a "peer" object recording the settings it ran with).

Runs with Debian's python3-torch (1.13) or PyTorch 2 from PyPI in a virtual environment (bench/README.md):
`python3 bench/peer/peer.py --workload moe_layer ...`.

--precision bf16 runs every forward under torch.autocast("cpu", dtype=torch.bfloat16) (the backward outside it,
as PyTorch recommends) and the gemm workload as torch.mm of two bfloat16 matrices: what a PyTorch user gets
for mixed precision on a CPU; fp32 (the default) runs as before.

--device cuda runs the same code on the first GPU (torch.set_default_device, a CUDA generator, autocast("cuda")
for bf16, TF32 left off as PyTorch's default for float32 products), each timed call between two
torch.cuda.synchronize(); the counterpart of `limoe bench --device cuda`.

  moe_layer   router softmax of noisy logits (noise N(0, (1/E)^2)), top-K, Batch Priority Routing (tokens by
              descending top-1 gate), capacity C = ceil(K T cf / E), per-expert index_select + Linear/GELU/Linear
              + index_add of gate * output; the auxiliary losses (importance, load, local and global entropy
              per modality, the weights of limoe's defaults) enter the backward. 3/4 image, 1/4 text tokens.
  dense_mlp   nn.Linear(D, 4D), GELU (erf), nn.Linear(4D, D).
  gemm        torch.mm of [T, D] x [D, 4D], float32.
  embed       the one-tower LIMoE model (pre-LN ViT blocks, fused qkv attention, MoE every other block, map
              heads, projections), evaluation mode (no noise, no drop), under torch.inference_mode.
  train_step  forward of B images and B texts, contrastive + auxiliary losses, backward, global-norm clipping
              and torch.optim.AdamW (weight decay on matrices only).

Best settings (recorded in "peer"): the script re-executes itself once with OMP/MKL/OPENBLAS thread counts =
--threads, glibc malloc told not to hand memory back (MALLOC_TRIM_THRESHOLD_ huge, MALLOC_MMAP_THRESHOLD_ at
its 32 MiB maximum, MALLOC_ARENA_MAX), OMP_WAIT_POLICY=PASSIVE (--omp-wait-policy), OPENBLAS_CORETYPE as
asked (default: unset, OpenBLAS detects), and
optionally a BLAS directory (--blas-dir, prepended to LD_LIBRARY_PATH, e.g. Debian's openblas-pthread) and an
allocator (--ld-preload). torch.set_num_threads(N); torch.inference_mode for forward-only workloads.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import time

PRESETS = {  # width, depth, mlp, heads, patch, experts, moe blocks (presets.hpp)
    "S/32": (384, 12, 1536, 6, 32, 8, list(range(1, 12, 2))),
    "B/32": (768, 12, 3072, 12, 32, 8, list(range(1, 12, 2))),
    "B/16": (768, 12, 3072, 12, 16, 8, list(range(12))),
    "L/16": (1024, 24, 4096, 16, 16, 8, list(range(24))),
    "H/14": (1280, 32, 5120, 16, 14, 32, list(range(9, 32, 2))),
}
WORKLOADS = ("moe_layer", "dense_mlp", "gemm", "embed", "train_step")
UNITS = {"moe_layer": "tokens/s", "dense_mlp": "tokens/s", "gemm": "GFLOP/s", "embed": "images/s",
         "train_step": "pairs/s"}
IMG, TXT = 0, 1


class BadFlag(Exception):
    pass


def model_config(name: str) -> dict:
    if name in PRESETS:
        D, depth, M, H, P, E, moe = PRESETS[name]
        return dict(image_size=(224, 224), channels=3, patch=P, width=D, depth=depth, mlp=M, heads=H, vocab=32000,
                    text_len=16, experts=E, top_k=1, moe_blocks=moe, proj=D, cf_train=1.05, cf_eval=0.0)
    small = dict(image_size=(28, 28), channels=1, vocab=512, text_len=16, top_k=1, cf_train=1.05, cf_eval=0.0)
    if name == "tiny":
        small.update(patch=7, width=32, depth=2, heads=2, mlp=64, experts=4, moe_blocks=[1], proj=32)
    elif name in ("small-28", "small-32"):
        small.update(patch=4, width=128, depth=4, heads=4, mlp=256, experts=8, moe_blocks=[1, 3], proj=128)
        if name == "small-32":
            small.update(image_size=(32, 32), channels=3)
    else:
        raise BadFlag(f'unknown preset "{name}"; known presets: ' + ", ".join(list(PRESETS) + ["tiny", "small-28", "small-32"]))
    return small


def parse(argv):
    ap = argparse.ArgumentParser(prog="peer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--width", type=int)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--capacity-factor", type=float)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the first GPU)")
    # Peer settings.
    ap.add_argument("--blas-dir", default="", help="directory prepended to LD_LIBRARY_PATH (a libblas.so.3)")
    ap.add_argument("--openblas-coretype", default="", help="OPENBLAS_CORETYPE to set (default: unset)")
    ap.add_argument("--ld-preload", default="", help="library to LD_PRELOAD (an allocator)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY (default PASSIVE: on a loaded machine spinning OpenMP threads wait a whole "
                         "scheduler tick for a descheduled partner, 30x slower small ops at 2 threads)")
    ap.add_argument("--no-reexec", action="store_true", help="keep the environment as it is")
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:  # argparse already printed one line; keep limoe's exit status for bad flags
        sys.exit(0 if e.code == 0 else 2)
    if a.precision not in ("fp32", "bf16"):
        raise BadFlag(f'--precision must be fp32 or bf16, got "{a.precision}"')
    if a.device not in ("cpu", "cuda"):
        raise BadFlag(f'--device must be cpu or cuda, got "{a.device}"')
    if a.workload not in WORKLOADS:
        raise BadFlag(f'unknown --workload "{a.workload}"; expected one of ' + ", ".join(WORKLOADS))
    for name in ("width", "tokens", "experts", "top_k", "batch", "threads", "repeats"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            raise BadFlag(f"--{name.replace('_', '-')} must be positive, got {v}")
    if a.warmup < 0:
        raise BadFlag(f"--warmup must be >= 0, got {a.warmup}")
    if a.capacity_factor is not None and not (math.isfinite(a.capacity_factor) and a.capacity_factor >= 0):
        raise BadFlag(f"--capacity-factor must be finite and >= 0, got {a.capacity_factor}")
    if a.backward and a.workload in ("gemm", "embed"):
        raise BadFlag(f"--backward applies to moe_layer and dense_mlp (train_step always runs it), not to {a.workload}")
    model = a.workload in ("embed", "train_step")
    if model or a.config:
        a.config = a.config or "S/32"
        c = model_config(a.config)
        if a.width is not None:
            c.update(width=a.width, mlp=4 * a.width, proj=a.width)
        if a.experts is not None:
            c["experts"] = a.experts
        if a.top_k is not None:
            c["top_k"] = a.top_k
        if a.capacity_factor is not None:
            c["cf_train" if a.workload == "train_step" else "cf_eval"] = a.capacity_factor
        if c["width"] % c["heads"]:
            raise BadFlag(f"config: width {c['width']} is not divisible by heads {c['heads']}")
        a.model = c
        if not model:  # layer workload with a named variant: its sizes unless given
            a.width = a.width or c["width"]
            a.experts = a.experts or c["experts"]
            a.top_k = a.top_k or c["top_k"]
    else:
        a.model = None
    a.width = a.width or 384
    a.experts = a.experts or 8
    a.top_k = a.top_k or 1
    if a.capacity_factor is None:
        a.capacity_factor = 1.0
    if a.top_k > a.experts:
        raise BadFlag(f"--top-k {a.top_k} must be at most --experts {a.experts}")
    if a.model and a.model["top_k"] > a.model["experts"]:
        raise BadFlag(f"top-k {a.model['top_k']} must be at most experts {a.model['experts']}")
    return a


def wanted_env(a) -> dict:
    n = str(a.threads)
    env = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
           "MALLOC_ARENA_MAX": "2",
           "MALLOC_TRIM_THRESHOLD_": str(1 << 40),       # never trim the heap top back to the OS
           "MALLOC_MMAP_THRESHOLD_": str(32 << 20),      # glibc's maximum: buffers up to 32 MiB reuse the heap
           "MALLOC_TOP_PAD_": str(256 << 20),
           "OPENBLAS_CORETYPE": a.openblas_coretype, "OMP_WAIT_POLICY": a.omp_wait_policy}
    if a.blas_dir:
        env["LD_LIBRARY_PATH"] = a.blas_dir + (":" + os.environ["LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH") else "")
    if a.ld_preload:
        env["LD_PRELOAD"] = a.ld_preload
    return env


def reexec_if_needed(a):
    if a.no_reexec or os.environ.get("LIMOE_PEER_REEXEC") == "1":
        return
    env = dict(os.environ)
    for k, v in wanted_env(a).items():
        if v == "":
            env.pop(k, None)
        else:
            env[k] = v
    env["LIMOE_PEER_REEXEC"] = "1"
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)


# ------------------------------------------------------------------------------------------------------------
# Analytic FLOPs, the same formulas as tools/limoe/cmd_bench.cpp
# ------------------------------------------------------------------------------------------------------------
def sequence_flops(c, L, image):
    D, M, E, K, P = c["width"], c["mlp"], c["experts"], c["top_k"], c["proj"]
    f = 2 * L * c["patch"] ** 2 * c["channels"] * D if image else 0.0
    for l in range(c["depth"]):
        f += 8 * L * D * D + 4 * L * L * D
        f += 2 * L * D * E + K * 4 * L * D * M if l in c["moe_blocks"] else 4 * L * D * M
    f += 4 * D * D + 4 * L * D * D + 4 * L * D + 4 * D * M  # map head
    return f + 2 * D * P


def main(argv):
    try:
        a = parse(argv)
    except BadFlag as e:
        print(f"peer: {e}", file=sys.stderr)
        return 2
    reexec_if_needed(a)

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(0x5EED)
    cuda = a.device == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            print("peer: --device cuda, but torch sees no GPU", file=sys.stderr)
            return 77
        torch.set_default_device("cuda")
    gen = torch.Generator(device=a.device).manual_seed(0x5EED)

    # -------------------------------------------------------------------------------------------------------
    # MoE layer
    # -------------------------------------------------------------------------------------------------------
    def capacity(S, E, K, cf):
        if cf == 0:
            return S
        raw = K * S * cf / E
        if raw < 1 - 1e-9:
            raise BadFlag(f"expert capacity K*S*cf/E = {raw} is below one token (C < 1)")
        return max(1, math.ceil(raw * (1 - 1e-9)))

    class MoE(nn.Module):
        def __init__(self, D, M, E, K):
            super().__init__()
            self.E, self.K = E, K
            self.router = nn.Parameter(torch.randn(E, D) * 0.02)
            # One nn.Linear per expert: indexing one [E, M, D] parameter per expert would make autograd build a
            # full-size zero gradient per expert (SelectBackward); separate modules are the faster torch idiom.
            self.fc1 = nn.ModuleList(nn.Linear(D, M) for _ in range(E))
            self.fc2 = nn.ModuleList(nn.Linear(M, D) for _ in range(E))
            with torch.no_grad():
                for l in list(self.fc1) + list(self.fc2):
                    l.weight.normal_(0, 1 / math.sqrt(l.weight.shape[1]))
                    l.bias.zero_()

        def forward(self, x, is_text, train, cf, want_aux):
            """x [T, D]; is_text [T] bool. Returns y [T, D], aux loss (scalar or None), accepted rows."""
            T = x.shape[0]
            E, K = self.E, self.K
            logits = F.linear(x, self.router)                                # [T, E]
            sigma = 1.0 / E
            noisy = logits + torch.randn(T, E, generator=gen) * sigma if train else logits
            gates = torch.softmax(noisy, dim=-1)                            # [T, E] combine weights
            with torch.no_grad():
                topv, topi = torch.topk(gates, K, dim=-1)                   # [T, K] best first
                C = capacity(T, E, K, cf)
                if C >= T:                                                  # no drop possible: skip the order
                    keep = torch.ones(K * T, dtype=torch.bool)
                    tok = torch.arange(T).repeat(K)
                    ch = topi.t().reshape(-1)
                else:                                                       # BPR: descending top-1 gate, stable
                    order = torch.sort(topv[:, 0], descending=True, stable=True).indices      # [T]
                    ch = topi[order].t().reshape(-1)                        # [K*T] all 1st choices, then 2nd...
                    tok = order.repeat(K)                                   # [K*T] their tokens
                    oh = F.one_hot(ch, E)                                   # [K*T, E]
                    pos = (oh.cumsum(0) * oh).sum(-1) - 1                   # [K*T] slot within the expert
                    keep = pos < C
            y = torch.zeros_like(x)
            accepted = 0
            for e in range(E):
                idx = tok[keep & (ch == e)]                                 # tokens expert e accepted
                if idx.numel() == 0:
                    continue
                accepted += idx.numel()
                h = F.gelu(self.fc1[e](x.index_select(0, idx)))             # [n, M]
                o = self.fc2[e](h)                                          # [n, D]
                y.index_add_(0, idx, (o * gates.index_select(0, idx)[:, e:e + 1]).to(y.dtype))
            aux = None
            if want_aux:  # semantics §4, the weights of limoe's AuxLossConfig defaults
                logp = torch.log_softmax(logits, dim=-1)
                G = logp.exp()                                              # [T, E] clean gates
                imp = G.sum(0)
                aux = 0.005 * imp.var(unbiased=False) / imp.mean() ** 2
                if train:
                    thr = noisy.gather(1, topi[:, K - 1:K])                 # [T, 1] K-th noisy logit
                    p = 0.5 * torch.erfc((thr - logits) / sigma / math.sqrt(2.0))
                    load = p.mean(0)
                    aux = aux + 0.005 * load.var(unbiased=False) / load.mean() ** 2
                H = -(G * logp).sum(-1)                                     # [T]
                for m, tau in ((is_text.logical_not(), math.log(4.0)), (is_text, math.log(2.0))):
                    if bool(m.any()):
                        aux = aux + 0.01 * H[m].mean()
                        pbar = G[m].mean(0)
                        aux = aux + 0.01 * torch.clamp(tau + (pbar * torch.log(pbar)).sum(), min=0.0)
            return y, aux, accepted

    class Mlp(nn.Module):
        def __init__(self, D, M):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(D, M), nn.Linear(M, D)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    # -------------------------------------------------------------------------------------------------------
    # The one-tower model
    # -------------------------------------------------------------------------------------------------------
    class Attention(nn.Module):  # fused q/k/v projection, as timm's ViT
        def __init__(self, D, H):
            super().__init__()
            self.H = H
            self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

        def forward(self, x):  # [B, L, D]
            B, L, D = x.shape
            q, k, v = self.qkv(x).view(B, L, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)   # [B, H, L, Dh]
            a = torch.softmax((q @ k.transpose(-1, -2)) * (D // self.H) ** -0.5, dim=-1)     # [B, H, L, L]
            return self.o((a @ v).transpose(1, 2).reshape(B, L, D))

    class MapHead(nn.Module):
        def __init__(self, D, H, M):
            super().__init__()
            self.H = H
            self.probe = nn.Parameter(torch.randn(1, 1, D) * 0.02)
            self.q, self.kv, self.o = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D)
            self.ln = nn.LayerNorm(D, eps=1e-6)
            self.mlp = Mlp(D, M)

        def forward(self, x):  # [B, L, D] -> [B, D]
            B, L, D = x.shape
            Dh = D // self.H
            q = self.q(self.probe).view(1, self.H, 1, Dh).expand(B, -1, -1, -1)           # [B, H, 1, Dh]
            k, v = self.kv(x).view(B, L, 2, self.H, Dh).permute(2, 0, 3, 1, 4)           # [B, H, L, Dh]
            a = torch.softmax((q @ k.transpose(-1, -2)) * Dh ** -0.5, dim=-1)            # [B, H, 1, L]
            u = self.o((a @ v).reshape(B, D))                                            # [B, D]
            return u + self.mlp(self.ln(u))

    class Block(nn.Module):
        def __init__(self, c, moe):
            super().__init__()
            D, M = c["width"], c["mlp"]
            self.ln1, self.ln2 = nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D, eps=1e-6)
            self.attn = Attention(D, c["heads"])
            self.moe = MoE(D, M, c["experts"], c["top_k"]) if moe else None
            self.mlp = None if moe else Mlp(D, M)

        def forward(self, xs, is_text, train, cf, stats):
            xs = [x + self.attn(self.ln1(x)) for x in xs]           # attention per modality
            if self.moe is None:
                return [x + self.mlp(self.ln2(x)) for x in xs]
            # One routing group over all tokens of the call: all image tokens, then all text tokens.
            shapes = [x.shape for x in xs]
            flat = torch.cat([self.ln2(x).reshape(-1, x.shape[-1]) for x in xs], 0)   # [R, D]
            y, aux, acc = self.moe(flat, is_text, train, cf, want_aux=train)
            stats["accepted"] += acc
            stats["nominal"] += flat.shape[0] * self.moe.K
            if aux is not None:
                stats["aux"] = stats["aux"] + aux
            out, r = [], 0
            for x, s in zip(xs, shapes):
                n = s[0] * s[1]
                out.append(x + y[r:r + n].view(s))
                r += n
            return out

    class Limoe(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c
            D = c["width"]
            gh, gw = c["image_size"][0] // c["patch"], c["image_size"][1] // c["patch"]
            self.N = gh * gw
            self.patch = nn.Linear(c["patch"] ** 2 * c["channels"], D)
            self.img_pos = nn.Parameter(torch.randn(self.N, D) * 0.02)
            self.txt_embed = nn.Embedding(c["vocab"], D)
            self.txt_pos = nn.Parameter(torch.randn(c["text_len"], D) * 0.02)
            self.blocks = nn.ModuleList([Block(c, l in c["moe_blocks"]) for l in range(c["depth"])])
            self.norm = nn.LayerNorm(D, eps=1e-6)
            self.img_head, self.txt_head = MapHead(D, c["heads"], c["mlp"]), MapHead(D, c["heads"], c["mlp"])
            self.img_proj = nn.Linear(D, c["proj"], bias=False)
            self.txt_proj = nn.Linear(D, c["proj"], bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            with torch.no_grad():
                nn.init.normal_(self.txt_embed.weight, std=0.02)
                for name, p in self.named_parameters():
                    if p.dim() >= 2 and "embed" not in name and "router" not in name and "pos" not in name \
                            and "probe" not in name:
                        p.normal_(0, 1 / math.sqrt(p.shape[-1]))
                    elif name.endswith("bias"):
                        p.zero_()

        def forward(self, images, texts, train, cf):
            c, xs = self.c, []
            if images is not None:
                B, P = images.shape[0], c["patch"]
                gh, gw = c["image_size"][0] // P, c["image_size"][1] // P
                p = images.reshape(B, gh, P, gw, P, c["channels"]).permute(0, 1, 3, 2, 4, 5).reshape(B, self.N, -1)
                xs.append(self.patch(p) + self.img_pos)                   # [B, N, D]
            if texts is not None:
                xs.append(self.txt_embed(texts) + self.txt_pos)           # [B, T, D]
            text_flags = ([False] if images is not None else []) + ([True] if texts is not None else [])
            is_text = torch.cat([torch.full((x.shape[0] * x.shape[1],), f, dtype=torch.bool)
                                 for x, f in zip(xs, text_flags)])                          # [R]
            stats = {"accepted": 0, "nominal": 0, "aux": 0.0}
            for blk in self.blocks:
                xs = blk(xs, is_text, train, cf, stats)
            out = []
            heads = ([(self.img_head, self.img_proj)] if images is not None else []) + \
                    ([(self.txt_head, self.txt_proj)] if texts is not None else [])
            for x, (head, proj) in zip(xs, heads):
                out.append(F.normalize(proj(head(self.norm(x))), dim=-1))
            return out, stats

    def contrastive(zi, zt, theta):
        logits = torch.clamp(theta.exp(), max=100.0) * zi @ zt.t()          # [B, B]
        lab = torch.arange(zi.shape[0], device=zi.device)
        return 0.5 * (F.cross_entropy(logits, lab) + F.cross_entropy(logits.t(), lab))

    # -------------------------------------------------------------------------------------------------------
    # Timing
    # -------------------------------------------------------------------------------------------------------
    def time_it(fn):
        for i in range(a.warmup):
            fn(i)
        times = []
        for r in range(a.repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(a.warmup + r)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    extra = {}
    bf16 = a.precision == "bf16"

    def amp():
        return torch.autocast(a.device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    W = a.workload
    T, D, E, K = a.tokens, a.width, a.experts, a.top_k
    if W == "gemm":
        dt = torch.bfloat16 if bf16 else torch.float32
        A = torch.randn(T, D).to(dt)
        Bm = (torch.randn(D, 4 * D) / math.sqrt(D)).to(dt)
        Cm = torch.empty(T, 4 * D, dtype=dt)
        with torch.inference_mode():
            times = time_it(lambda i: torch.mm(A, Bm, out=Cm))
        gflop = 2.0 * T * D * 4 * D / 1e9
        extra["shape"] = [T, D, 4 * D]
        units = None
    elif W == "dense_mlp":
        mlp = Mlp(D, 4 * D)
        nn.init.zeros_(mlp.fc1.bias)
        nn.init.zeros_(mlp.fc2.bias)
        x = torch.randn(T, D)
        dy = torch.randn(T, D) / math.sqrt(T)
        if a.backward:
            x.requires_grad_(True)

            def step(i):
                for p in mlp.parameters():
                    p.grad = None
                x.grad = None
                with amp():
                    y = mlp(x)
                y.backward(dy.to(y.dtype))
            times = time_it(step)
        else:
            with torch.inference_mode(), amp():
                times = time_it(lambda i: mlp(x))
        gflop = (3.0 if a.backward else 1.0) * 4.0 * T * D * 4 * D / 1e9
        extra["mlp_dim"] = 4 * D
        units = T
    elif W == "moe_layer":
        M = 4 * D
        moe = MoE(D, M, E, K)
        x = torch.randn(T, D)
        dy = torch.randn(T, D) / math.sqrt(T)
        is_text = torch.zeros(T, dtype=torch.bool)
        is_text[T * 3 // 4:] = True
        acc = []
        C = capacity(T, E, K, a.capacity_factor)
        if a.backward:
            x.requires_grad_(True)

            def step(i):
                for p in moe.parameters():
                    p.grad = None
                x.grad = None
                with amp():
                    y, aux, n = moe(x, is_text, True, a.capacity_factor, want_aux=True)
                torch.autograd.backward([y, aux], [dy.to(y.dtype), torch.ones((), dtype=aux.dtype)])
                acc.append(n)
            times = time_it(step)
        else:
            def step(i):
                acc.append(moe(x, is_text, True, a.capacity_factor, want_aux=True)[2])
            with torch.inference_mode(), amp():
                times = time_it(step)
        npass = 3.0 if a.backward else 1.0
        mean_acc = sum(acc) / len(acc)
        gflop = npass * (2.0 * T * D * E + 4.0 * K * T * D * M) / 1e9
        extra.update(gflop_accepted=npass * (2.0 * T * D * E + 4.0 * mean_acc * D * M) / 1e9,
                     flop_basis="K*tokens", drop_fraction=1.0 - mean_acc / (K * T), accepted=mean_acc,
                     capacity=C, mlp_dim=M)
        units = T
    else:
        c = a.model
        model = Limoe(c)
        B = a.batch
        images = torch.rand(B, c["image_size"][0], c["image_size"][1], c["channels"], generator=gen) * 2 - 1
        texts = torch.randint(1, c["vocab"], (B, c["text_len"]), generator=gen)
        N = model.N
        last = {}
        if W == "embed":
            model.eval()

            def step(i):
                _, st = model(images, None, False, c["cf_eval"])
                last.update(st)
            with torch.inference_mode(), amp():
                times = time_it(step)
            fwd = B * sequence_flops(c, N, True)
            npass, cf, tokens = 1.0, c["cf_eval"], B * N
        else:
            decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n and "pos" not in n]
            ids = {id(p) for p in decay}
            rest = [p for p in model.parameters() if id(p) not in ids]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=True)
            model.train()

            def step(i):
                for g in opt.param_groups:  # limoe bench's schedule: linear warmup over 10 steps to 1e-3
                    g["lr"] = 1e-3 * min(1.0, (i + 1) / 10)
                opt.zero_grad(set_to_none=True)
                with amp():
                    (zi, zt), st = model(images, texts, True, c["cf_train"])
                    loss = contrastive(zi, zt, model.logit_scale) + st["aux"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                last.update(st)
            times = time_it(step)
            fwd = B * sequence_flops(c, N, True) + B * sequence_flops(c, c["text_len"], False) + 2.0 * B * B * c["proj"]
            npass, cf, tokens = 3.0, c["cf_train"], B * (N + c["text_len"])
        gflop = npass * fwd / 1e9
        dropped = last["nominal"] - last["accepted"]
        extra.update(gflop_accepted=(npass * fwd - npass * dropped * 4.0 * c["width"] * c["mlp"]) / 1e9,
                     flop_basis="K*tokens",
                     drop_fraction=dropped / last["nominal"] if last["nominal"] else 0.0,
                     mlp_dim=c["mlp"], depth=c["depth"], heads=c["heads"], patch=c["patch"], patches=N,
                     text_len=c["text_len"], moe_blocks=len(c["moe_blocks"]),
                     params_total=sum(p.numel() for p in model.parameters()))
        T, D, E, K = tokens, c["width"], c["experts"], c["top_k"]
        a.capacity_factor = cf
        units = B

    med = statistics.median(times)
    gflops = gflop / med if med > 0 else 0.0
    out = {"workload": W, "impl": "torch",
           "throughput": gflops if units is None else units / med, "unit": UNITS[W],
           "median_s": med, "min_s": min(times), "max_s": max(times), "gflop": gflop, "gflops": gflops,
           "threads": torch.get_num_threads(), "precision": a.precision, "device": a.device, "width": D, "tokens": T, "experts": E, "top_k": K,
           "capacity_factor": a.capacity_factor, "batch": a.batch, "config": a.config,
           "backward": bool(a.backward or W == "train_step"), "repeats": a.repeats, "warmup": a.warmup}
    out.update(extra)
    out["times_s"] = times
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out["peer"] = peer_info(torch)
    print(json.dumps(out), flush=True)
    return 0


def peer_info(torch):
    blas = sorted({line.split()[-1] for line in open("/proc/self/maps")
                   if any(s in line for s in ("blas", "mkl_", "libdnnl", "jemalloc", "tcmalloc", "mimalloc"))
                   and line.split()[-1].startswith("/")})
    cap = ""
    for line in torch.__config__.show().splitlines():
        if "CPU capability" in line:
            cap = line.split(":", 1)[1].strip()
    env_keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OMP_WAIT_POLICY",
                "MALLOC_ARENA_MAX",
                "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_LIBRARY_PATH", "LD_PRELOAD")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.__version__, "libs": blas, "cpu_capability": cap, "gpu": gpu,
            "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
            "num_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "env": {k: os.environ.get(k) for k in env_keys if os.environ.get(k) is not None},
            "inference_mode": "forward-only workloads"}


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BadFlag as e:
        print(f"peer: {e}", file=sys.stderr)
        sys.exit(2)
