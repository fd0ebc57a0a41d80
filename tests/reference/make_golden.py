#!/usr/bin/python3
"""Writes (and with --check, verifies) the golden files of tests/data/golden/ from the reference limoe_ref.py.

    /usr/bin/python3 tests/reference/make_golden.py            # regenerate tests/data/golden/*.safetensors
    /usr/bin/python3 tests/reference/make_golden.py --check    # recompute, compare with the files, verify the
                                                               # reference (finite differences, spec section 8)

Needs torch (1.13 tested) and numpy only: the safetensors files are written and read here with struct + json.
See README.md in this folder for the layout of every file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
from typing import Dict, List, Tuple

try:
    import numpy as np
    import torch
except ImportError:  # CTest's golden_reference_check treats exit code 77 as "skipped"
    print("skipped: torch/numpy not importable")
    sys.exit(77)

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import limoe_ref as R  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT_DIR = os.path.join(ROOT, "tests", "data", "golden")
GOLDEN_MAGIC, GOLDEN_VERSION = "limoe-golden", "2"
MARGIN = 3e-4  # minimum gap of every compared gate value, so float32 cannot flip a routing decision

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------
# safetensors, by hand (docs/cli.md)
# --------------------------------------------------------------------------------------------------------
_DT = {np.dtype("float32"): "F32", np.dtype("int32"): "I32", np.dtype("float64"): "F64"}
_NP = {"F32": np.float32, "I32": np.int32, "F64": np.float64}


def write_safetensors(path: str, tensors: List[Tuple[str, np.ndarray]], metadata: Dict[str, str]) -> None:
    header: Dict[str, object] = {"__metadata__": metadata}
    blobs, off = [], 0
    for name, a in tensors:
        a = np.array(a, order="C", copy=True)  # not ascontiguousarray: it turns a 0-d scalar into shape [1]
        assert a.dtype in (np.float32, np.int32), (name, a.dtype)
        b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _DT[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((-len(h)) % 8)  # pad with spaces so the data starts 8-aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, d in header.items():
        b, e = d["data_offsets"]
        out[name] = np.frombuffer(data[base + b:base + e], dtype=np.dtype(_NP[d["dtype"]]).newbyteorder("<")
                                  ).reshape(d["shape"]).copy()
    return out, meta


# --------------------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------------------
def _cfg(**kw) -> R.Config:
    router = R.RouterConfig(**kw.pop("router"))
    c = R.Config(router=router, **kw)
    c.validate()
    return c


CASES = {
    # Top-1, MAP pooling on both sides, text_mask on, capacity factor 1 in training AND evaluation so tokens
    # are dropped in both, BPR, one group per call.
    "tiny_map": dict(
        cfg=_cfg(image_size=(8, 8), channels=1, patch=4, width=16, depth=2, heads=2, mlp_dim=32, vocab_size=20,
                 text_len=5, experts=4, top_k=1, moe_blocks=[1], pool_img="map", pool_txt="map", proj_dim=12,
                 ln_eps=1e-6, gelu="erf", text_mask=True, pad_id=0,
                 router=dict(noise_std=1.0, capacity_factor_train=1.0, capacity_factor_eval=1.0,
                             capacity_multiple_of=1, bpr=True, group_size=0)),
        batch=3, seed=1000, router_std=1.0, need_eval_drop=True, need_train_drop=True, need_glob_img=True,
        need_glob_txt=True),
    # Top-2, every block MoE, gap/last pooling, groups of 8: 3*4 image + 3*6 text tokens = 30 in training ->
    # groups [8 img] [4 img + 4 txt] [8 txt] [6 txt] (mixed group, and a shorter final group); no drops in eval.
    "tiny_k2": dict(
        cfg=_cfg(image_size=(8, 8), channels=3, patch=4, width=16, depth=2, heads=4, mlp_dim=24, vocab_size=20,
                 text_len=6, experts=4, top_k=2, moe_blocks=[0, 1], pool_img="gap", pool_txt="last", proj_dim=16,
                 ln_eps=1e-6, gelu="erf", text_mask=False, pad_id=0,
                 router=dict(noise_std=1.0, capacity_factor_train=1.0, capacity_factor_eval=0.0,
                             capacity_multiple_of=1, bpr=True, group_size=8)),
        batch=3, seed=2000, router_std=1.0, need_eval_drop=False, need_train_drop=True, need_glob_img=True,
        need_glob_txt=True),
    # As tiny_map but vanilla routing (group order), first/gap pooling, text_mask off.
    "tiny_vanilla": dict(
        cfg=_cfg(image_size=(8, 8), channels=1, patch=4, width=16, depth=2, heads=2, mlp_dim=32, vocab_size=20,
                 text_len=5, experts=4, top_k=1, moe_blocks=[1], pool_img="first", pool_txt="gap", proj_dim=12,
                 ln_eps=1e-6, gelu="erf", text_mask=False, pad_id=0,
                 router=dict(noise_std=1.0, capacity_factor_train=1.0, capacity_factor_eval=1.0,
                             capacity_multiple_of=1, bpr=False, group_size=0)),
        batch=3, seed=3000, router_std=1.0, need_eval_drop=True, need_train_drop=True),
    # Duplicate texts: text 3 is a copy of text 1 (and, in the training call, its noise rows are a copy of text
    # 1's), so pairs of identical tokens have exactly equal gates and BPR must break the tie by token index
    # (the lower first). The seed is chosen so that a tie decides who is dropped, in evaluation AND training.
    # Also top-2 in one group, capacity_multiple_of 2 (eval images: 2*16*0.6/4 = 4.8 -> 5 -> 6), GELU tanh,
    # map / first pooling.
    "tiny_dup": dict(
        cfg=_cfg(image_size=(8, 8), channels=1, patch=4, width=16, depth=2, heads=2, mlp_dim=32, vocab_size=20,
                 text_len=5, experts=4, top_k=2, moe_blocks=[1], pool_img="map", pool_txt="first", proj_dim=12,
                 ln_eps=1e-6, gelu="tanh", text_mask=True, pad_id=0,
                 router=dict(noise_std=1.0, capacity_factor_train=0.75, capacity_factor_eval=0.6,
                             capacity_multiple_of=2, bpr=True, group_size=0)),
        batch=4, seed=4000, router_std=1.0, need_eval_drop=True, need_train_drop=True, dup_texts=[(1, 3)],
        need_tie_eval=True, need_tie_train=True),
}
LW = R.LossWeights()


def draw(case: dict, seed: int):
    """Parameters, inputs and the training noise of one case. The noise of MoE block i is
    noise_std / E * N(0, 1) per (token of the training call, expert), rounded to float32 (the stored values
    are the exact additive noise): [B*N + B*T, E]."""
    cfg: R.Config = case["cfg"]
    rng = np.random.default_rng(seed)
    params = R.init_params(cfg, rng, case["router_std"])
    B, T = case["batch"], cfg.text_len
    H, W = cfg.image_size
    images = rng.uniform(-1.0, 1.0, (B, H, W, cfg.channels)).astype(np.float32)
    texts = np.full((B, T), cfg.pad_id, dtype=np.int32)
    for b in range(B):
        n = T if b == 0 else int(rng.integers(2, T))  # text 0 full length, the others padded at the end
        texts[b, :n] = rng.integers(1, cfg.vocab_size, n)
    for src, dst in case.get("dup_texts", []):
        texts[dst] = texts[src]
    sigma = cfg.router.noise_std / cfg.experts
    n_img = B * cfg.n_patches
    noise = {}
    for i in cfg.moe_blocks:
        z = (sigma * rng.normal(0.0, 1.0, (n_img + B * T, cfg.experts))).astype(np.float32)
        for src, dst in case.get("dup_texts", []):
            z[n_img + dst * T:n_img + (dst + 1) * T] = z[n_img + src * T:n_img + (src + 1) * T]
        noise[i] = z
    return params, images, texts, noise


# --------------------------------------------------------------------------------------------------------
# Computing everything a golden file holds
# --------------------------------------------------------------------------------------------------------
def noise_torch(noise, dtype=torch.float64):
    return {i: torch.tensor(z, dtype=dtype) for i, z in noise.items()}


def compute(cfg: R.Config, params, images, texts, noise, dtype=torch.float64, grads=True) -> dict:
    P = R.to_torch(params, dtype, requires_grad=grads)
    im = torch.tensor(images, dtype=dtype)
    tx = torch.tensor(texts, dtype=torch.long)
    with torch.no_grad():
        ev = R.embed(P, cfg, im, tx)
    tr = R.train_loss(P, cfg, im, tx, LW, noise_torch(noise, dtype))
    res = {"eval": ev, "train": tr}
    if grads:
        names = list(P)
        g = torch.autograd.grad(tr["total"], [P[n] for n in names], allow_unused=True)
        res["grads"] = {n: (torch.zeros_like(P[n]) if gi is None else gi) for n, gi in zip(names, g)}
    return res


def drops(route: np.ndarray, modality: np.ndarray = None) -> dict:
    """Dropped choices (and tokens with no accepted choice), overall or per modality."""
    def count(r):
        return {"choices": int((r < 0).sum()), "tokens": int((r < 0).all(axis=1).sum()), "of_tokens": len(r)}
    if modality is None:
        return count(route)
    return {n: count(route[modality == m]) for n, m in (("img", R.IMG), ("txt", R.TXT))}


def summary(cfg: R.Config, res: dict) -> dict:
    ev, tr = res["eval"], res["train"]
    s = {"eval_img": {}, "eval_txt": {}, "train": {}, "capacity": {}}
    for i in cfg.moe_blocks:
        s["eval_img"][i] = drops(ev["img_route"][i])
        s["eval_txt"][i] = drops(ev["txt_route"][i])
        mod = np.concatenate([inf["modality"] for inf in tr["infos"][i]])
        s["train"][i] = drops(tr["routes"][i], mod)
        s["capacity"][i] = {"eval_img": [g["C"] for g in ev["img_infos"][i]],
                            "eval_txt": [g["C"] for g in ev["txt_infos"][i]],
                            "train": [g["C"] for g in tr["infos"][i]],
                            "train_group_sizes": [g["S"] for g in tr["infos"][i]]}
    return s


def tie_classes(gates: np.ndarray) -> np.ndarray:
    """[S, E] -> [S]: tokens with bitwise-identical gate rows get the same class id (ids in first-seen order)."""
    keys: Dict[bytes, int] = {}
    return np.array([keys.setdefault(np.ascontiguousarray(r).tobytes(), len(keys)) for r in gates], dtype=np.int64)


def all_groups(cfg: R.Config, res: dict):
    """(call, block, group index, info) for every routing group of the three calls."""
    for call, infos in (("eval_img", res["eval"]["img_infos"]), ("eval_txt", res["eval"]["txt_infos"]),
                        ("train", res["train"]["infos"])):
        for i in cfg.moe_blocks:
            for gi, g in enumerate(infos[i]):
                yield call, i, gi, g


def ties(g: dict) -> Tuple[int, int]:
    """BPR ties that decide a drop in one group: pairs of tokens s < t with identical gates whose choice of some
    rank k was accepted for one and dropped for the other. Returns (lower index kept, higher index kept); the
    rule (stable order, ties to the lower token index) allows only the first kind."""
    cls, acc = tie_classes(g["gates"].numpy()), g["accepted"]
    right = wrong = 0
    for c in np.unique(cls):
        tok = np.nonzero(cls == c)[0]
        for a in range(len(tok)):
            for b in range(a + 1, len(tok)):
                s, t = tok[a], tok[b]
                for k in range(acc.shape[1]):
                    right += int(acc[s, k] >= 0 and acc[t, k] < 0)
                    wrong += int(acc[s, k] < 0 and acc[t, k] >= 0)
    return right, wrong


def dup_rows(case: dict, call: str) -> List[Tuple[int, int]]:
    """Row pairs (original, copy) of the duplicated texts' tokens in a call (eval_txt or train)."""
    cfg = case["cfg"]
    B, T = case["batch"], cfg.text_len
    off = B * cfg.n_patches if call == "train" else 0
    return [(off + src * T + t, off + dst * T + t) for src, dst in case.get("dup_texts", []) for t in range(T)]


