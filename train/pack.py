"""Packs the training set as train.py reads it: each photo and its mask
squashed to CANVAS x CANVAS (WebP), with the photo's size, and the two
validation lists (the model's input at short side 224, and the mask). The
pack is a few tar files (`--parts`), so it travels to another machine as a
few files rather than thousands, and the same bytes train on any machine.

Data (see ../shared/data/README.md), masks drawn by people: DUTS-TR (less the
500 photos of train/val_duts.txt), PASCAL-S (less the 150 of
train/val_list.txt), Weizmann horses; made by a background-removal service:
people-removebg; made by the IS-Net teacher: the photos/ folders, with their
masks in ../shared/data/teacher. Photos match masks by file stem, whatever
their format.

    python train/pack.py train/.work/pack                 # as train/run packs it
    python train/pack.py /tmp/slot --canvas 224 --quality 70 --parts 3
    python train/train.py --packed train/.work/pack
"""
import argparse
import io
import json
import os
import random
import tarfile

import numpy as np
from PIL import Image, ImageOps

HERE = os.path.dirname(os.path.abspath(__file__))
SHORT_SIDE = 224  # the input's short side at inference, segattn's default for this model
CANVAS = 256  # default side of the squashed photos training crops are taken from
HUMAN = ["salient/duts-tr", "salient/pascal-s", "salient/horses", "salient/people-removebg"]
# The fixed validation lists: name, photo folder, the file of photo stems.
VALIDATION = {"pascal-s": ("salient/pascal-s", "val_list.txt"), "duts-tr": ("salient/duts-tr", "val_duts.txt")}


def list_names(list_file):
    return open(os.path.join(HERE, list_file)).read().split()


def held_out():
    """(photo folder, stem) of every validation photo, never trained on."""
    return {(folder, stem) for folder, names in VALIDATION.values() for stem in list_names(names)}


def photos_by_stem(folder):
    return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))}


def training_pairs(data):
    """(photo, mask) of every training photo, in a fixed order."""
    skip = held_out()
    pairs = []
    for folder in HUMAN:
        photos = photos_by_stem(os.path.join(data, folder, "images"))
        for stem, photo in photos.items():
            if (folder, stem) not in skip:
                pairs.append((photo, os.path.join(data, folder, "masks", stem + ".png")))
    # The teacher's masks of photos/<folder>, in teacher/<folder>.
    teacher = os.path.join(data, "teacher")
    for folder in sorted(os.listdir(teacher)):
        photos = photos_by_stem(os.path.join(data, "photos", folder))
        for f in sorted(os.listdir(os.path.join(teacher, folder))):
            stem = os.path.splitext(f)[0]
            if f.endswith(".png") and stem in photos:
                pairs.append((photos[stem], os.path.join(teacher, folder, f)))
    missing = [m for _, m in pairs if not os.path.exists(m)]
    if missing:
        raise SystemExit(f"{missing[0]}: no such mask ({len(missing)} missing)")
    return pairs


def squashed_pair(photo, mask, canvas):
    """Photo and mask resized to canvas x canvas, aspect not kept (so a batch
    is one tensor); crops take the aspect back from the photo's own (width,
    height). A mask of another size than its photo is an error: it would
    be stretched off its object."""
    img = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
    m = Image.open(mask).convert("L")
    if m.size != img.size:
        raise SystemExit(f"{mask}: {m.size[0]}x{m.size[1]}, its photo {photo} is {img.size[0]}x{img.size[1]}")
    return img.resize((canvas, canvas), Image.BICUBIC), m.resize((canvas, canvas), Image.BILINEAR), img.size


def val_input(path, short_side=SHORT_SIDE):
    """The photo as segattn feeds it to the model: the short side resized to
    `short_side`, each side a multiple of 16, RGB u8; and the photo's (width, height)."""
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = img.size
    s = short_side / min(w, h)
    cols, rows = max(1, round(w * s / 16)), max(1, round(h * s / 16))
    return np.asarray(img.resize((16 * cols, 16 * rows), Image.BICUBIC)), (w, h)


