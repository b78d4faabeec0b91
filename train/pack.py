"""Packs the training set as train.py reads it: each photo and its mask
squashed to CANVAS x CANVAS (WebP), with the photo's size, and the
validation list (the model's input at short side 224, and its graded mask).
Small enough to carry to another machine (some 80 MB), and the same bytes
train on any machine.

Data (see ../shared/data/README.md): PASCAL-S (minus the 150 photos of
train/val_list.txt, kept for validation), people-removebg, Weizmann horses,
the IS-Net teacher's masks in ../shared/data/teacher, and those train/label
makes (--labelled: flickr-1000, imagenet-sample, imagenet-200x5).

    python train/pack.py train/.work/pack-a --val          # ../shared/data's masks
    python train/pack.py train/.work/pack-b --only-labelled --labelled flickr-1000 ...
    python train/train.py                 # reads train/.work/pack-a and pack-b
"""
import argparse
import json
import os

import numpy as np
from PIL import Image, ImageOps

HERE = os.path.dirname(os.path.abspath(__file__))
SHORT_SIDE = 224  # the input's short side at inference, segattn's default for this model
CANVAS = 256  # side of the squashed photos training crops are taken from


def squashed_pair(photo, mask):
    """Photo and mask resized to CANVAS x CANVAS, aspect not kept (so a batch
    is one tensor), stacked as RGBA u8; crops take the aspect back from the
    photo's own (width, height)."""
    img = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
    m = Image.open(mask).convert("L")
    size = img.size
    rgb = np.asarray(img.resize((CANVAS, CANVAS), Image.BICUBIC))
    alpha = np.asarray(m.resize((CANVAS, CANVAS), Image.BILINEAR))
    return np.concatenate([rgb, alpha[..., None]], -1), size


def training_pairs(data, label_dirs):
    val = set(val_names())
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


def val_names():
    return open(os.path.join(HERE, "val_list.txt")).read().split()


def val_input(path, short_side=SHORT_SIDE):
    """The photo as segattn feeds it to the model: the short side resized to
    `short_side`, each side a multiple of 16, RGB u8; and the photo's (width, height)."""
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = img.size
    s = short_side / min(w, h)
    cols, rows = max(1, round(w * s / 16)), max(1, round(h * s / 16))
    return np.asarray(img.resize((16 * cols, 16 * rows), Image.BICUBIC)), (w, h)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--labelled", action="append", default=[], metavar="FOLDER", help="a photos/ folder whose teacher masks train/label made in train/.work/labels")
    ap.add_argument("--only-labelled", action="store_true", help="only the photos train/label's masks add")
    ap.add_argument("--val", action="store_true", help="also the validation list")
    a = ap.parse_args()
    labels = os.path.join(HERE, ".work", "labels")
    pairs = training_pairs(a.data, [os.path.join(labels, f) for f in a.labelled])
    os.makedirs(a.out, exist_ok=True)
    index = {"train": [], "val": []}
    for photo, mask in pairs:
        if a.only_labelled and not mask.startswith(labels):
            continue
        rgba, (w, h) = squashed_pair(photo, mask)
        stem = f"{len(index['train']):05d}"
        Image.fromarray(np.ascontiguousarray(rgba[..., :3])).save(os.path.join(a.out, stem + ".webp"), quality=80)
        Image.fromarray(np.ascontiguousarray(rgba[..., 3])).save(os.path.join(a.out, stem + ".mask.webp"), quality=90)
        index["train"].append([stem + ".webp", stem + ".mask.webp", w, h])
    if a.val:
        for name in val_names():
            rgb, _ = val_input(os.path.join(a.data, "salient/pascal-s/images", name + ".jpg"))
            Image.fromarray(rgb).save(os.path.join(a.out, "val-" + name + ".webp"), quality=95)
            Image.open(os.path.join(a.data, "salient/pascal-s/masks", name + ".png")).convert("L").save(os.path.join(a.out, "val-" + name + ".png"), optimize=True)
            index["val"].append(["val-" + name + ".webp", "val-" + name + ".png"])
    json.dump(index, open(os.path.join(a.out, "index.json"), "w"))
    print(f"{a.out}: {len(index['train'])} training photos, {len(index['val'])} validation photos")


if __name__ == "__main__":
    main()