def margins(cfg: R.Config, res: dict) -> Dict[str, float]:
    """Smallest gap of any compared pair of values, per kind (see MARGIN):
    rank: gate(rank j) - gate(rank j+1) for j <= K (which experts are a token's K choices, and in which order);
    bpr: gap between two tokens' top-1 gates in the same group (the BPR visiting order), among tokens whose
      gate rows differ: tokens with bitwise-identical gates (duplicated inputs, equal noise) tie exactly, and the
      tie goes to the lower token index; an exact top-1 tie between different gate rows would fail here;
    hinge: |tau - H(pbar)| of the global-entropy terms (which side of max(0, .) in training).
    All gates are the ones routing used: softmax of the NOISY logits in the training call."""
    K, E = cfg.top_k, cfg.experts
    m = {"rank": math.inf, "bpr": math.inf, "hinge": math.inf}
    for _, _, _, g in all_groups(cfg, res):
        gates = g["gates"].numpy()
        gs = np.sort(gates, axis=1)[:, ::-1]
        for j in range(min(K, E - 1)):
            m["rank"] = min(m["rank"], float((gs[:, j] - gs[:, j + 1]).min()))
        if cfg.router.bpr:
            cls = tie_classes(gates)
            first = np.unique(cls, return_index=True)[1]  # one token per class of identical rows
            if len(first) > 1:
                t = np.sort(gs[first, 0])
                m["bpr"] = min(m["bpr"], float(np.diff(t).min()))
    for i in cfg.moe_blocks:
        for g in res["train"]["infos"][i]:
            G = torch.softmax(g["logits"], -1).numpy()
            for mid, tau in ((R.IMG, LW.tau_img), (R.TXT, LW.tau_txt)):
                sel = g["modality"] == mid
                if sel.any():
                    pbar = G[sel].mean(0)
                    m["hinge"] = min(m["hinge"], abs(tau - float(-(pbar * np.log(pbar)).sum())))
    return m