def encoded(image, fmt, **options):
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def read_pack(path):
    """A part pack_part() wrote: its index and a function reading a member's bytes."""
    tar = tarfile.open(path)
    return json.load(tar.extractfile("index.json")), lambda name: tar.extractfile(name).read()


def pack_part(path, pairs, validation, canvas, quality):
    """Writes one part: index.json ({"train": [[photo, mask, w, h]...],
    "val": {list: [[photo, mask]...]}}) and the WebP / PNG files it names."""
    index = {"canvas": canvas, "train": [], "val": {}}
    with tarfile.open(path + ".tmp", "w") as tar:
        for i, (photo, mask) in enumerate(pairs):
            rgb, alpha, (w, h) = squashed_pair(photo, mask, canvas)
            stem = f"{i:05d}"
            add(tar, stem + ".webp", encoded(rgb, "WEBP", quality=quality))
            add(tar, stem + ".mask.webp", encoded(alpha, "WEBP", quality=min(100, quality + 10)))
            index["train"].append([stem + ".webp", stem + ".mask.webp", w, h])
        for name, photos in validation.items():
            index["val"][name] = []
            for photo, mask in photos:
                stem = f"val-{name}-{os.path.splitext(os.path.basename(photo))[0]}"
                add(tar, stem + ".webp", encoded(Image.fromarray(val_input(photo)[0]), "WEBP", quality=95))
                add(tar, stem + ".png", encoded(Image.open(mask).convert("L"), "PNG", optimize=True))
                index["val"][name].append([stem + ".webp", stem + ".png"])
        add(tar, "index.json", json.dumps(index).encode())
    os.replace(path + ".tmp", path)
    return index


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for the parts (part-K-of-N.tar)")
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--canvas", type=int, default=CANVAS, help="side of the squashed photos")
    ap.add_argument("--quality", type=int, default=80, help="WebP quality of the squashed photos")
    ap.add_argument("--parts", type=int, default=1, help="split into this many files of about equal size")
    ap.add_argument("--limit", type=int, default=0, help="this many training photos only, drawn at random (tests)")
    a = ap.parse_args()
    if not 16 <= a.canvas <= 1024 or not 1 <= a.quality <= 100 or a.parts < 1:
        ap.error("--canvas is 16-1024, --quality 1-100, --parts at least 1")
    pairs = training_pairs(a.data)
    if a.limit:
        pairs = sorted(random.Random(0).sample(pairs, min(a.limit, len(pairs))))
    validation = {}
    for name, (folder, names) in VALIDATION.items():
        photos = photos_by_stem(os.path.join(a.data, folder, "images"))
        validation[name] = [(photos[s], os.path.join(a.data, folder, "masks", s + ".png")) for s in list_names(names) if s in photos]
        if not a.limit and len(validation[name]) != len(list_names(names)):
            raise SystemExit(f"{os.path.join(a.data, folder)}: photos of train/{names} missing")
        if a.limit:
            validation[name] = validation[name][:8]
    os.makedirs(a.out, exist_ok=True)
    for old in os.listdir(a.out):
        if old.startswith("part-") and old.endswith(".tar"):
            os.remove(os.path.join(a.out, old))
    for k in range(a.parts):
        # Every parts-th photo, so each part holds a share of every source;
        # the validation lists go in the first.
        index = pack_part(os.path.join(a.out, f"part-{k + 1}-of-{a.parts}.tar"), pairs[k::a.parts],
                          validation if k == 0 else {}, a.canvas, a.quality)
        print(f"{a.out}: part {k + 1} of {a.parts}, {len(index['train'])} training photos, "
              f"validation {', '.join(f'{n} {len(v)}' for n, v in index['val'].items()) or 'none'}", flush=True)


if __name__ == "__main__":
    main()
