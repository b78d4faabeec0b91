"""Trains segattn's built-in model from ../shared/data and writes
weights/segattn-s16.safetensors, train/log.csv and train/curves.png.

    train/run            # teacher masks, venv + this script, fixed seed

Data (see ../shared/data/README.md): PASCAL-S (minus the 150 photos of
train/val_list.txt, kept for validation), people-removebg, Weizmann horses,
the IS-Net teacher's masks of msra-1000 and imagenet-sample (580) from
../shared/data/teacher, and those train/label makes of flickr-1000.
"""
import argparse
import csv
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import save_file

from model import SegAttnViT, config_json, export_tensors

HERE = os.path.dirname(os.path.abspath(__file__))
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SHORT_SIDE = 224  # the input's short side at inference, segattn's default for this model


def read_pair(photo, mask, short):
    img = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
    m = Image.open(mask).convert("L")
    if m.size != img.size:
        m = m.resize(img.size, Image.BILINEAR)
    s = short / min(img.size)
    size = (max(short, round(img.size[0] * s)), max(short, round(img.size[1] * s)))
    return np.asarray(img.resize(size, Image.BICUBIC)), np.asarray(m.resize(size, Image.BILINEAR))


def training_pairs(data, label_dirs):
    val = set(open(os.path.join(HERE, "val_list.txt")).read().split())
    pairs = []
    for folder in ["salient/pascal-s", "salient/people-removebg", "salient/horses"]:
        for f in sorted(os.listdir(os.path.join(data, folder, "images"))):
            stem = os.path.splitext(f)[0]
            if folder.endswith("pascal-s") and stem in val:
                continue
            pairs.append((os.path.join(data, folder, "images", f), os.path.join(data, folder, "masks", stem + ".png")))
    # Teacher masks of photos/<folder>: the shared ones, then those train/label
    # made (label_dirs, one per folder); a photo labelled in both is used once.
    shared = os.path.join(data, "teacher")
    labelled = set()
    for folder_dir in [os.path.join(shared, f) for f in sorted(os.listdir(shared))] + label_dirs:
        if not os.path.isdir(folder_dir):
            raise SystemExit(f"{folder_dir}: no teacher masks; run train/label first")
        folder = os.path.basename(folder_dir)
        for f in sorted(os.listdir(folder_dir)):
            stem = os.path.splitext(f)[0]
            photo = os.path.join(data, "photos", folder, stem + ".jpg")
            if f.endswith(".png") and (folder, stem) not in labelled and os.path.exists(photo):
                labelled.add((folder, stem))
                pairs.append((photo, os.path.join(folder_dir, f)))
    return pairs


def random_crop(img, mask, rows, cols, rng):
    """Random resized crop (area 30-100 %, aspect jittered around the target's),
    flip and colour jitter; returns (3, 16·rows, 16·cols) floats and the mask."""
    h, w = mask.shape
    target_aspect = cols / rows
    for _ in range(10):
        area = rng.uniform(0.3, 1.0) * h * w
        aspect = target_aspect * math.exp(rng.uniform(-0.25, 0.25))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = min(w, round(h * target_aspect)), min(h, round(w / target_aspect))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    x = torch.from_numpy(np.ascontiguousarray(img[y0:y0 + ch, x0:x0 + cw])).permute(2, 0, 1)[None].float() / 255
    m = torch.from_numpy(np.ascontiguousarray(mask[y0:y0 + ch, x0:x0 + cw]))[None, None].float() / 255
    size = (16 * rows, 16 * cols)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False, antialias=True)
    if rng.random() < 0.5:
        x, m = x.flip(-1), m.flip(-1)
    gray = x.mean(1, keepdim=True)
    x = x * rng.uniform(0.7, 1.3)  # brightness
    x = (x - gray.mean()) * rng.uniform(0.7, 1.3) + gray.mean()  # contrast
    x = (x - gray) * (0.0 if rng.random() < 0.05 else rng.uniform(0.6, 1.4)) + gray  # saturation / grayscale
    return ((x.clamp(0, 1) - MEAN) / STD)[0], m[0]


