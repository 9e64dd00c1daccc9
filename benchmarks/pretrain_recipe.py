"""Issue 14, exploration (not yet the recipe): can an initialisation that routes positions take the
byte-level Perceiver off the byte-unigram plateau? A plain PyTorch loop (no Ray) on the sample
data's crops with whole-word masks (or single bytes, --byte-mask), one variant per call, for a time
budget; prints the validation curve on stderr and one JSON line.

``--init routing`` (``routing_init``): position codes (sinusoids over the crop) in a block of the
input and latent dimensions, and attention projections that compare them, rotated per head, so
that latent i starts out reading its window of crop_len / num_latents bytes (head h its h-th part)
and decoder query p the latents around the one whose window holds p. The weights keep
transformers' shapes: only their initial values differ.

Measured on the 2-core EPYC (2026-12-02), small preset, 256-byte crops, batch 16, AdamW:
- standard and routing init alike stay on the plateau for 110-150 s (400-700 steps): val loss
  3.27-3.30, masked-byte accuracy 0.1645, at lr 1e-3 to 3e-3, initializer_range 0.02 or 0.1,
  whole-word or single-byte masks;
- overfitting one batch of single-byte masks, routing gets to loss 0.12 in 300 steps, standard
  to 1.36: routed information reaches the decoder far sooner, but that alone did not generalise
  within two minutes.

Second session (same machine, 128-byte crops, batch 16, whole-word masks unless said):
- the byte-level BERT (``--preset bert``, 0.86M parameters, lr 1e-3) on the same crops and masks:
  3.30 / 0.215 after 100 steps (19 s), 3.09 / 0.236 after 840 steps (150 s). With single-byte
  masks (``--byte-mask``) it too stays on the plateau for 300 steps (3.33 / 0.164): its early
  gain under whole-word masks comes from the spans' edges (which byte ends a masked word);
- small preset with one latent per byte (``--latents 128``) and the routing initialisation:
  3.39 / 0.159 after 600 steps at lr 2e-3, 3.39 / 0.159 after 500 at 5e-4; 3.35 / 0.164 with
  byte masks; 3.45 / 0.159 with the routing weights frozen (``--freeze-routing``: positions,
  latents, both cross-attentions' queries and keys), and 3.47 / 0.141 with the byte embedding
  (tied to the output) at std 1 (``--embed-std 1``). At initialisation the routed model's logits
  at position 64 move with bytes 63-65 and not with byte 94 (relative change 0.03-0.10 against
  0.004), so the neighbours' bytes do reach the output: routing is not what holds the model on
  the plateau. Next suspects: the decoder's output, which reaches the tied logits with no
  LayerNorm (BERT's head has one), and the scale of what the latents hand the decoder.

    python benchmarks/pretrain_recipe.py --init routing --beta 8 --dec-beta 8 \
        --dec-offsets=0,-1,1,-2,2,0,-1,1 --code-scale 0.5 --lr 2e-3 --seconds 110
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from perceiver_core.config import get_preset
from perceiver_core.masking import MaskingConfig, mask_batch
from perceiver_core.model import PerceiverForMaskedLM
from perceiver_core.packing import PackingConfig, pack_texts

DATA = os.environ.get("PERCEIVER_SHARED_DATA", "../shared/data")


def load_docs(limit: int) -> list[str]:
    docs = []
    for i in range(2):
        t = pq.read_table(
            f"{DATA}/wikipedia/20150501.en/train-0000{i}-of-00002.parquet", columns=["text"]
        )
        docs += t.column("text").to_pylist()
    with gzip.open(f"{DATA}/c4/en/c4-train.00000-of-00001.json.gz", "rt") as f:
        docs += [json.loads(line)["text"] for line in f]
    rng = np.random.default_rng(0)
    rng.shuffle(docs)
    return docs[:limit]


def crops(crop_len: int, limit: int):
    packed = pack_texts(load_docs(limit), PackingConfig(crop_len=crop_len, min_fill=1.0))
    return packed.input_ids.astype(np.int64), packed.sample_ids()


def sinusoids(
    positions: torch.Tensor, dims: int, period: float, phase: float = 0.0
) -> torch.Tensor:
    k = torch.arange(1, dims // 2 + 1, dtype=torch.float32)
    ang = 2 * math.pi * (positions[:, None].float() + phase) * k[None, :] / period
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1) / math.sqrt(dims // 2)


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    n, c = t.shape
    return t.view(n, h, c // h).transpose(0, 1)


def _gap(attn, q_in: torch.Tensor, kv_in: torch.Tensor, heads: int) -> torch.Tensor:
    q = _heads(attn.q(attn.q_norm(q_in)), heads)
    kv_norm = attn.kv_norm if attn.kv_norm is not None else attn.q_norm
    k = _heads(attn.k(kv_norm(kv_in)), heads)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (logits.max(-1).values - logits.mean(-1)).mean()


def rotation(dims: int, shift: float, period: float) -> torch.Tensor:
    """The linear map taking sinusoids(p) to sinusoids(p - shift) (block rotations per frequency)."""
    half = dims // 2
    k = torch.arange(1, half + 1, dtype=torch.float32)
    a = 2 * math.pi * shift * k / period
    R = torch.zeros(dims, dims)
    c, s_ = torch.cos(a), torch.sin(a)
    idx = torch.arange(half)
    # [cos(w(p-s)), sin(w(p-s))] = [[c, s], [-s, c]] @ [cos wp, sin wp]
    R[idx, idx] = c
    R[idx, idx + half] = s_
    R[idx + half, idx] = -s_
    R[idx + half, idx + half] = c
    return R


@torch.no_grad()
def routing_init(
    model: PerceiverForMaskedLM,
    crop_len: int,
    beta: float,
    pos_ratio: float,
    dec_beta: float,
    dec_offsets: tuple[int, ...] = (0,),
    code_scale: float = 1.0,
) -> None:
    """Position codes (sinusoids) in a block of the input and latent dimensions; attention
    projections that compare codes, rotated per head to an offset: latent i starts out reading
    window i (head h its h-th part), decoder query p the latents around the one holding p."""
    c = model.config
    enc, dec = model.encoder, model.decoder
    cross, dattn = enc.cross.attn, dec.block.attn
    H, Hd = c.num_cross_attention_heads, c.decoder_num_heads
    dq = c.cross_attention_qk_channels // H
    dqd = c.decoder_qk_channels // Hd
    N, L = c.num_latents, crop_len
    w = L / N
    P = c.max_position_embeddings
    pos = torch.arange(P)
    amp = enc.embed.weight.std() * pos_ratio
    # Inputs: the position code in dims [0, dq).
    pe = enc.pos_embed.weight
    pe.zero_()
    pe[:, :dq] = sinusoids(pos, dq, L) * amp * math.sqrt(dq)
    # Latents: their window's start in dims [0, dq), their index in [dq, dq + dqd).
    lat = enc.latents
    lat.normal_(std=c.initializer_range)
    lat[:, :dq] = sinusoids(torch.arange(N).float() * w, dq, L) * math.sqrt(dq) * code_scale
    lat[:, dq : dq + dqd] = sinusoids(torch.arange(N).float(), dqd, N) * math.sqrt(dqd) * code_scale
    # Encoder cross-attention, head h: query = latent code rotated to window part h; key = code.
    cross.q.bias.zero_()
    cross.k.bias.zero_()
    for h in range(H):
        rows = slice(h * dq, (h + 1) * dq)
        cross.q.weight[rows] = 0
        cross.q.weight[rows, :dq] = rotation(dq, -(h + 0.5) * w / H, L)
        cross.k.weight[rows] = 0
        cross.k.weight[rows, :dq] = torch.eye(dq)
    e_sample = enc.embed.weight[torch.randint(6, 262, (L,))] + pe[:L]
    cross.q.weight.mul_(beta / _gap(cross, lat, e_sample, H))
    # Decoder queries: the index of the latent holding p, in dims [0, dqd).
    qd = dec.queries
    qd.normal_(std=c.initializer_range)
    owner = torch.clamp((pos.float() / w).floor(), max=N - 1)
    qd[:, :dqd] = sinusoids(owner, dqd, N) * math.sqrt(dqd)
    dattn.q.bias.zero_()
    dattn.k.bias.zero_()
    for h in range(Hd):
        rows = slice(h * dqd, (h + 1) * dqd)
        dattn.q.weight[rows] = 0
        dattn.q.weight[rows, :dqd] = torch.eye(dqd)
        dattn.k.weight[rows] = 0
        dattn.k.weight[rows, dq : dq + dqd] = rotation(dqd, dec_offsets[h % len(dec_offsets)], N)
    dattn.q.weight.mul_(dec_beta / _gap(dattn, qd[:L], lat, Hd))


def mask_bytes(ids, sids, epoch, mcfg, byte_mask=False):
    if not byte_mask:
        return mask_batch(ids, sids, epoch, mcfg)
    rng = np.random.default_rng(int(sids[0]) * 7919 + epoch)
    sel = (rng.random(ids.shape) < 0.15) & (ids > 5)
    labels = np.where(sel, ids, -100)
    x = np.where(sel, 3, ids)  # MASK id
    return x, labels


def masked_loss(model, x, y):
    """(mean loss over the masked bytes, their logits, their targets) for either model."""
    out = model(x, labels=y)
    targets = getattr(out, "targets", y)  # ours decodes the masked positions only
    keep = targets != -100
    return out.loss, out.logits[keep], targets[keep]


def bert(crop_len: int) -> torch.nn.Module:
    """The byte-level BERT of the issue (4 layers, hidden 128, 0.9M parameters)."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=262, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=crop_len, type_vocab_size=1,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForMaskedLM(cfg)


