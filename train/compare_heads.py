"""Which segmentation head suits the shipped encoder: three heads trained side
by side on its frozen features, on the same augmented batches, then scored
on the validation list (IoU at 0.5, MAE; the shipped head beside them).

    train/.venv/bin/python train/compare_heads.py      # about 20 minutes on 2 cores

- sub-patch: the shipped head's form (16 logits per patch token, a 4x4 grid);
- decoder: tokens to 64 channels, two 2x bilinear upsamplings each followed by
  a 3x3 convolution, batch norm and ReLU (64 then 32 channels), logits at 1/4;
- skip decoder: the same, with the stem's 1/8 and 1/4 outputs concatenated
  before each convolution.
"""
import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Decoder, ExportedViT, subpatch_grid
from train import GRIDS, HERE, augmented_batch, read_packs, segmentation_loss


class SubPatch(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 16)

    def forward(self, stem, tokens):
        _, _, rows, cols = tokens.shape
        return subpatch_grid(self.linear(tokens.flatten(2).transpose(1, 2)), rows, cols)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=os.path.join(HERE, "..", "weights", "segattn-s16.safetensors"))
    ap.add_argument("--packed", default=os.path.join(HERE, ".work", "pack"), metavar="DIR", help="as train.py's")
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = random.Random(a.seed)
    gen = torch.Generator().manual_seed(a.seed)

    encoder, _ = ExportedViT.load(a.weights)
    dim = encoder.t["embeddings.cls_token"].shape[-1]
    stem_channels = [encoder.t[f"embeddings.patch_embeddings.stem.{i}.weight"].shape[0] for i in range(3)]
    heads = nn.ModuleDict({"sub-patch": SubPatch(dim), "decoder": Decoder(dim), "skip decoder": Decoder(dim, stem_channels)})

    def features(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stem, tokens, _ = encoder.features(x)
        b, rows, cols = x.shape[0], x.shape[-2] // 16, x.shape[-1] // 16
        return [s.float() for s in stem], tokens[:, 1:].float().transpose(1, 2).reshape(b, dim, rows, cols)

    canvas, sizes, val = read_packs(a.packed, "cpu")
    val = val["pascal-s"]
    opt = torch.optim.AdamW(heads.parameters(), lr=a.lr, weight_decay=0.01)
    steps_per_epoch = len(sizes) // a.batch
    total = a.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * s / total)))
    for epoch in range(1, a.epochs + 1):
        started, order = time.time(), list(range(len(sizes)))
        rng.shuffle(order)
        order = torch.tensor(order)
        losses = {k: [] for k in heads}
        for step in range(steps_per_epoch):
            rows, cols = GRIDS[rng.randrange(len(GRIDS))]
            x, y = augmented_batch(canvas, sizes, order[step * a.batch:(step + 1) * a.batch], rows, cols, gen)
            stem, tokens = features(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = {k: head(stem, tokens) for k, head in heads.items()}
            loss = 0
            for k, out in logits.items():
                seg = segmentation_loss(out.float(), y)
                losses[k].append(float(seg.detach()))
                loss = loss + seg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(); sched.step()
        print(json.dumps({"epoch": epoch, "seconds": round(time.time() - started),
                          **{k: round(float(np.mean(v)), 4) for k, v in losses.items()}}), flush=True)

    heads.eval()
    scores = {k: [] for k in ["shipped", *heads]}
    with torch.no_grad():
        for x, truth in val:
            stem, tokens = features(x)
            logits = {"shipped": encoder(x)[1], **{k: head(stem, tokens) for k, head in heads.items()}}
            gt = truth >= 0.5
            for k, out in logits.items():
                p = F.interpolate(out.float(), size=truth.shape, mode="bilinear", align_corners=False).sigmoid()[0, 0]
                pred = p >= 0.5
                scores[k].append((float((pred & gt).sum() / (pred | gt).sum().clamp_min(1)), float((p - gt.float()).abs().mean())))
    print("| head (validation list) | IoU | MAE |\n|---|---|---|")
    for k, r in scores.items():
        print(f"| {k} | {np.mean([v[0] for v in r]):.3f} | {np.mean([v[1] for v in r]):.3f} |")


if __name__ == "__main__":
    main()