def acceptable(case: dict, res: dict) -> Tuple[bool, str]:
    cfg = case["cfg"]
    m = margins(cfg, res)
    if min(m.values()) < MARGIN:
        return False, f"margins {m}"
    s = summary(cfg, res)
    ev_drop = sum(s["eval_img"][i]["choices"] + s["eval_txt"][i]["choices"] for i in cfg.moe_blocks)
    tr_drop = sum(s["train"][i][n]["choices"] for i in cfg.moe_blocks for n in ("img", "txt"))
    # Duplicated texts: their tokens' gates must be bitwise equal (an exact tie), and ties must decide drops.
    for call, i, gi, g in all_groups(cfg, res):
        gates = g["gates"].numpy()
        for a, b in dup_rows(case, call) if call != "eval_img" else []:
            if not (gates[a] == gates[b]).all():
                return False, f"duplicate tokens {a}, {b} not tied in {call} block {i}"
    for need, calls in (("need_tie_eval", ("eval_img", "eval_txt")), ("need_tie_train", ("train",))):
        if case.get(need) and sum(ties(g)[0] for c, _, _, g in all_groups(cfg, res) if c in calls) == 0:
            return False, f"no tie decides a drop ({need})"
    if case["need_eval_drop"] and ev_drop == 0:
        return False, "no drop in eval"
    if case["need_train_drop"] and tr_drop == 0:
        return False, "no drop in train"
    # Both global-entropy hinges active somewhere, so both sides of max(0, .) get a gradient.
    for n in ("img", "txt"):
        if case.get("need_glob_" + n) and not any(float(res["train"]["losses"][i]["global_entropy_" + n]) > 0
                                                  for i in cfg.moe_blocks):
            return False, f"global entropy {n} inactive"
    # Non-trivial routing: every call uses at least two experts in every MoE block.
    for i in cfg.moe_blocks:
        for r in (res["eval"]["img_route"][i], res["eval"]["txt_route"][i], res["train"]["routes"][i]):
            if len(set(r[r >= 0].tolist())) < 2:
                return False, "routing collapsed onto one expert"
    return True, f"margins {m}"