def segmentation_loss(logits, target):
    """BCE + soft Dice, on logits upsampled bilinearly to the target's pixels as segattn does."""
    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = logits.sigmoid()
    dice = 1 - (2 * (p * target).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return bce + dice.mean()


def attention_loss(cls_attention, target):
    """Cross-entropy from each head's class-token attention over the patches to
    the uniform distribution over the object's patches: attention on the object,
    spread over it."""
    b, heads, n = cls_attention.shape
    rows, cols = target.shape[-2] // 16, target.shape[-1] // 16
    cover = F.avg_pool2d(target, 16).reshape(b, 1, rows * cols)
    keep = cover.sum(-1).squeeze(1) > 0.5
    if not keep.any():
        return cls_attention.sum() * 0
    patches = cls_attention[:, :, 1:]
    patches = patches / patches.sum(-1, keepdim=True)
    goal = cover / cover.sum(-1, keepdim=True).clamp_min(1e-6)
    ce = -(goal * torch.log(patches + 1e-8)).sum(-1).mean(1)
    return ce[keep].mean()


def val_input(path):
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = img.size
    s = SHORT_SIDE / min(w, h)
    cols, rows = max(1, round(w * s / 16)), max(1, round(h * s / 16))
    x = torch.from_numpy(np.asarray(img.resize((16 * cols, 16 * rows), Image.BICUBIC))).permute(2, 0, 1)[None].float() / 255
    return (x - MEAN) / STD, (w, h)


@torch.no_grad()
def validate(model, data, names):
    """Mean IoU (probability >= 0.5 against truth >= 128) at the photo's size,
    MAE, max F (beta² 0.3), and the share of the last layer's mean class-token
    attention over the patches that lands inside the object; for both heads."""
    model.eval()
    rows = {"fine": [], "coarse": []}
    losses, masses = [], []
    for name in names:
        x, (w, h) = val_input(os.path.join(data, "salient/pascal-s/images", name + ".jpg"))
        truth = torch.from_numpy(np.asarray(Image.open(os.path.join(data, "salient/pascal-s/masks", name + ".png")).convert("L"))).float() / 255
        _, fine, coarse, cls_attention = model(x, keep_cls_attention=True)
        gt = truth >= 0.5
        for key, logits in (("fine", fine), ("coarse", coarse)):
            p = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).sigmoid()[0, 0]
            if key == "fine":
                losses.append(float(segmentation_loss(logits, truth[None, None])))
            pred = p >= 0.5
            iou = float((pred & gt).sum() / (pred | gt).sum().clamp_min(1))
            # Pixels at or above each of 256 thresholds, from histograms.
            bins = (p * 255).round().long().flatten()
            hist_gt = torch.bincount(bins[gt.flatten()], minlength=256).double()
            hist_all = torch.bincount(bins, minlength=256).double()
            tp = hist_gt.flip(0).cumsum(0).flip(0)
            pp = hist_all.flip(0).cumsum(0).flip(0)
            rows[key].append((iou, float((p - gt.float()).abs().mean()), tp / pp.clamp_min(1), tp / max(1, int(gt.sum()))))
        att = cls_attention.mean(1)[0, 1:]
        att = att / att.sum()
        r, c = fine.shape[-2] // model.subpatch, fine.shape[-1] // model.subpatch
        inside = F.interpolate(gt[None, None].float(), size=(r * 16, c * 16), mode="bilinear", align_corners=False)
        inside = F.avg_pool2d(inside, 16).flatten()
        masses.append(float((att * inside).sum()))
    out = {"val_loss": float(np.mean(losses)), "attention_mass": float(np.mean(masses))}
    for key, r in rows.items():
        precision = torch.stack([x[2] for x in r]).mean(0)
        recall = torch.stack([x[3] for x in r]).mean(0)
        f = (1.3 * precision * recall / (0.3 * precision + recall).clamp_min(1e-9)).max()
        out[f"{key}_iou"] = float(np.mean([x[0] for x in r]))
        out[f"{key}_mae"] = float(np.mean([x[1] for x in r]))
        out[f"{key}_maxf"] = float(f)
    model.train()
    return out


