"""Independent PyTorch reference of LIMoE (the model of docs/semantics.md, names of docs/cli.md).

Written from the spec alone, top to bottom, to produce the golden files the C++ tests compare against
(make_golden.py). It favours plain, checkable code over speed: every op is spelled out (LayerNorm, GELU,
attention, softmax entropies), routing decisions are made in numpy on detached values, and the MoE output
is built with differentiable gathers/scatters so autograd gives the gradients through the gates.

Conventions (semantics §1, 3, 4; docs/cli.md):
  * parameters: dict name -> torch tensor, names and shapes of docs/cli.md; Linear weight is [out, in],
    y = x W^T + b.
  * image [H, W, C] -> patches in row-major (gy, gx) order, each flattened in (py, px, c) order.
  * pre-LN blocks; attention heads use rows h*D/NH .. (h+1)*D/NH of q, k, v.
  * MoE: tokens of one call concatenated (all image tokens image by image, then all text tokens), split into
    groups of group_size (0 = one group; a final shorter group is routed on its own, with its own capacity).
  * routing decisions (top-K, BPR order, capacity) are discrete: computed on detached values; gradients flow
    through the gate values used as combine weights and through the auxiliary losses.
  * noise: an explicit argument (per MoE block, [tokens of the call, E], added to the clean logits), drawn
    by the caller: the golden files store it, so the C++ test can inject the very same values.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, asdict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

IMG, TXT = 0, 1  # modality ids of tokens in a routing group


# --------------------------------------------------------------------------------------------------------
# Configuration (docs/cli.md, the "config" JSON object)
# --------------------------------------------------------------------------------------------------------
@dataclass
class RouterConfig:
    noise_std: float = 1.0
    capacity_factor_train: float = 1.05
    capacity_factor_eval: float = 0.0
    capacity_multiple_of: int = 1
    bpr: bool = True
    group_size: int = 0


@dataclass
class Config:
    image_size: Tuple[int, int] = (28, 28)
    channels: int = 1
    patch: int = 4
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 512
    vocab_size: int = 1000
    text_len: int = 16
    experts: int = 8
    top_k: int = 1
    moe_blocks: List[int] = field(default_factory=lambda: [1, 3])
    pool_img: str = "map"
    pool_txt: str = "map"
    proj_dim: int = 128
    ln_eps: float = 1e-6
    gelu: str = "erf"
    text_mask: bool = False
    pad_id: int = 0
    router: RouterConfig = field(default_factory=RouterConfig)

    @property
    def grid(self) -> Tuple[int, int]:
        return self.image_size[0] // self.patch, self.image_size[1] // self.patch

    @property
    def n_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.channels

    def validate(self) -> None:
        assert self.image_size[0] % self.patch == 0 and self.image_size[1] % self.patch == 0
        assert self.width % self.heads == 0
        assert 1 <= self.top_k <= self.experts
        assert all(0 <= i < self.depth for i in self.moe_blocks)
        assert self.pool_img in ("gap", "map", "first")
        assert self.pool_txt in ("gap", "map", "first", "last")
        assert self.gelu in ("erf", "tanh")

    def to_json_obj(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["moe_blocks"] = list(self.moe_blocks)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_json_obj(), separators=(", ", ": "))

    @staticmethod
    def from_json_obj(d: dict) -> "Config":
        d = dict(d)
        r = RouterConfig(**d.pop("router"))
        d["image_size"] = tuple(d["image_size"])
        return Config(router=r, **d)


@dataclass
class LossWeights:
    """Weights of the auxiliary losses (semantics §4) and the global-entropy thresholds."""
    importance: float = 0.005
    load: float = 0.005        # needs noise (training): 0 without it
    local_entropy: float = 0.01
    global_entropy: float = 0.01
    z: float = 0.001
    tau_img: float = math.log(4.0)
    tau_txt: float = math.log(2.0)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# --------------------------------------------------------------------------------------------------------
# Parameters: names and shapes (docs/cli.md), in the order of its table
# --------------------------------------------------------------------------------------------------------
def param_shapes(cfg: Config) -> Dict[str, Tuple[int, ...]]:
    D, M, E = cfg.width, cfg.mlp_dim, cfg.experts
    s: Dict[str, Tuple[int, ...]] = {}
    s["img.patch.weight"] = (D, cfg.patch_dim)
    s["img.patch.bias"] = (D,)
    s["img.pos"] = (cfg.n_patches, D)
    s["txt.embed"] = (cfg.vocab_size, D)
    s["txt.pos"] = (cfg.text_len, D)
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        s[p + "ln1.weight"] = (D,)
        s[p + "ln1.bias"] = (D,)
        for n in "qkvo":
            s[p + f"attn.{n}.weight"] = (D, D)
            s[p + f"attn.{n}.bias"] = (D,)
        s[p + "ln2.weight"] = (D,)
        s[p + "ln2.bias"] = (D,)
        if i in cfg.moe_blocks:
            s[p + "moe.router.weight"] = (E, D)
            s[p + "moe.fc1.weight"] = (E, M, D)
            s[p + "moe.fc1.bias"] = (E, M)
            s[p + "moe.fc2.weight"] = (E, D, M)
            s[p + "moe.fc2.bias"] = (E, D)
        else:
            s[p + "mlp.fc1.weight"] = (M, D)
            s[p + "mlp.fc1.bias"] = (M,)
            s[p + "mlp.fc2.weight"] = (D, M)
            s[p + "mlp.fc2.bias"] = (D,)
    s["norm.weight"] = (D,)
    s["norm.bias"] = (D,)
    for m, pool in (("img", cfg.pool_img), ("txt", cfg.pool_txt)):
        if pool == "map":
            s[f"{m}.head.probe"] = (D,)
            for n in "qkvo":
                s[f"{m}.head.attn.{n}.weight"] = (D, D)
                s[f"{m}.head.attn.{n}.bias"] = (D,)
            s[f"{m}.head.ln.weight"] = (D,)
            s[f"{m}.head.ln.bias"] = (D,)
            s[f"{m}.head.mlp.fc1.weight"] = (M, D)
            s[f"{m}.head.mlp.fc1.bias"] = (M,)
            s[f"{m}.head.mlp.fc2.weight"] = (D, M)
            s[f"{m}.head.mlp.fc2.bias"] = (D,)
    for m in ("img", "txt"):
        s[f"{m}.proj.weight"] = (cfg.proj_dim, D)
    s["logit_scale"] = ()
    return s


def init_params(cfg: Config, rng: np.random.Generator, router_std: float = 1.0) -> Dict[str, np.ndarray]:
    """Float32 parameters with non-trivial values everywhere (biases and LN affine included, so that every
    gradient is exercised). Router std is a knob: large enough that gates are decisive."""
    out: Dict[str, np.ndarray] = {}
    for name, shape in param_shapes(cfg).items():
        leaf = name.split(".")[-1]
        if name == "logit_scale":
            a = np.array(math.log(10.0))
        elif name.endswith("router.weight"):
            a = rng.normal(0.0, router_std, shape)
        elif ".ln" in name or name.startswith("norm.") or ".head.ln" in name:
            a = (1.0 if leaf == "weight" else 0.0) + rng.normal(0.0, 0.1, shape)
        elif leaf == "bias":
            a = rng.normal(0.0, 0.1, shape)
        elif name in ("img.pos", "txt.pos"):
            a = rng.normal(0.0, 0.5, shape)
        elif name in ("txt.embed", ) or leaf == "probe":
            a = rng.normal(0.0, 1.0, shape)
        else:  # weight matrices [.., out, in]: fan-in scaling
            a = rng.normal(0.0, 1.0 / math.sqrt(shape[-1]), shape)
        out[name] = np.asarray(a, dtype=np.float32)
    return out


def to_torch(params: Dict[str, np.ndarray], dtype=torch.float64, requires_grad=False) -> Dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=dtype, requires_grad=requires_grad) for k, v in params.items()}


# --------------------------------------------------------------------------------------------------------
# Elementary ops, written out
# --------------------------------------------------------------------------------------------------------
def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    y = x @ w.transpose(-1, -2)  # [.., out]
    return y if b is None else y + b


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # population variance
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "erf":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy of distributions given by their log-probabilities, over the last axis."""
    return -(logp.exp() * logp).sum(-1)