def find_seed(name: str, case: dict, tries: int = 2000) -> Tuple[int, tuple, dict]:
    for seed in range(case["seed"], case["seed"] + tries):
        params, images, texts, noise = draw(case, seed)
        res = compute(case["cfg"], params, images, texts, noise, grads=False)
        ok, why = acceptable(case, res)
        if ok:
            print(f"[{name}] seed {seed}: {why}")
            return seed, (params, images, texts, noise), res
    raise RuntimeError(f"{name}: no acceptable seed in {tries} tries")


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
def f32(t) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy() if torch.is_tensor(t) else t, dtype=np.float32)


def i32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int32)


def golden_tensors(cfg: R.Config, images, texts, noise, res: dict) -> List[Tuple[str, np.ndarray]]:
    ev, tr = res["eval"], res["train"]
    t = [("images", images), ("texts", texts)]
    for i in cfg.moe_blocks:
        t.append((f"noise.{i}", np.asarray(noise[i], dtype=np.float32)))
    t += [("img_emb", f32(ev["img_emb"])), ("txt_emb", f32(ev["txt_emb"]))]
    for i in cfg.moe_blocks:
        t.append((f"img_route.{i}", i32(ev["img_route"][i])))
        t.append((f"txt_route.{i}", i32(ev["txt_route"][i])))
    t += [("loss.total", f32(tr["total"])), ("loss.contrastive", f32(tr["contrastive"])),
          ("loss.aux", f32(tr["aux"]))]
    for i in cfg.moe_blocks:
        for k in R.LOSS_KEYS:
            t.append((f"loss.{k}.{i}", f32(tr["losses"][i][k])))
    t += [("train_img_emb", f32(tr["z_img"])), ("train_txt_emb", f32(tr["z_txt"]))]
    for i in cfg.moe_blocks:
        t.append((f"train_route.{i}", i32(tr["routes"][i])))
    for n, g in res["grads"].items():
        t.append((f"grad.{n}", f32(g)))
    return t


def ckpt_meta(cfg: R.Config) -> Dict[str, str]:
    return {"format": "limoe", "format_version": "1", "config": cfg.to_json()}


def io_meta(name: str, case: dict, seed: int, cfg: R.Config, res: dict) -> Dict[str, str]:
    return {"golden_magic": GOLDEN_MAGIC, "golden_version": GOLDEN_VERSION, "torch_version": torch.__version__,
            "loss_weights": LW.to_json(), "case": name, "seed": str(seed), "batch": str(case["batch"]),
            "router_init_std": str(case["router_std"]),
            "train_noise": "table noise.{i}: added to the clean logits of MoE block i in the training call; "
                           "N(0, (noise_std / E)^2) as float32",
            "routing_summary": json.dumps(summary(cfg, res))}


def generate() -> None:
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, case in CASES.items():
        cfg = case["cfg"]
        seed, (params, images, texts, noise), _ = find_seed(name, case)
        res = compute(cfg, params, images, texts, noise)
        write_safetensors(os.path.join(OUT_DIR, f"{name}.ckpt.safetensors"), list(params.items()), ckpt_meta(cfg))
        write_safetensors(os.path.join(OUT_DIR, f"{name}.io.safetensors"),
                          golden_tensors(cfg, images, texts, noise, res),
                          io_meta(name, case, seed, cfg, res))
        print_summary(name, cfg, res)
    total = sum(os.path.getsize(os.path.join(OUT_DIR, f)) for f in os.listdir(OUT_DIR) if f.endswith(".safetensors"))
    print(f"total size of {OUT_DIR}: {total} bytes")


def print_summary(name: str, cfg: R.Config, res: dict) -> None:
    s = summary(cfg, res)
    tr = res["train"]
    print(f"[{name}] loss.total {float(tr['total']):.8f}  contrastive {float(tr['contrastive']):.8f}  "
          f"aux {float(tr['aux']):.8f}")
    for i in cfg.moe_blocks:
        print(f"[{name}] block {i}: capacity {s['capacity'][i]}")
        print(f"[{name}] block {i}: dropped choices eval img {s['eval_img'][i]['choices']}/{s['eval_img'][i]['of_tokens'] * cfg.top_k}"
              f", eval txt {s['eval_txt'][i]['choices']}/{s['eval_txt'][i]['of_tokens'] * cfg.top_k}"
              f", train img {s['train'][i]['img']['choices']}, train txt {s['train'][i]['txt']['choices']}"
              f" (tokens with nothing accepted: eval {s['eval_img'][i]['tokens']}+{s['eval_txt'][i]['tokens']},"
              f" train {s['train'][i]['img']['tokens']}+{s['train'][i]['txt']['tokens']})")
        tie = [sum(ties(g)[0] for c, b, _, g in all_groups(cfg, res) if b == i and c.startswith(p))
               for p in ("eval", "train")]
        if any(tie):
            print(f"[{name}] block {i}: exact BPR ties between identical tokens that decide a drop: eval {tie[0]},"
                  f" train {tie[1]}")
        print(f"[{name}] block {i}: losses " + ", ".join(f"{k} {float(tr['losses'][i][k]):.6f}" for k in R.LOSS_KEYS))


