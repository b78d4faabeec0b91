"""Trains segattn's built-in model on the photos train/pack.py packed from
../shared/data, and writes weights/segattn-s16.safetensors (or --out),
train/log.csv and train/curves.png (or --log, --curves). The defaults are
the shipped recipe: the encoder, its sub-patch head and the decoder trained
together, 233 epochs, with stochastic depth and zoomed-out crops.

    train/run            # teacher masks, packing, venv, training, fixed seed

Batches are augmented where the model runs (random resized crops, flips and
colour jitter, sampled from the squashed photos in one pass), so a GPU is
not held up by the CPU.
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
from PIL import Image
from safetensors.torch import save_file

from model import SegAttnViT, config_json, export_tensors, read_exported
from pack import SHORT_SIDE

HERE = os.path.dirname(os.path.abspath(__file__))
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# Grids of patches a batch is drawn at: square, and the landscape / portrait
# shapes photos have at a short side of 224 (14 patches), so position
# embeddings learn to be interpolated as segattn interpolates them.
GRIDS = [(14, 14), (14, 14), (14, 19), (19, 14), (14, 17), (17, 14), (12, 12)]
# The same shapes at a short side of 128 (8 patches), for --low-res-epochs:
# about a third of the tokens, so a CPU trains an epoch about 3x faster.
LOW_RES_GRIDS = [(round(r * 8 / 14), round(c * 8 / 14)) for r, c in GRIDS]


def crop_box(size, rows, cols, rng, zoom_out=0.0):
    """Random resized crop of a photo of `size` (area 30-100 %, aspect jittered
    around the target grid's), as (x0, y0, x1, y1) fractions of the photo.
    With probability `zoom_out` the box is 1-3 times the photo's area instead,
    the photo somewhere inside it: the object comes out smaller than at test."""
    w, h = size
    target_aspect = cols / rows
    if zoom_out and rng.random() < zoom_out:
        area = rng.uniform(1.0, 3.0) * h * w
        aspect = target_aspect * math.exp(rng.uniform(-0.25, 0.25))
        cw, ch = math.sqrt(area * aspect), math.sqrt(area / aspect)
        # Per axis: around the whole photo where the box is wider, else a span of it.
        x0 = -rng.uniform(0, cw - w) if cw > w else rng.uniform(0, w - cw)
        y0 = -rng.uniform(0, ch - h) if ch > h else rng.uniform(0, h - ch)
        return x0 / w, y0 / h, (x0 + cw) / w, (y0 + ch) / h
    for _ in range(10):
        area = rng.uniform(0.3, 1.0) * h * w
        aspect = target_aspect * math.exp(rng.uniform(-0.25, 0.25))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = min(w, round(h * target_aspect)), min(h, round(w / target_aspect))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return x0 / w, y0 / h, (x0 + cw) / w, (y0 + ch) / h


def augmented_batch(canvas, sizes, index, rows, cols, rng, zoom_out=0.0):
    """Random resized crops, flips and colour jitter of the photos `index` of
    `canvas` (N, 4, S, S) u8, all in one sampling pass on canvas's device;
    returns normalized pixels (B, 3, 16·rows, 16·cols) and masks (B, 1, ...).
    Outside the photo (zoomed out), pixels are the normalization's mean and
    the mask is background."""
    theta, jitter = [], []
    for i in index:
        x0, y0, x1, y1 = crop_box(sizes[i], rows, cols, rng, zoom_out)
        flip = -1.0 if rng.random() < 0.5 else 1.0
        # Output coordinates in [-1, 1] to the crop's in the squashed canvas.
        theta.append([[flip * (x1 - x0), 0.0, x0 + x1 - 1], [0.0, y1 - y0, y0 + y1 - 1]])
        saturation = 0.0 if rng.random() < 0.05 else rng.uniform(0.6, 1.4)
        jitter.append([rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3), saturation])
    device = canvas.device
    theta = torch.tensor(theta, device=device)
    grid = F.affine_grid(theta, (len(index), 4, 16 * rows, 16 * cols), align_corners=False)
    sample = lambda t, padding: F.grid_sample(t, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    pixels = canvas[index].float()
    if zoom_out:
        out = sample(pixels, "zeros") / 255
        outside = 1 - sample(torch.ones_like(pixels[:, :1]), "zeros")
        out[:, :3] += outside * MEAN.to(device)
    else:
        out = sample(pixels, "border") / 255
    x, m = out[:, :3], out[:, 3:]
    brightness, contrast, saturation = torch.tensor(jitter, device=device).T[..., None, None, None]
    gray = x.mean(1, keepdim=True)
    mean = gray.mean((1, 2, 3), keepdim=True)
    x = x * brightness
    x = (x - mean) * contrast + mean
    x = (x - gray) * saturation + gray
    return (x.clamp(0, 1) - MEAN.to(device)) / STD.to(device), m


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


def validation_pair(rgb, truth, device):
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    return ((x - MEAN) / STD).to(device), (torch.from_numpy(truth.copy()).float() / 255).to(device)


@torch.no_grad()
def validate(model, val):
    """Mean IoU (probability >= 0.5 against truth >= 128) at the photo's size,
    MAE and max F (beta² 0.3) of each head, the shipped head's loss, and the
    share of the last layer's mean class-token attention over the patches
    that lands inside the object."""
    model.eval()
    rows = {"fine": [], "coarse": []} | ({"decoder": []} if model.decoder is not None else {})
    losses, masses = [], []
    for x, truth in val:
        h, w = truth.shape
        _, fine, coarse, decoded, cls_attention = model(x, keep_cls_attention=True)
        gt = truth >= 0.5
        for key, logits in (("fine", fine), ("coarse", coarse), ("decoder", decoded)):
            if logits is None:
                continue
            p = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).sigmoid()[0, 0]
            if key == ("decoder" if model.decoder is not None else "fine"):
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
    if "decoder_iou" in log_rows[-1]:
        b.plot(e, [r["decoder_iou"] for r in log_rows], label="IoU, decoder")
    b.plot(e, [r["attention_mass"] for r in log_rows], label="class-token attention inside object")
    b.set_xlabel("epoch"); b.set_ylim(0, 1); b.legend(loc="lower right"); b.grid(alpha=0.3)
    b.set_title("PASCAL-S validation list (150 photos)", fontsize=9)
    fig.tight_layout(); fig.savefig(path, dpi=100)


def read_packs(folders, device):
    """The squashed photos (N, 4, CANVAS, CANVAS) u8 on `device`, their sizes,
    and the validation set, from folders train/pack.py wrote."""
    canvas, sizes, val = [], [], []
    for folder in folders:
        index = json.load(open(os.path.join(folder, "index.json")))
        for photo, mask, w, h in index["train"]:
            rgb = np.asarray(Image.open(os.path.join(folder, photo)).convert("RGB"))
            alpha = np.asarray(Image.open(os.path.join(folder, mask)).convert("L"))
            canvas.append(np.concatenate([rgb, alpha[..., None]], -1))
            sizes.append((w, h))
        for photo, truth in index["val"]:
            rgb = np.asarray(Image.open(os.path.join(folder, photo)).convert("RGB"))
            val.append(validation_pair(rgb, np.asarray(Image.open(os.path.join(folder, truth)).convert("L")), device))
    return torch.from_numpy(np.stack(canvas)).permute(0, 3, 1, 2).contiguous().to(device), sizes, val


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--packed", action="append", metavar="DIR",
                    help="a folder train/pack.py wrote (default: train/.work/pack-a and pack-b, as train/run makes them)")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "weights", "segattn-s16.safetensors"))
    ap.add_argument("--log", default=os.path.join(HERE, "log.csv"))
    ap.add_argument("--curves", default=os.path.join(HERE, "curves.png"))
    ap.add_argument("--dim", type=int, default=192, help="token width; heads of 64")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=233)
    ap.add_argument("--minutes", type=float, default=0, help="fewer epochs if they would not fit in this time (decided after 2 epochs)")
    ap.add_argument("--low-res-epochs", type=int, default=0,
                    help="draw the first this many epochs at a short side of 128 instead of 224 (cheaper; the rest adapt to 224)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup-epochs", type=int, default=5)
    ap.add_argument("--attention-weight", type=float, default=0.5)
    ap.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the last block (linear from 0 in the first)")
    ap.add_argument("--init", metavar="FILE", help="start from a file this script wrote instead of from scratch")
    ap.add_argument("--decoder", action=argparse.BooleanOptionalAction, default=True,
                    help="train the decoder with skips from the stem, the shipped head (--no-decoder: the sub-patch head alone)")
    ap.add_argument("--freeze-encoder", action="store_true", help="train only the decoder and the per-patch head (with --init)")
    ap.add_argument("--zoom-out", type=float, default=0.3, help="share of crops zoomed out: the photo inside a box of 1-3x its area")
    ap.add_argument("--val-every", type=int, default=10, help="validate every this many epochs (and after the last)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU (AVX512-BF16 / AMX); always on a GPU")
    ap.add_argument("--limit", type=int, default=0, help="train on this many photos only (smoke test)")
    a = ap.parse_args()
    if a.freeze_encoder and not (a.init and a.decoder):
        ap.error("--freeze-encoder trains a decoder on a trained encoder: give --init FILE and --decoder")
    if a.minutes and a.low_res_epochs:
        ap.error("--minutes times epoch 2 to pace the rest, which --low-res-epochs makes cheaper than the rest: give --epochs")
    if a.low_res_epochs >= a.epochs:
        ap.error("--low-res-epochs must leave epochs at 224 for the model to adapt to the size it runs at")
    torch.manual_seed(a.seed); random.seed(a.seed); np.random.seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = random.Random(a.seed)
    device_type = a.device.split(":")[0]
    torch.backends.cudnn.benchmark = True

    t0 = time.time()
    canvas, sizes, val = read_packs(a.packed or [os.path.join(HERE, ".work", p) for p in ("pack-a", "pack-b")], a.device)
    if a.limit:
        keep = random.Random(a.seed).sample(range(len(sizes)), a.limit)
        canvas, sizes = canvas[keep], [sizes[i] for i in keep]
    print(f"{len(sizes)} training photos, {len(val)} validation photos, read in {time.time() - t0:.0f} s", flush=True)

    if a.init:
        model = SegAttnViT.from_exported(a.init, a.decoder, a.drop_path).to(a.device)
        start = f"; from {os.path.basename(a.init)} ({read_exported(a.init)[1].get('segattn_trained', 'no recipe recorded')})"
    else:
        model = SegAttnViT(dim=a.dim, depth=a.depth, heads=a.dim // 64, drop_path=a.drop_path, decoder=a.decoder).to(a.device)
        start = ""
    # NHWC: cuDNN runs the stem's convolutions on tensor cores without transposing.
    layout = torch.channels_last if device_type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=layout)
    if a.freeze_encoder:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("decoder.", "patch_head.")))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    rest = [p for n, p in trained if not (p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=a.lr,
                            fused=device_type == "cuda")
    steps_per_epoch = len(sizes) // a.batch
    warmup = max(2, a.warmup_epochs) * steps_per_epoch
    epochs = a.epochs
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, epochs * steps_per_epoch - warmup)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    log_rows = []
    epoch, started = 0, time.time()
    while epoch < epochs:
        epoch += 1
        te = time.time()
        order = list(range(len(sizes)))
        rng.shuffle(order)
        seg_losses = []
        grids = LOW_RES_GRIDS if epoch <= a.low_res_epochs else GRIDS
        for step in range(steps_per_epoch):
            rows, cols = grids[rng.randrange(len(grids))]
            x, y = augmented_batch(canvas, sizes, order[step * a.batch:(step + 1) * a.batch], rows, cols, rng, a.zoom_out)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=a.bf16 or device_type == "cuda"):
                _, fine, coarse, decoded, cls_attention = model(x.contiguous(memory_format=layout), keep_cls_attention=True)
            seg = segmentation_loss(fine, y)
            loss = 0.5 * segmentation_loss(coarse, y)
            if not a.freeze_encoder:
                loss = loss + seg + a.attention_weight * attention_loss(cls_attention.float(), y)
            if decoded is not None:
                # The decoder ships; the sub-patch head stays trained beside it.
                seg = segmentation_loss(decoded, y)
                loss = loss + seg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trained], 1.0)
            opt.step(); sched.step()
            seg_losses.append(seg.detach())
        row = {"epoch": epoch, "train_loss": float(torch.stack(seg_losses).mean())}
        if epoch <= 2 and a.minutes:
            # Decided before the cosine decay starts (warm-up is 2 epochs or
            # more), so the schedule is the one --epochs N gives. Epoch 2 is
            # the pace: epoch 1 and its validation pay cuDNN's autotuning for
            # every new shape (on the H100 the first validation took 9 s, the
            # later ones 1 s), so both are run and only the second is timed.
            per_epoch, tv = time.time() - te, time.time()
            row.update(validate(model, val))
            per_validation = time.time() - tv
            if epoch == 2:
                left = a.minutes * 60 - (time.time() - started)
                fit = 2 + int(left / (per_epoch + per_validation / a.val_every))
                if fit < epochs:
                    print(f"{epochs} epochs would not fit in {a.minutes} minutes: {fit}", flush=True)
                    epochs = fit
        elif epoch % a.val_every == 0 or epoch == epochs:
            row.update(validate(model, val))
        row["seconds"] = round(time.time() - te, 1)
        log_rows.append(row)
        print(json.dumps(row), flush=True)
        write_log(log_rows, a.log)
    plot([r for r in log_rows if "val_loss" in r], a.curves)
    # The last epoch ships: choosing one by validation score would tune on the validation list.
    tensors = export_tensors(model.cpu())
    iou = log_rows[-1]["decoder_iou" if model.decoder is not None else "fine_iou"]
    meta = {"config": config_json(model), "segattn_short_side": str(SHORT_SIDE),
            "segattn_trained": f"train/train.py, seed {a.seed}, {epochs} epochs of {len(sizes)} photos, {model.cls_token.shape[-1]} wide, "
                               f"{len(model.blocks)} deep{', decoder' if model.decoder is not None else ''}, batch {a.batch}, "
                               f"lr {a.lr}, drop path {a.drop_path}, zoom-out {a.zoom_out}"
                               f"{f', first {a.low_res_epochs} at 128 px' if a.low_res_epochs else ''}"
                               f"{', encoder frozen' if a.freeze_encoder else ''}, on {device_type}, "
                               f"validation IoU {iou:.3f}{start}"}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_file({k: t.half() for k, t in tensors.items()}, a.out + ".tmp", metadata=meta)
    os.replace(a.out + ".tmp", a.out)
    print(f"wrote {a.out}: {epochs} epochs, validation IoU {iou:.3f}; {time.time() - t0:.0f} s in all", flush=True)


def write_log(log_rows, path):
    fields = list(dict.fromkeys(k for r in log_rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields); w.writeheader(); w.writerows(log_rows)


if __name__ == "__main__":
    main()
