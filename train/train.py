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
import copy
import csv
import io
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
import state
from pack import SHORT_SIDE, VALIDATION, read_pack

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


def crop_boxes(sizes, rows, cols, gen, zoom_out=0.0):
    """Random resized crops of photos of `sizes` ((B, 2) widths and heights, a
    float tensor), as (B, 4) boxes (x0, y0, x1, y1) in fractions of each
    photo: area 30-100 %, aspect jittered around the target grid's, the
    first of 10 draws that fits the photo (else the largest box of the
    target aspect). With probability `zoom_out` a box is 1-3 times the
    photo's area instead, the photo somewhere inside it: the object comes
    out smaller than at test. All drawn at once from `gen` on its device."""
    b, device = sizes.shape[0], sizes.device
    uniform = lambda *shape, low=0.0, high=1.0: low + (high - low) * torch.rand(*shape, generator=gen, device=device)
    w, h = sizes[:, :1], sizes[:, 1:]
    target_aspect = cols / rows
    area = uniform(b, 10, low=0.3) * w * h
    aspect = target_aspect * torch.exp(uniform(b, 10, low=-0.25, high=0.25))
    cw, ch = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (cw <= w) & (ch <= h)
    first = fits.int().argmax(1, keepdim=True)
    largest_w, largest_h = torch.minimum(w, (h * target_aspect).round()), torch.minimum(h, (w / target_aspect).round())
    cw = torch.where(fits.any(1, keepdim=True), cw.gather(1, first), largest_w)
    ch = torch.where(fits.any(1, keepdim=True), ch.gather(1, first), largest_h)
    x0, y0 = (uniform(b, 1) * (w - cw + 1)).floor(), (uniform(b, 1) * (h - ch + 1)).floor()
    boxes = torch.cat([x0 / w, y0 / h, (x0 + cw) / w, (y0 + ch) / h], 1)
    if not zoom_out:
        return boxes
    area = uniform(b, 1, low=1.0, high=3.0) * w * h
    aspect = target_aspect * torch.exp(uniform(b, 1, low=-0.25, high=0.25))
    cw, ch = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    # Per axis: around the whole photo where the box is wider, else a span of it.
    x0 = torch.where(cw > w, -uniform(b, 1) * (cw - w), uniform(b, 1) * (w - cw))
    y0 = torch.where(ch > h, -uniform(b, 1) * (ch - h), uniform(b, 1) * (h - ch))
    zoomed = torch.cat([x0 / w, y0 / h, (x0 + cw) / w, (y0 + ch) / h], 1)
    return torch.where(uniform(b, 1) < zoom_out, zoomed, boxes)