# --------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------
class Checker:
    def __init__(self):
        self.failures = 0
        self.count = 0

    def __call__(self, ok: bool, what: str) -> None:
        self.count += 1
        if not ok:
            self.failures += 1
            print("FAIL:", what)


def check_spec_section8(ck: Checker) -> None:
    """semantics §8, the behaviours a test suite should pin down, on the reference's own functions."""
    cap = R.capacity
    ck(cap(16, 1, 8, 1.0, 1) == 2, "C(E8,K1,S16)=2")
    ck(cap(16, 2, 8, 1.0, 1) == 4, "C(E8,K2,S16)=4")
    ck(cap(10, 1, 4, 1.0, 1) == 3, "C(E4,K1,S10)=3")
    ck(cap(16, 1, 8, 1.0, 4) == 4, "C multiple_of 4 = 4")
    # The capacity rule as decided (config.hpp compute_capacity): the formula alone, in float, as written.
    ck(cap(4, 1, 8, 0.1, 1) == 1, "C(E8,S4,cf0.1): 0.05 -> 1 for a group of 4 (a configured group size that small is refused by limoe's ModelConfig)")
    ck(cap(4, 1, 8, 0.1, 4) == 4, "C(E8,S4,cf0.1, multiple_of 4) = 4")
    ck(cap(2, 1, 8, 1.0, 1) == 1, "a short (last) group: C = ceil(0.25) = 1, the same rule")
    ck(3 * 1.1 > 3.3 and cap(3, 1, 1, 1.1, 1) == 4, "C = ceil(3 * 1.1) = ceil(3.3000000000000003) = 4, no tolerance")
    ck(cap(10, 1, 1, 1.1, 1) == 11, "C: 10 * 1.1 rounds to exactly 11.0 in float: 11")
    ck(cap(6, 1, 4, 0.0, 4) == 6, "cf 0: C = S, no rounding to the multiple")
    ck(cap(16, 2, 4, 0.6, 2) == 6, "C(E4,K2,S16,cf0.6): 4.8 -> 5 -> multiple of 2 -> 6")
    ck(cap(7, 2, 4, 1.5, 1) == 6, "C(E4,K2,S7,cf1.5): 5.25 -> 6")
    # All choose expert 0, top-1 gates [0.3, 0.9, 0.5, 0.8], C = 2.
    ch = np.zeros((4, 1), dtype=np.int64)
    t1 = np.array([0.3, 0.9, 0.5, 0.8])
    ck(set(np.nonzero(R.assign(ch, t1, 8, 2, False)[:, 0] >= 0)[0]) == {0, 1}, "vanilla keeps {0,1}")
    ck(set(np.nonzero(R.assign(ch, t1, 8, 2, True)[:, 0] >= 0)[0]) == {1, 3}, "BPR keeps {1,3}")
    # BPR K=2, C=1, E=2: A (0.51, 0.49), B (0.95, 0.05): B kept at both experts, A dropped entirely.
    g = np.array([[0.51, 0.49], [0.95, 0.05]])
    a = R.assign(R.top_k(g, 2), g.max(1), 2, 1, True)
    ck(a[1].tolist() == [0, 1] and a[0].tolist() == [-1, -1], f"BPR K=2 example {a.tolist()}")
    # BPR kept set does not depend on the input order of tokens (distinct top-1 gates).
    rng = np.random.default_rng(0)
    for _ in range(50):
        S, E, K = 12, 4, 2
        gg = rng.dirichlet(np.ones(E), S)
        base = R.assign(R.top_k(gg, K), gg.max(1), E, 3, True)
        perm = rng.permutation(S)
        pa = R.assign(R.top_k(gg[perm], K), gg[perm].max(1), E, 3, True)
        ck((pa == base[perm]).all(), "BPR order invariance")
        for acc in (base, R.assign(R.top_k(gg, K), gg.max(1), E, 3, False)):
            ck(all((acc == e).sum() <= 3 for e in range(E)), "no expert above C")
    # Uniform gates: importance 0, local entropy log E; one-hot: importance E-1, local 0, global term = tau.
    E = 8
    logits = torch.zeros(16, E, dtype=torch.float64)
    G = torch.softmax(logits, -1)
    imp = G.sum(0)
    ck(abs(float(imp.var(unbiased=False) / imp.mean() ** 2)) < 1e-15, "uniform importance 0")
    ck(abs(float(R.entropy(torch.log_softmax(logits, -1)).mean()) - 2.0794415416798357) < 1e-12, "uniform H = log 8")
    oh = torch.zeros(16, E, dtype=torch.float64)
    oh[:, 0] = 1
    imp = oh.sum(0)
    ck(abs(float(imp.var(unbiased=False) / imp.mean() ** 2) - (E - 1)) < 1e-12, "one-hot importance E-1")
    # Contrastive with t = 1 and orthonormal equal pairs: log(n - 1 + e) - 1; symmetric.
    z = torch.eye(4, dtype=torch.float64)
    L = R.contrastive_loss(z, z, torch.tensor(0.0, dtype=torch.float64))
    ck(abs(float(L) - (math.log(3 + math.e) - 1)) < 1e-12 and abs(float(L) - 0.7437) < 1e-4, f"contrastive {float(L)}")
    za, zb = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    th = torch.tensor(0.7, dtype=torch.float64)
    ck(abs(float(R.contrastive_loss(za, zb, th) - R.contrastive_loss(zb, za, th))) < 1e-12, "contrastive symmetric")