def plot(log_rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    e = [r["epoch"] for r in log_rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(e, [r["train_loss"] for r in log_rows], label="training loss (segmentation)")
    a.plot(e, [r["val_loss"] for r in log_rows], label="validation loss")
    a.set_xlabel("epoch"); a.legend(); a.grid(alpha=0.3)
    b.plot(e, [r["fine_iou"] for r in log_rows], label="IoU, sub-patch head")
    b.plot(e, [r["coarse_iou"] for r in log_rows], label="IoU, per-patch head")
    b.plot(e, [r["attention_mass"] for r in log_rows], label="class-token attention inside object")
    b.set_xlabel("epoch"); b.set_ylim(0, 1); b.legend(loc="lower right"); b.grid(alpha=0.3)
    b.set_title("PASCAL-S validation list (150 photos)", fontsize=9)
    fig.tight_layout(); fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "weights", "segattn-s16.safetensors"))
    ap.add_argument("--epochs", type=int, default=35)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--attention-weight", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with AVX512-BF16 / AMX)")
    ap.add_argument("--labelled", action="append", default=None, metavar="FOLDER",
                    help="a photos/ folder whose teacher masks train/label made in train/.work/labels "
                         "(default: flickr-1000)")
    ap.add_argument("--limit", type=int, default=0, help="train on this many photos only (smoke test)")
    a = ap.parse_args()
    torch.manual_seed(a.seed); random.seed(a.seed); np.random.seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = random.Random(a.seed)

    t0 = time.time()
    pairs = training_pairs(a.data, [os.path.join(HERE, ".work", "labels", f) for f in a.labelled or ["flickr-1000"]])
    if a.limit:
        pairs = random.Random(a.seed).sample(pairs, a.limit)
    # Photos held at a short side of 288: enough for crops at 224, small in memory.
    samples = [read_pair(p, m, 288) for p, m in pairs]
    val_names = open(os.path.join(HERE, "val_list.txt")).read().split()
    print(f"{len(samples)} training photos, {len(val_names)} validation photos, read in {time.time() - t0:.0f} s", flush=True)

    model = SegAttnViT()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=a.lr)
    steps_per_epoch = len(samples) // a.batch
    total, warmup = a.epochs * steps_per_epoch, 2 * steps_per_epoch
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    # Grids of patches per batch: square, and the landscape / portrait shapes
    # photos have at a short side of 224 (14 patches), so position embeddings
    # learn to be interpolated as segattn interpolates them.
    grids = [(14, 14), (14, 14), (14, 19), (19, 14), (14, 17), (17, 14), (12, 12)]

    log_rows = []
    log_path = os.path.join(HERE, "log.csv")
    for epoch in range(1, a.epochs + 1):
        te = time.time()
        order = list(range(len(samples)))
        rng.shuffle(order)
        seg_losses, att_losses = [], []
        for step in range(steps_per_epoch):
            rows, cols = grids[rng.randrange(len(grids))]
            batch = [random_crop(*samples[i], rows, cols, rng) for i in order[step * a.batch:(step + 1) * a.batch]]
            x = torch.stack([b[0] for b in batch]); y = torch.stack([b[1] for b in batch])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                _, fine, coarse, cls_attention = model(x, keep_cls_attention=True)
            seg = segmentation_loss(fine, y)
            loss = seg + 0.5 * segmentation_loss(coarse, y) + a.attention_weight * attention_loss(cls_attention.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); sched.step()
            seg_losses.append(seg.item()); att_losses.append((loss - seg).item())
        v = validate(model, a.data, val_names)
        row = {"epoch": epoch, "train_loss": float(np.mean(seg_losses)), **v, "seconds": round(time.time() - te, 1)}
        log_rows.append(row)
        print(json.dumps(row), flush=True)
        with open(log_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row)); w.writeheader(); w.writerows(log_rows)
    plot(log_rows, os.path.join(HERE, "curves.png"))
    # The last epoch ships: choosing one by validation score would tune on the validation list.
    tensors, iou = export_tensors(model), log_rows[-1]["fine_iou"]
    meta = {"config": config_json(model), "segattn_short_side": str(SHORT_SIDE),
            "segattn_trained": f"train/train.py, seed {a.seed}, {a.epochs} epochs, validation IoU {iou:.3f}"}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_file({k: t.half() for k, t in tensors.items()}, a.out + ".tmp", metadata=meta)
    os.replace(a.out + ".tmp", a.out)
    print(f"wrote {a.out}: validation IoU {iou:.3f}; {time.time() - t0:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