def augmented_batch(canvas, sizes, index, rows, cols, gen, zoom_out=0.0):
    """Random resized crops, flips and colour jitter of the photos `index` (a
    tensor) of `canvas` (N, 4, S, S) u8, whose photos had `sizes` ((N, 2)
    float), all drawn from `gen` and sampled in one pass on canvas's device,
    with no step per photo in Python; returns normalized pixels (B, 3,
    16·rows, 16·cols) and masks (B, 1, ...). Outside the photo (zoomed
    out), pixels are the normalization's mean and the mask is background."""
    device, b = canvas.device, len(index)
    uniform = lambda low, high: low + (high - low) * torch.rand(b, generator=gen, device=device)
    x0, y0, x1, y1 = crop_boxes(sizes[index], rows, cols, gen, zoom_out).T
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    # Output coordinates in [-1, 1] to the crop's in the squashed canvas.
    zero = torch.zeros_like(x0)
    theta = torch.stack([torch.stack([flip * (x1 - x0), zero, x0 + x1 - 1], 1),
                         torch.stack([zero, y1 - y0, y0 + y1 - 1], 1)], 1)
    grid = F.affine_grid(theta, (b, 4, 16 * rows, 16 * cols), align_corners=False)
    sample = lambda t, padding: F.grid_sample(t, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    pixels = canvas[index].float()
    if zoom_out:
        out = sample(pixels, "zeros") / 255
        outside = 1 - sample(torch.ones_like(pixels[:, :1]), "zeros")
        out[:, :3] += outside * MEAN.to(device)
    else:
        out = sample(pixels, "border") / 255
    x, m = out[:, :3], out[:, 3:]
    brightness, contrast = uniform(0.7, 1.3), uniform(0.7, 1.3)
    saturation = torch.where(uniform(0, 1) < 0.05, 0.0, uniform(0.6, 1.4))
    brightness, contrast, saturation = (v[:, None, None, None] for v in (brightness, contrast, saturation))
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
    """Each list of `val` scored as `segattn eval` scores it: mean IoU
    (probability >= 0.5 against truth >= 128) at the photo's size, MAE and
    max F (beta² 0.3) of each head, the shipped head's loss, and the share
    of the last layer's mean class-token attention over the patches that
    lands inside the object. PASCAL-S's keys are bare (as in earlier logs),
    the other lists' carry their name: duts_decoder_iou."""
    model.eval()
    out = {}
    for name, pairs in val.items():
        prefix = "" if name == "pascal-s" else name.split("-")[0] + "_"
        out |= {prefix + k: v for k, v in scores(model, pairs).items()}
    model.train()
    return out


def scores(model, pairs, batch=32):
    """validate()'s figures for one list. Photos of one input shape run as
    one batch, and the figures stay on the device until the end: a GPU is
    not held up by a launch and a sync per photo."""
    rows = {"fine": [], "coarse": []} | ({"decoder": []} if model.decoder is not None else {})
    losses, masses = [], []
    by_shape = {}
    for x, truth in pairs:
        by_shape.setdefault(tuple(x.shape), []).append((x, truth))
    chunks = [group[i:i + batch] for group in by_shape.values() for i in range(0, len(group), batch)]
    for chunk in chunks:
        _, fines, coarses, decodeds, cls_attentions = model(torch.cat([x for x, _ in chunk]), keep_cls_attention=True)
        for j, (_, truth) in enumerate(chunk):
            h, w = truth.shape
            fine, cls_attention = fines[j:j + 1], cls_attentions[j:j + 1]
            decoded = None if decodeds is None else decodeds[j:j + 1]
            gt = truth >= 0.5
            for key, logits in (("fine", fine), ("coarse", coarses[j:j + 1]), ("decoder", decoded)):
                if logits is None:
                    continue
                p = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).sigmoid()[0, 0]
                if key == ("decoder" if model.decoder is not None else "fine"):
                    losses.append(segmentation_loss(logits, truth[None, None]))
                pred = p >= 0.5
                iou = (pred & gt).sum() / (pred | gt).sum().clamp_min(1)
                # Pixels at or above each of 256 thresholds, from histograms.
                bins = (p * 255).round().long().flatten()
                hist_gt = torch.bincount(bins[gt.flatten()], minlength=256).double()
                hist_all = torch.bincount(bins, minlength=256).double()
                tp = hist_gt.flip(0).cumsum(0).flip(0)
                pp = hist_all.flip(0).cumsum(0).flip(0)
                rows[key].append((iou, (p - gt.float()).abs().mean(), tp / pp.clamp_min(1), tp / gt.sum().clamp_min(1)))
            att = cls_attention.mean(1)[0, 1:].float()
            att = att / att.sum()
            r, c = fine.shape[-2] // model.subpatch, fine.shape[-1] // model.subpatch
            inside = F.interpolate(gt[None, None].float(), size=(r * 16, c * 16), mode="bilinear", align_corners=False)
            inside = F.avg_pool2d(inside, 16).flatten()
            masses.append((att * inside).sum())
    out = {"val_loss": float(torch.stack(losses).mean()), "attention_mass": float(torch.stack(masses).mean())}
    for key, r in rows.items():
        precision = torch.stack([x[2] for x in r]).mean(0)
        recall = torch.stack([x[3] for x in r]).mean(0)
        f = (1.3 * precision * recall / (0.3 * precision + recall).clamp_min(1e-9)).max()
        out[f"{key}_iou"] = float(torch.stack([x[0] for x in r]).float().mean())
        out[f"{key}_mae"] = float(torch.stack([x[1] for x in r]).float().mean())
        out[f"{key}_maxf"] = float(f)
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
    if "duts_decoder_iou" in log_rows[-1]:
        b.plot(e, [r.get("duts_decoder_iou") for r in log_rows], "--", label="IoU, decoder, DUTS-TR list")
    b.set_xlabel("epoch"); b.set_ylim(0, 1); b.legend(loc="lower right", fontsize=8); b.grid(alpha=0.3)
    b.set_title("validation lists: PASCAL-S (150 photos), DUTS-TR (500)", fontsize=9)
    fig.tight_layout(); fig.savefig(path, dpi=100)