def check_ops(ck: Checker) -> None:
    """The hand-written ops against torch's own (F.layer_norm, F.gelu, F.multi_head_attention_forward) and the
    patch layout against an explicit loop."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 12, generator=g, dtype=torch.float64)
    w, b = torch.randn(12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    ck(float((R.layer_norm(x, w, b, 1e-6) - F.layer_norm(x, (12,), w, b, 1e-6)).abs().max()) < 1e-12, "layer_norm")
    ck(float((R.gelu(x, "erf") - F.gelu(x)).abs().max()) < 1e-12, "gelu erf")
    ck(float((R.gelu(x, "tanh") - F.gelu(x, approximate="tanh")).abs().max()) < 1e-12, "gelu tanh")
    P = {f"a.{n}.{t}": torch.randn(*((12, 12) if t == "weight" else (12,)), generator=g, dtype=torch.float64)
         for n in "qkvo" for t in ("weight", "bias")}
    xq = torch.randn(3, 2, 12, generator=g, dtype=torch.float64)
    keep = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] * 2 + [False] * 5])
    mine = R.mha(P, "a", xq, x, 3, keep)
    ref, _ = F.multi_head_attention_forward(
        xq.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 12, 3, None,
        torch.cat([P["a.q.bias"], P["a.k.bias"], P["a.v.bias"]]), None, None, False, 0.0,
        P["a.o.weight"], P["a.o.bias"], training=False, key_padding_mask=~keep, need_weights=False,
        use_separate_proj_weight=True, q_proj_weight=P["a.q.weight"], k_proj_weight=P["a.k.weight"],
        v_proj_weight=P["a.v.weight"])
    ck(float((mine - ref.transpose(0, 1)).abs().max()) < 1e-12, "mha vs torch")
    cfg = R.Config(image_size=(8, 12), channels=3, patch=4)
    img = torch.randn(2, 8, 12, 3, generator=g, dtype=torch.float64)
    Pp = {"img.patch.weight": torch.eye(48, dtype=torch.float64), "img.patch.bias": torch.zeros(48, dtype=torch.float64),
          "img.pos": torch.zeros(6, 48, dtype=torch.float64)}
    pt = R.embed_images(Pp, cfg, img)  # identity projection: the flattened patches themselves
    ok = True
    for bi in range(2):
        for gy in range(2):
            for gx in range(3):
                for py in range(4):
                    for px in range(4):
                        for c in range(3):
                            ok &= bool(pt[bi, gy * 3 + gx, (py * 4 + px) * 3 + c] == img[bi, gy * 4 + py, gx * 4 + px, c])
    ck(ok, "patch layout (gy, gx) row-major, (py, px, c) flattening")


def check_moe_soft_mixture(ck: Checker) -> None:
    """With no drops the MoE is the soft top-K mixture; with K = E it is the full softmax mixture. Computed
    here by a dense, loop-free formula independent of moe_layer's gather/scatter."""
    for K in (1, 2, 4):
        cfg = R.Config(width=6, mlp_dim=5, experts=4, top_k=K, moe_blocks=[0], depth=1, heads=1,
                       router=R.RouterConfig(group_size=5, capacity_factor_eval=0.0))
        rng = np.random.default_rng(K)
        P = R.to_torch({k: v for k, v in R.init_params(cfg, rng).items() if ".moe." in k})
        x = torch.tensor(rng.normal(size=(13, 6)))
        y, route, _, _ = R.moe_layer(P, "blocks.0.moe", cfg, x, np.zeros(13, dtype=np.int64), 0.0, LW)
        W1, b1, W2, b2 = (P["blocks.0.moe." + n] for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
        gates = torch.softmax(x @ P["blocks.0.moe.router.weight"].T, -1)              # [S, E]
        h = R.gelu(torch.einsum("emd,sd->sem", W1, x) + b1, "erf")                      # [S, E, M]
        ex = torch.einsum("edm,sem->sed", W2, h) + b2                                   # [S, E, D]
        thr = torch.sort(gates, -1, descending=True).values[:, K - 1:K]
        w = torch.where(gates >= thr, gates, torch.zeros_like(gates))                   # top-K gates, others 0
        ref = (w[..., None] * ex).sum(1)
        ck(float((y - ref).abs().max()) < 1e-12, f"soft top-{K} mixture")
        ck((route >= 0).all(), "no drops with cf = 0")


def check_invariants(ck: Checker, name: str, cfg: R.Config, res: dict) -> None:
    calls = {"eval_img": res["eval"]["img_infos"], "eval_txt": res["eval"]["txt_infos"],
             "train": res["train"]["infos"]}
    for call, infos in calls.items():
        for i in cfg.moe_blocks:
            for gi, g in enumerate(infos[i]):
                acc, ch = g["accepted"], g["choice"]
                ck(all((acc == e).sum() <= g["C"] for e in range(cfg.experts)), f"{name} {call} {i}.{gi}: > C")
                ck(((acc == ch) | (acc == -1)).all(), f"{name} {call} {i}.{gi}: accepted is not the choice")
                # Drops happen only at full experts.
                for e in range(cfg.experts):
                    if ((ch == e) & (acc == -1)).any():
                        ck((acc == e).sum() == g["C"], f"{name} {call} {i}.{gi}: dropped at a non-full expert")
                cf = cfg.router.capacity_factor_train if call == "train" else cfg.router.capacity_factor_eval
                want = g["S"] if cf == 0 else math.ceil(cfg.top_k * g["S"] * cf / cfg.experts)
                want = -(-want // cfg.router.capacity_multiple_of) * cfg.router.capacity_multiple_of if cf else want
                ck(g["C"] == want, f"{name} {call} {i}.{gi}: capacity {g['C']} != {want}")
                # Ties between identical tokens go to the lower token index (BPR: a stable order).
                if cfg.router.bpr:
                    ck(ties(g)[1] == 0, f"{name} {call} {i}.{gi}: a tie went to the higher token index")


def check_load_loss(ck: Checker, name: str, cfg: R.Config, res: dict, noise) -> None:
    """The load loss of every training group against a plain-float loop (math.erfc), and its gradient with
    respect to the clean logits (through p and through the threshold) against central differences."""
    K, E = cfg.top_k, cfg.experts
    sigma = cfg.router.noise_std / E
    for i in cfg.moe_blocks:
        row0, vals = 0, []
        for g in res["train"]["infos"][i]:
            lg = g["logits"].numpy()
            nz = noise[i][row0:row0 + g["S"]].astype(np.float64)
            row0 += g["S"]

            def load_of(lgt):
                noisy = lgt + nz
                load = [0.0] * E
                for s_ in range(len(lgt)):
                    thr = sorted(noisy[s_], reverse=True)[K - 1]
                    for e in range(E):
                        load[e] += 0.5 * math.erfc((thr - lgt[s_, e]) / sigma / math.sqrt(2.0)) / len(lgt)
                mu = sum(load) / E
                return sum((v - mu) ** 2 for v in load) / E / mu ** 2
            vals.append(load_of(lg))
            ck(abs(vals[-1] - g["losses"]["load"]) < 1e-12, f"{name}: load loss of block {i} vs a plain loop")
            lt = torch.tensor(lg, requires_grad=True)
            noisy = lt + torch.tensor(nz)
            thr = noisy[torch.arange(len(lg)), torch.as_tensor(g["choice"][:, K - 1], dtype=torch.long)]
            p = 0.5 * torch.erfc((thr[:, None] - lt) / (sigma * math.sqrt(2.0)))
            L = p.mean(0).var(unbiased=False) / p.mean(0).mean() ** 2
            (ag,) = torch.autograd.grad(L, [lt])
            worst, h = 0.0, 1e-6
            for s_ in range(len(lg)):
                for e in range(E):
                    a, b = lg.copy(), lg.copy()
                    a[s_, e] += h
                    b[s_, e] -= h
                    fd = (load_of(a) - load_of(b)) / (2 * h)
                    worst = max(worst, abs(fd - float(ag[s_, e])) / (1e-5 * (abs(fd) + abs(float(ag[s_, e]))) + 1e-8))
            ck(worst <= 1.0, f"{name}: load loss gradient of block {i}: {worst}")
        mean = sum(vals) / len(vals)
        ck(abs(mean - float(res["train"]["losses"][i]["load"])) < 1e-12, f"{name}: load loss averaged over groups")


def check_finite_differences(ck: Checker, name: str, cfg: R.Config, params, images, texts, noise, res: dict,
                             per_tensor: int = 2) -> None:
    """Autograd gradients of loss.total against central differences in float64, on every parameter tensor:
    `per_tensor` random entries plus the entry with the largest gradient; routing must not change."""
    rng = np.random.default_rng(123)
    im = torch.tensor(images, dtype=torch.float64)
    tx = torch.tensor(texts, dtype=torch.long)
    base_routes = res["train"]["routes"]
    h = 1e-6
    worst, n_fd = 0.0, 0
    for pname, g in res["grads"].items():
        g = g.numpy()
        idx = [tuple(rng.integers(0, s) for s in g.shape) for _ in range(per_tensor)]
        idx.append(np.unravel_index(int(np.abs(g).argmax()), g.shape) if g.ndim else ())
        for ix in idx:
            vals = []
            for sgn in (1, -1):
                P = R.to_torch(params)
                with torch.no_grad():
                    P[pname][ix] += sgn * h
                    out = R.train_loss(P, cfg, im, tx, LW, noise_torch(noise))
                vals.append(float(out["total"]))
                ck(all((out["routes"][i] == base_routes[i]).all() for i in cfg.moe_blocks),
                   f"{name}: routing changed under a perturbation of {pname}{ix}")
            fd = (vals[0] - vals[1]) / (2 * h)
            ag = float(g[ix])
            # Round-off of the difference quotient is about 1e-16 * |loss| / h = 1e-10: hence the absolute floor.
            err = abs(fd - ag) / (1e-5 * (abs(fd) + abs(ag)) + 1e-8)
            worst = max(worst, err)
            ck(err <= 1.0, f"{name}: grad {pname}{ix} autograd {ag:.10g} fd {fd:.10g}")
            n_fd += 1
    print(f"[{name}] finite differences on {n_fd} entries: worst |fd - autograd| / (1e-5 (|fd| + |autograd|) + 1e-8)"
          f" = {worst:.3f} (passes <= 1)")


def check_float32(ck: Checker, name: str, cfg: R.Config, params, images, texts, noise, res: dict) -> None:
    """The same computation in float32 takes the same routing decisions and stays within float tolerance:
    what the C++ float path will meet."""
    r32 = compute(cfg, params, images, texts, noise, dtype=torch.float32)
    for i in cfg.moe_blocks:
        ck((r32["eval"]["img_route"][i] == res["eval"]["img_route"][i]).all(), f"{name}: f32 eval img route {i}")
        ck((r32["eval"]["txt_route"][i] == res["eval"]["txt_route"][i]).all(), f"{name}: f32 eval txt route {i}")
        ck((r32["train"]["routes"][i] == res["train"]["routes"][i]).all(), f"{name}: f32 train route {i}")
    e = max(float((r32["eval"][k].double() - res["eval"][k]).abs().max()) for k in ("img_emb", "txt_emb"))
    l = max([abs(float(r32["train"]["total"]) - float(res["train"]["total"]))]
            + [abs(float(r32["train"]["losses"][i][k]) - float(res["train"]["losses"][i][k]))
               for i in cfg.moe_blocks for k in R.LOSS_KEYS])
    gr = max(float((r32["grads"][n].double() - g).abs().max() / (g.abs().max() + 1e-3)) for n, g in res["grads"].items())
    print(f"[{name}] float32 vs float64: emb {e:.2e}, loss {l:.2e}, grad (rel. to tensor max) {gr:.2e}")
    ck(e < 1e-5 and l < 1e-5 and gr < 1e-4, f"{name}: float32 deviates")


def check_files(ck: Checker, name: str, cfg: R.Config, seed: int, params, images, texts, noise, res: dict) -> None:
    cp = os.path.join(OUT_DIR, f"{name}.ckpt.safetensors")
    ip = os.path.join(OUT_DIR, f"{name}.io.safetensors")
    if not (os.path.exists(cp) and os.path.exists(ip)):
        ck(False, f"{name}: golden files missing (run without --check first)")
        return
    ct, cm = read_safetensors(cp)
    it, im = read_safetensors(ip)
    ck(cm == ckpt_meta(cfg), f"{name}: checkpoint metadata")
    ck(R.Config.from_json_obj(json.loads(cm["config"])) == cfg, f"{name}: config round trip")
    ck(list(ct) == list(R.param_shapes(cfg)), f"{name}: checkpoint tensor names/order")
    for n, a in params.items():
        ck(ct[n].dtype == np.float32 and ct[n].shape == a.shape and (ct[n] == a).all(), f"{name}: param {n}")
    ck(im.get("golden_magic") == GOLDEN_MAGIC and im.get("golden_version") == GOLDEN_VERSION
       and im.get("seed") == str(seed), f"{name}: io metadata")
    want = golden_tensors(cfg, images, texts, noise, res)
    ck(list(it) == [n for n, _ in want], f"{name}: io tensor names/order")
    for n, a in want:
        b = it.get(n)
        if b is None or b.dtype != a.dtype or b.shape != a.shape:
            ck(False, f"{name}: io tensor {n} missing or misshaped")
            continue
        if a.dtype == np.int32:
            ck((a == b).all(), f"{name}: {n} differs")
        else:
            ck(np.allclose(a, b, rtol=1e-6, atol=1e-7), f"{name}: {n} differs by {np.abs(a - b).max():.3g}")


def check() -> int:
    ck = Checker()
    check_spec_section8(ck)
    check_ops(ck)
    check_moe_soft_mixture(ck)
    for name, case in CASES.items():
        cfg = case["cfg"]
        seed, (params, images, texts, noise), _ = find_seed(name, case)
        res = compute(cfg, params, images, texts, noise)
        print_summary(name, cfg, res)
        check_invariants(ck, name, cfg, res)
        check_load_loss(ck, name, cfg, res, noise)
        check_float32(ck, name, cfg, params, images, texts, noise, res)
        check_finite_differences(ck, name, cfg, params, images, texts, noise, res)
        check_files(ck, name, cfg, seed, params, images, texts, noise, res)
    print(f"{ck.count - ck.failures}/{ck.count} checks passed")
    return 1 if ck.failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="recompute and verify instead of writing")
    a = ap.parse_args()
    if a.check:
        return check()
    generate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
