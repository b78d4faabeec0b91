"""Reference outputs of the shipped model for the Rust parity test
(tests/builtin_model.rs), computed in PyTorch from the exported file itself.

    train/.venv/bin/python train/make_reference.py   # after train/run

For each photo: the resized RGB input (u8, so both sides normalize the same
bytes), the final tokens, the last layer's class-token attention per head,
and the soft masks at the input's size of the sub-patch head and, where
the file has one, the decoder (logits upsampled bilinearly, then the
sigmoid, as segattn does).
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model import ExportedViT
from pack import val_input
from train import MEAN, STD

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
PHOTOS = ["cat", "astronaut"]


def main():
    path = os.path.join(ROOT, "weights", "segattn-s16.safetensors")
    model, meta = ExportedViT.load(path)
    short = int(meta["segattn_short_side"])
    out = {}
    for name in PHOTOS:
        rgb, _ = val_input(os.path.join(ROOT, "samples", name + ".jpg"), short)
        rows, cols = rgb.shape[0] // 16, rgb.shape[1] // 16
        x = (torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255 - MEAN) / STD
        tokens, fine, decoded, cls_attention = model(x)
        soft = lambda logits: F.interpolate(logits, size=(16 * rows, 16 * cols), mode="bilinear",
                                            align_corners=False).sigmoid()[0, 0].contiguous()
        out[f"{name}.rgb"] = torch.from_numpy(rgb.copy())
        out[f"{name}.tokens"] = tokens[0].contiguous()
        out[f"{name}.cls_attention"] = cls_attention[0].contiguous()
        out[f"{name}.soft"] = soft(fine)
        if decoded is not None:
            out[f"{name}.decoder_soft"] = soft(decoded)
    dst = os.path.join(ROOT, "tests", "fixtures", "builtin", "reference.safetensors")
    save_file(out, dst)
    print(f"wrote {dst}: {', '.join(PHOTOS)}")


if __name__ == "__main__":
    main()