def read_packs(folder, device):
    """The squashed photos (N, 4, S, S) u8 on `device`, their photos' sizes
    ((N, 2) widths and heights, float, on `device`, as augmented_batch takes
    them), and the validation lists ({name: [(pixels, truth)]}), from the
    parts train/pack.py wrote into `folder` (all of them, or an error)."""
    parts = sorted(f for f in os.listdir(folder) if f.startswith("part-") and f.endswith(".tar"))
    counts = {f.rsplit("-of-", 1)[1] for f in parts}
    if not parts or len(counts) != 1 or len(parts) != int(counts.pop()[:-4]):
        raise SystemExit(f"{folder}: not a whole pack ({', '.join(parts) or 'no part-K-of-N.tar'}); run train/pack.py")
    canvas, sizes, val = [], [], {}
    decode = lambda data, mode: np.asarray(Image.open(io.BytesIO(data)).convert(mode))
    for part in parts:
        index, read = read_pack(os.path.join(folder, part))
        for photo, mask, w, h in index["train"]:
            canvas.append(np.concatenate([decode(read(photo), "RGB"), decode(read(mask), "L")[..., None]], -1))
            sizes.append((w, h))
        for name, pairs in index["val"].items():
            val[name] = [validation_pair(decode(read(p), "RGB"), decode(read(t), "L"), device) for p, t in pairs]
    val = {name: val[name] for name in VALIDATION if name in val}
    sizes = torch.tensor(sizes, dtype=torch.float32, device=device)
    return torch.from_numpy(np.stack(canvas)).permute(0, 3, 1, 2).contiguous().to(device), sizes, val


# Options of one process of a run; every other option is the run's recipe,
# fixed when it starts and read back from its state by --resume.
SESSION_OPTIONS = {"resume", "state", "stop_after", "slot_minutes", "device", "threads", "bf16", "packed", "out", "log", "curves"}


def arguments():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packed", default=os.path.join(HERE, ".work", "pack"), metavar="DIR",
                    help="the folder train/pack.py wrote (default: train/.work/pack, as train/run makes it)")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "weights", "segattn-s16.safetensors"))
    ap.add_argument("--log", default=os.path.join(HERE, "log.csv"))
    ap.add_argument("--curves", default=os.path.join(HERE, "curves.png"))
    ap.add_argument("--state", default=os.path.join(HERE, ".work", "run"), metavar="DIR",
                    help="where the run's state is written after every epoch (default: train/.work/run)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --state where it stopped, with its own recipe and schedule")
    ap.add_argument("--stop-after", type=int, default=0, metavar="EPOCH", help="stop after this epoch (state kept, to --resume)")
    ap.add_argument("--slot-minutes", type=float, default=0,
                    help="stop, state kept, before an epoch that would end past this many minutes from the start")
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
    if a.resume:
        saved = state.read(a.state)
        changed = [k for k, v in vars(a).items()
                   if k not in SESSION_OPTIONS and v != ap.get_default(k) and v != saved["args"][k]]
        if changed:
            started_with = ", ".join("--" + k.replace("_", "-") + " " + str(saved["args"][k]) for k in changed)
            ap.error(f"--resume continues the run's own recipe; it was started with {started_with}")
        for k, v in saved["args"].items():
            if k not in SESSION_OPTIONS:
                setattr(a, k, v)
    elif state.exists(a.state) and (s := state.read(a.state))["epoch"] < s["epochs"]:
        ap.error(f"{a.state} holds an unfinished run (epoch {s['epoch']} of {s['epochs']}): --resume it, or give another --state")
    if a.freeze_encoder and not (a.init and a.decoder):
        ap.error("--freeze-encoder trains a decoder on a trained encoder: give --init FILE and --decoder")
    if a.minutes and a.low_res_epochs:
        ap.error("--minutes times epoch 2 to pace the rest, which --low-res-epochs makes cheaper than the rest: give --epochs")
    if a.low_res_epochs >= a.epochs:
        ap.error("--low-res-epochs must leave epochs at 224 for the model to adapt to the size it runs at")
    return a