def mha(P, prefix: str, xq: torch.Tensor, xkv: torch.Tensor, heads: int,
        key_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head attention. xq [B, Lq, D], xkv [B, Lk, D]; key_keep [B, Lk] bool (False = masked key)."""
    B, Lq, D = xq.shape
    Lk = xkv.shape[1]
    dh = D // heads
    q = linear(xq, P[prefix + ".q.weight"], P[prefix + ".q.bias"]).view(B, Lq, heads, dh).transpose(1, 2)
    k = linear(xkv, P[prefix + ".k.weight"], P[prefix + ".k.bias"]).view(B, Lk, heads, dh).transpose(1, 2)
    v = linear(xkv, P[prefix + ".v.weight"], P[prefix + ".v.bias"]).view(B, Lk, heads, dh).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(dh)  # [B, NH, Lq, Lk]
    if key_keep is not None:
        s = s.masked_fill(~key_keep[:, None, None, :], float("-inf"))
    a = torch.softmax(s, dim=-1)
    o = (a @ v).transpose(1, 2).reshape(B, Lq, D)  # heads concatenated in order h = 0..NH-1
    return linear(o, P[prefix + ".o.weight"], P[prefix + ".o.bias"])


def mlp(P, prefix: str, x: torch.Tensor, kind: str) -> torch.Tensor:
    h = gelu(linear(x, P[prefix + ".fc1.weight"], P[prefix + ".fc1.bias"]), kind)
    return linear(h, P[prefix + ".fc2.weight"], P[prefix + ".fc2.bias"])


# --------------------------------------------------------------------------------------------------------
# Routing (semantics §3): pure numpy, discrete
# --------------------------------------------------------------------------------------------------------
def capacity(S: int, K: int, E: int, cf: float, multiple_of: int) -> int:
    """C = S if cf == 0 (no dropping); else C = ceil(K*S*cf/E), evaluated in float exactly as written (left to
    right: ((K*S)*cf)/E, no tolerance: 3*1.1 = 3.3000000000000003 gives 4), then rounded up to a multiple of
    multiple_of. The same rule for every group, a shorter last group included. The ceiling of a positive
    number is at least 1, so any positive cf gives C >= 1 (E=8, S=4, K=1, cf=0.1: 0.05 -> C = 1, as for a
    short last group; limoe refuses a model *configured* with groups that small, which this function does not
    model)."""
    if cf == 0:
        return S
    C = math.ceil(K * S * cf / E)
    if multiple_of > 1:
        C = ((C + multiple_of - 1) // multiple_of) * multiple_of
    return C


def top_k(gates: np.ndarray, K: int) -> np.ndarray:
    """[S, E] -> [S, K] expert ids in descending gate order (ties: lower expert id first)."""
    return np.argsort(-gates, axis=1, kind="stable")[:, :K]


def assign(choice: np.ndarray, top1: np.ndarray, E: int, C: int, bpr: bool) -> np.ndarray:
    """choice [S, K] expert ids by rank, top1 [S] top-1 gate. Returns accepted [S, K]: expert id or -1.

    Visits all first choices, then all second choices, ...; within a rank tokens go in group order (vanilla)
    or in descending top-1 gate order (BPR, stable: ties keep the lower token index first)."""
    S, K = choice.shape
    order = np.argsort(-top1, kind="stable") if bpr else np.arange(S)
    held = np.zeros(E, dtype=np.int64)
    out = np.full((S, K), -1, dtype=np.int64)
    for k in range(K):
        for s in order:
            e = choice[s, k]
            if held[e] < C:
                held[e] += 1
                out[s, k] = e
    return out


# --------------------------------------------------------------------------------------------------------
# MoE layer
# --------------------------------------------------------------------------------------------------------
LOSS_KEYS = ("importance", "load", "local_entropy_img", "local_entropy_txt", "global_entropy_img",
             "global_entropy_txt", "z")


def moe_layer(P, prefix: str, cfg: Config, x: torch.Tensor, modality: np.ndarray, cf: float,
              lw: LossWeights, noise: Optional[torch.Tensor] = None):
    """x [S_tot, D] (the LN2 output of every token of the call, in call order); modality [S_tot];
    noise [S_tot, E] (training noise, added to the logits; None: no noise, and the load loss is 0).

    Returns y [S_tot, D], route [S_tot, K] (int64, -1 = dropped), losses {key: scalar averaged over groups},
    info (per group: C, logits, gates, accepted) for the tests' margin checks."""
    S_tot, D = x.shape
    E, K, rc = cfg.experts, cfg.top_k, cfg.router
    gs = rc.group_size if rc.group_size > 0 else S_tot
    Wr = P[prefix + ".router.weight"]
    W1, b1 = P[prefix + ".fc1.weight"], P[prefix + ".fc1.bias"]
    W2, b2 = P[prefix + ".fc2.weight"], P[prefix + ".fc2.bias"]
    ys, routes, infos = [], [], []
    loss_sum = {k: x.new_zeros(()) for k in LOSS_KEYS}
    n_groups = 0
    for g0 in range(0, S_tot, gs):
        xg = x[g0:g0 + gs]                       # [S, D]
        mg = modality[g0:g0 + gs]                # [S]
        S = xg.shape[0]
        logits = linear(xg, Wr)                  # [S, E]
        noisy = logits if noise is None else logits + noise[g0:g0 + gs]
        gates = torch.softmax(noisy, dim=-1)     # [S, E] combine weights
        g_np = gates.detach().cpu().numpy()
        choice = top_k(g_np, K)                  # [S, K]
        top1 = g_np[np.arange(S), choice[:, 0]]  # [S]
        C = capacity(S, K, E, cf, rc.capacity_multiple_of)
        acc = assign(choice, top1, E, C, rc.bpr)  # [S, K]
        y = xg.new_zeros((S, D))
        for e in range(E):
            tok = np.nonzero((acc == e).any(axis=1))[0]  # tokens held by expert e (at most one rank each)
            if tok.size == 0:
                continue
            ti = torch.as_tensor(tok, dtype=torch.long)
            h = gelu(linear(xg[ti], W1[e], b1[e]), cfg.gelu)   # [n, M]
            o = linear(h, W2[e], b2[e])                         # [n, D]
            y = y.index_add(0, ti, gates[ti, e:e + 1] * o)     # weight = gate, not renormalised
        ys.append(y)
        routes.append(acc)

        # Auxiliary losses on the clean gates (semantics §4).
        logp = torch.log_softmax(logits, dim=-1)  # [S, E]
        G = logp.exp()
        imp = G.sum(0)                             # [E]
        imp_loss = (imp.var(unbiased=False) / imp.mean() ** 2)
        z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
        # Load loss (V-MoE appendix A.2), only with noise: thr_s = the K-th largest NOISY logit of token s (the
        # noisy logit of its K-th choice; the noise is a constant, so the gradient reaches the logit through it);
        # p[s, e] = P(logits[s, e] + fresh noise > thr_s) = 1 - Phi((thr_s - logits[s, e]) / sigma) with
        # sigma = noise_std / E; Load_e = mean_s p[s, e]; loss = var(Load) / mean(Load)^2 (population variance).
        if noise is None or not rc.noise_std > 0:
            load_loss = x.new_zeros(())
        else:
            sigma = rc.noise_std / E
            thr = noisy[torch.arange(S), torch.as_tensor(choice[:, K - 1], dtype=torch.long)]  # [S]
            p = 0.5 * torch.erfc((thr[:, None] - logits) / (sigma * math.sqrt(2.0)))          # 1 - Phi(z)
            load = p.mean(0)                                                                  # [E]
            load_loss = load.var(unbiased=False) / load.mean() ** 2
        lg = {"importance": imp_loss, "load": load_loss, "z": z}
        for m, name, tau in ((IMG, "img", lw.tau_img), (TXT, "txt", lw.tau_txt)):
            sel = np.nonzero(mg == m)[0]
            if sel.size == 0:  # modality absent from the group: contributes 0
                lg["local_entropy_" + name] = x.new_zeros(())
                lg["global_entropy_" + name] = x.new_zeros(())
                continue
            si = torch.as_tensor(sel, dtype=torch.long)
            lg["local_entropy_" + name] = entropy(logp[si]).mean()
            pbar = G[si].mean(0)
            lg["global_entropy_" + name] = torch.clamp(tau - entropy(torch.log(pbar)), min=0.0)
        for k in LOSS_KEYS:
            loss_sum[k] = loss_sum[k] + lg[k]
        n_groups += 1
        infos.append({"C": C, "S": S, "modality": mg, "logits": logits.detach(), "gates": gates.detach(),
                      "accepted": acc, "choice": choice, "losses": {k: float(v) for k, v in lg.items()}})
    losses = {k: v / n_groups for k, v in loss_sum.items()}
    return torch.cat(ys, 0), np.concatenate(routes, 0), losses, infos


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------
def embed_images(P, cfg: Config, images: torch.Tensor) -> torch.Tensor:
    """images [B, H, W, C] -> tokens [B, N, D]."""
    B = images.shape[0]
    gh, gw = cfg.grid
    p = cfg.patch
    x = images.reshape(B, gh, p, gw, p, cfg.channels).permute(0, 1, 3, 2, 4, 5)  # [B, gy, gx, py, px, c]
    x = x.reshape(B, gh * gw, cfg.patch_dim)                                      # [B, N, P*P*C]
    return linear(x, P["img.patch.weight"], P["img.patch.bias"]) + P["img.pos"]


def embed_texts(P, cfg: Config, texts: torch.Tensor) -> torch.Tensor:
    """texts [B, T] int -> tokens [B, T, D]."""
    return P["txt.embed"][texts.long()] + P["txt.pos"]


def pool(P, cfg: Config, m: str, kind: str, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """x [B, L, D] after the final LayerNorm -> [B, D]. keep [B, L] bool (text_mask) or None."""
    B, L, D = x.shape
    if kind == "first":
        return x[:, 0]
    if kind == "last":
        if keep is None:
            return x[:, L - 1]
        last = np.array([int(np.nonzero(r)[0].max()) for r in keep.cpu().numpy()])  # last non-pad token
        return x[torch.arange(B), torch.as_tensor(last, dtype=torch.long)]
    if kind == "gap":
        if keep is None:
            return x.mean(1)
        w = keep.to(x.dtype)[..., None]  # [B, L, 1]
        return (x * w).sum(1) / w.sum(1)
    # map: the probe is the single query of a multi-head attention over the tokens; out = u + MLP(LN(u)).
    hp = f"{m}.head"
    q = P[hp + ".probe"].expand(B, 1, D)
    u = mha(P, hp + ".attn", q, x, cfg.heads, keep)[:, 0]  # [B, D]
    return u + mlp(P, hp + ".mlp", layer_norm(u, P[hp + ".ln.weight"], P[hp + ".ln.bias"], cfg.ln_eps), cfg.gelu)


def encode(P, cfg: Config, images: Optional[torch.Tensor], texts: Optional[torch.Tensor], cf: float,
           lw: LossWeights = LossWeights(), noise: Optional[Dict[int, torch.Tensor]] = None) -> dict:
    """One forward call (semantics §3: its image tokens then its text tokens share the routing groups).

    Returns z_img [B, P_out] / z_txt (or None), routes {block: [S_tot, K]}, losses {block: {key: scalar}},
    infos {block: [per-group info]}."""
    segs = []  # (modality name, modality id, x [B, L, D], keep mask or None)
    if images is not None:
        segs.append(["img", IMG, embed_images(P, cfg, images), None])
    if texts is not None:
        keep = (texts != cfg.pad_id) if cfg.text_mask else None
        if keep is not None:
            assert bool(keep.any(1).all()), "text_mask: every text needs at least one non-pad token"
        segs.append(["txt", TXT, embed_texts(P, cfg, texts), keep])
    routes, losses, infos = {}, {}, {}
    for i in range(cfg.depth):
        bp = f"blocks.{i}"
        for sg in segs:  # attention: each sequence on its own
            h = layer_norm(sg[2], P[bp + ".ln1.weight"], P[bp + ".ln1.bias"], cfg.ln_eps)
            sg[2] = sg[2] + mha(P, bp + ".attn", h, h, cfg.heads, sg[3])
        hs = [layer_norm(sg[2], P[bp + ".ln2.weight"], P[bp + ".ln2.bias"], cfg.ln_eps) for sg in segs]
        if i in cfg.moe_blocks:
            flat = torch.cat([h.reshape(-1, cfg.width) for h in hs], 0)  # [S_tot, D] images then texts
            modality = np.concatenate([np.full(h.shape[0] * h.shape[1], sg[1]) for h, sg in zip(hs, segs)])
            y, routes[i], losses[i], infos[i] = moe_layer(P, bp + ".moe", cfg, flat, modality, cf, lw,
                                                          None if noise is None else noise.get(i))
            o = 0
            for h, sg in zip(hs, segs):
                n = h.shape[0] * h.shape[1]
                sg[2] = sg[2] + y[o:o + n].reshape(h.shape)
                o += n
        else:
            for h, sg in zip(hs, segs):
                sg[2] = sg[2] + mlp(P, bp + ".mlp", h, cfg.gelu)
    out = {"z_img": None, "z_txt": None, "routes": routes, "losses": losses, "infos": infos}
    for name, _, x, keep in segs:
        x = layer_norm(x, P["norm.weight"], P["norm.bias"], cfg.ln_eps)
        u = pool(P, cfg, name, cfg.pool_img if name == "img" else cfg.pool_txt, x, keep)
        u = linear(u, P[f"{name}.proj.weight"])                 # [B, P_out], no bias
        out["z_" + name] = u / (torch.sqrt((u * u).sum(-1, keepdim=True)) + 1e-8)
    return out


def contrastive_loss(z_img: torch.Tensor, z_txt: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """logits_ij = exp(theta) <z_img_i, z_txt_j>; (CE over rows + CE over columns) / 2, diagonal targets."""
    logits = torch.exp(theta) * (z_img @ z_txt.T)  # [n, n]
    rows = -torch.diagonal(torch.log_softmax(logits, dim=1)).mean()
    cols = -torch.diagonal(torch.log_softmax(logits, dim=0)).mean()
    return 0.5 * (rows + cols)


def train_loss(P, cfg: Config, images: torch.Tensor, texts: torch.Tensor, lw: LossWeights,
               noise: Optional[Dict[int, torch.Tensor]] = None) -> dict:
    """Training forward: images and texts in one call (shared routing groups), capacity_factor_train."""
    out = encode(P, cfg, images, texts, cfg.router.capacity_factor_train, lw, noise)
    con = contrastive_loss(out["z_img"], out["z_txt"], P["logit_scale"])
    aux = con.new_zeros(())
    for i, L in out["losses"].items():
        aux = aux + (lw.importance * L["importance"] + lw.load * L["load"]
                     + lw.local_entropy * (L["local_entropy_img"] + L["local_entropy_txt"])
                     + lw.global_entropy * (L["global_entropy_img"] + L["global_entropy_txt"])
                     + lw.z * L["z"])
    out["contrastive"] = con
    out["aux"] = aux
    out["total"] = con + aux
    return out


def embed(P, cfg: Config, images: Optional[torch.Tensor], texts: Optional[torch.Tensor],
          cf: Optional[float] = None) -> dict:
    """Evaluation, as `limoe embed`: images alone in one call, texts alone in another, no noise."""
    cf = cfg.router.capacity_factor_eval if cf is None else cf
    res = {}
    if images is not None:
        o = encode(P, cfg, images, None, cf)
        res["img_emb"], res["img_route"], res["img_infos"] = o["z_img"], o["routes"], o["infos"]
    if texts is not None:
        o = encode(P, cfg, None, texts, cf)
        res["txt_emb"], res["txt_route"], res["txt_infos"] = o["z_txt"], o["routes"], o["infos"]
    return res