def evaluate(model, ids, sids, mcfg, byte_mask, batch=64):
    model.eval()
    tot_loss = tot_n = correct = 0
    with torch.no_grad():
        for s in range(0, len(ids), batch):
            x, y = mask_bytes(ids[s : s + batch], sids[s : s + batch], 0, mcfg, byte_mask)
            x = torch.from_numpy(x.astype(np.int64))
            y = torch.from_numpy(y.astype(np.int64))
            loss, logits, targets = masked_loss(model, x, y)
            n = len(targets)
            tot_loss += float(loss) * n
            tot_n += n
            correct += int((logits.argmax(-1) == targets).sum())
    model.train()
    return tot_loss / tot_n, correct / tot_n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--latents", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init", default="standard")
    ap.add_argument("--beta", type=float, default=4.0)
    ap.add_argument("--dec-beta", type=float, default=4.0)
    ap.add_argument("--pos-scale", type=float, default=1.0)
    ap.add_argument("--dec-offsets", default="0")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--init-range", type=float, default=0.02)
    ap.add_argument("--code-scale", type=float, default=1.0)
    ap.add_argument("--byte-mask", action="store_true")
    ap.add_argument("--freeze-routing", action="store_true")
    ap.add_argument("--embed-std", type=float, default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    over = {
        "max_position_embeddings": a.crop,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": a.init_range,
    }
    if a.latents:
        over["num_latents"] = a.latents
    model = (
        bert(a.crop) if a.preset == "bert" else PerceiverForMaskedLM(get_preset(a.preset, **over))
    )
    if a.embed_std is not None:  # the byte embedding, which the output logits are tied to
        with torch.no_grad():
            model.encoder.embed.weight.normal_(std=a.embed_std)
    if a.init == "routing":
        routing_init(
            model,
            a.crop,
            a.beta,
            a.pos_scale,
            a.dec_beta,
            tuple(int(x) for x in a.dec_offsets.split(",")),
            a.code_scale,
        )
    if a.freeze_routing:  # diagnostic: can training use routes it is not allowed to move?
        enc, dec = model.encoder, model.decoder
        for module in (enc.pos_embed, enc.cross.attn.q, enc.cross.attn.k, dec.block.attn.q,
                       dec.block.attn.k):  # fmt: skip
            module.requires_grad_(False)
        enc.latents.requires_grad_(False)
        dec.queries.requires_grad_(False)
    ids, sids = crops(a.crop, 4000)
    held, hs = ids[-256:], sids[-256:]
    ids, sids = ids[:-256], sids[:-256]
    mcfg = MaskingConfig()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.01
    )
    start = time.perf_counter()
    step = 0
    n = len(ids) // a.batch
    print(f"{len(ids)} crops, {sum(p.numel() for p in model.parameters())} params", file=sys.stderr)
    curve = []
    while time.perf_counter() - start < a.seconds:
        b = step % n
        x, y = mask_bytes(
            ids[b * a.batch : (b + 1) * a.batch],
            sids[b * a.batch : (b + 1) * a.batch],
            step // n,
            mcfg,
            a.byte_mask,
        )
        x = torch.from_numpy(x.astype(np.int64))
        y = torch.from_numpy(y.astype(np.int64))
        lr = a.lr * min(1.0, (step + 1) / 30)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = masked_loss(model, x, y)[0]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % a.eval_every == 0:
            vl, acc = evaluate(model, held, hs, mcfg, a.byte_mask)
            curve.append((round(time.perf_counter() - start, 1), step, round(vl, 4), round(acc, 4)))
            print(curve[-1], file=sys.stderr, flush=True)
    vl, acc = evaluate(model, held, hs, mcfg, a.byte_mask)
    print(
        json.dumps({"args": vars(a), "steps": step, "val_loss": vl, "val_acc": acc, "curve": curve})
    )


if __name__ == "__main__":
    main()