def main():
    a = arguments()
    torch.manual_seed(a.seed); random.seed(a.seed); np.random.seed(a.seed)
    torch.set_num_threads(a.threads)
    # Python's draws the epoch's order and each batch's grid (the shapes are
    # the host's to choose); the generator on the device draws the crops.
    rng = random.Random(a.seed)
    gen = torch.Generator(device=a.device)
    gen.manual_seed(a.seed)
    device_type = a.device.split(":")[0]
    torch.backends.cudnn.benchmark = True

    t0 = time.time()
    canvas, sizes, val = read_packs(a.packed, a.device)
    if a.limit:
        keep = random.Random(a.seed).sample(range(len(sizes)), a.limit)
        canvas, sizes = canvas[keep], sizes[keep]
    print(f"{len(sizes)} training photos, validation {', '.join(f'{n} {len(v)}' for n, v in val.items())}, "
          f"read in {time.time() - t0:.0f} s", flush=True)
    data = {"photos": len(sizes), "canvas": canvas.shape[-1]}

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

    log_rows, epoch = [], 0
    if a.resume:
        saved = state.load(a.state, model, opt, sched, rng, gen)
        if saved["data"] != data:
            raise SystemExit(f"{a.packed}: {data}, the run in {a.state} trained on {saved['data']}")
        log_rows, epoch, epochs = saved["log"], saved["epoch"], saved["epochs"]
        print(f"resumed {a.state} after epoch {epoch} of {epochs}", flush=True)
    started, epoch_seconds = time.time(), {}
    while epoch < epochs:
        epoch += 1
        te = time.time()
        order = list(range(len(sizes)))
        rng.shuffle(order)
        order = torch.tensor(order, device=a.device)
        seg_losses = []
        grids = LOW_RES_GRIDS if epoch <= a.low_res_epochs else GRIDS
        for step in range(steps_per_epoch):
            rows, cols = grids[rng.randrange(len(grids))]
            x, y = augmented_batch(canvas, sizes, order[step * a.batch:(step + 1) * a.batch], rows, cols, gen, a.zoom_out)
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
        row = {"epoch": epoch, "train_loss": float(torch.stack(seg_losses).mean()),
               "photos_per_s": round(steps_per_epoch * a.batch / (time.time() - te))}
        if epoch <= 2 and a.minutes and not a.resume:
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
        state.save(a.state, epoch, model, opt, sched, rng, gen,
                   {"args": {k: v for k, v in vars(a).items() if k not in SESSION_OPTIONS}, "epochs": epochs,
                    "data": data, "log": log_rows})
        resolution = epoch <= a.low_res_epochs
        epoch_seconds[resolution] = max(epoch_seconds.get(resolution, 0), time.time() - te)
        if epoch < epochs and (epoch == a.stop_after or a.slot_minutes and time.time() - t0 + epoch_seconds.get(
                epoch + 1 <= a.low_res_epochs, max(epoch_seconds.values())) > a.slot_minutes * 60):
            snapshot = os.path.join(a.state, "snapshot.safetensors")
            export(copy.deepcopy(model).cpu(), snapshot, weights_metadata(a, model, epoch, len(sizes), device_type, log_rows, start))
            print(f"stopped after epoch {epoch} of {epochs}, {time.time() - t0:.0f} s in all: state in {a.state} "
                  f"(continue with --resume --state {a.state}), its weights so far in {snapshot}", flush=True)
            return
    plot([r for r in log_rows if "val_loss" in r], a.curves)
    # The last epoch ships: choosing one by validation score would tune on the validation list.
    export(model.cpu(), a.out, weights_metadata(a, model, epochs, len(sizes), device_type, log_rows, start))
    print(f"wrote {a.out}: {epochs} epochs, validation IoU {last_iou(model, log_rows):.3f}; {time.time() - t0:.0f} s in this process",
          flush=True)


def last_iou(model, log_rows):
    scored = [r for r in log_rows if "val_loss" in r]
    return scored[-1]["decoder_iou" if model.decoder is not None else "fine_iou"] if scored else float("nan")


def weights_metadata(a, model, epochs, photos, device_type, log_rows, start):
    return {"config": config_json(model), "segattn_short_side": str(SHORT_SIDE),
            "segattn_trained": f"train/train.py, seed {a.seed}, {epochs} epochs of {photos} photos, {model.cls_token.shape[-1]} wide, "
                               f"{len(model.blocks)} deep{', decoder' if model.decoder is not None else ''}, batch {a.batch}, "
                               f"lr {a.lr}, drop path {a.drop_path}, zoom-out {a.zoom_out}"
                               f"{f', first {a.low_res_epochs} at 128 px' if a.low_res_epochs else ''}"
                               f"{', encoder frozen' if a.freeze_encoder else ''}, on {device_type}, "
                               f"validation IoU {last_iou(model, log_rows):.3f}{start}"}


def export(model, path, metadata):
    """The weights segattn reads, f16, written whole or not at all."""
    tensors = export_tensors(model)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: t.half() for k, t in tensors.items()}, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)


def write_log(log_rows, path):
    fields = list(dict.fromkeys(k for r in log_rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields); w.writeheader(); w.writerows(log_rows)


if __name__ == "__main__":
    main()
