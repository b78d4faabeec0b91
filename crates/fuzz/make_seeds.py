"""Writes the fuzz targets' seed corpus, crates/fuzz/seeds/<target>/: small
valid inputs of every kind each target reads, for the fuzzer to mutate.

Run from the repository root with the training environment's Python
(torch, safetensors and Pillow; train/requirements.txt):

    train/.venv/bin/python crates/fuzz/make_seeds.py

The seeds are small on purpose (a 1-layer ViT of width 8, 16x12 photos):
mutations of a small input reach more of the reader per second.
"""

import json
import os
import struct
import zipfile

import torch
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "tests", "fixtures")
torch.manual_seed(0)


def seed_dir(target):
    path = os.path.join(HERE, "seeds", target)
    os.makedirs(path, exist_ok=True)
    return path


def photos():
    out = seed_dir("decode")
    image = Image.new("RGB", (16, 12))
    image.putdata([(x * 16, y * 20, (x + y) * 8) for y in range(12) for x in range(16)])
    for fmt, ext, kwargs in [
        ("JPEG", "jpg", {"quality": 80}),
        ("JPEG", "progressive.jpg", {"quality": 80, "progressive": True}),
        ("PNG", "png", {}),
        ("WEBP", "webp", {"quality": 60}),
        ("WEBP", "lossless.webp", {"lossless": True}),
        ("BMP", "bmp", {}),
        ("TIFF", "tif", {}),
        ("GIF", "gif", {}),
    ]:
        image.save(os.path.join(out, f"photo.{ext}"), fmt, **kwargs)
    image.convert("LA").save(os.path.join(out, "grey-alpha.png"), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the decoder turns it upright
    image.save(os.path.join(out, "rotated.jpg"), "JPEG", exif=exif.tobytes())


def tiny(shape, scale=0.5):
    return torch.randn(shape) * scale


def vit_tensors(hidden=8, mlp=16, patch=4, positions=17):
    """A 1-layer ViT under the Hugging Face 4.x names."""
    block = "encoder.layer.0."
    tensors = {
        "embeddings.cls_token": tiny((1, 1, hidden)),
        "embeddings.position_embeddings": tiny((1, positions, hidden)),
        "embeddings.patch_embeddings.projection.weight": tiny((hidden, 3, patch, patch)),
        "embeddings.patch_embeddings.projection.bias": tiny((hidden,)),
        "layernorm.weight": 1 + tiny((hidden,), 0.1),
        "layernorm.bias": tiny((hidden,), 0.1),
    }
    for name in ["attention.attention.query", "attention.attention.key", "attention.attention.value",
                 "attention.output.dense"]:
        tensors[f"{block}{name}.weight"] = tiny((hidden, hidden))
        tensors[f"{block}{name}.bias"] = tiny((hidden,))
    tensors[f"{block}intermediate.dense.weight"] = tiny((mlp, hidden))
    tensors[f"{block}intermediate.dense.bias"] = tiny((mlp,))
    tensors[f"{block}output.dense.weight"] = tiny((hidden, mlp))
    tensors[f"{block}output.dense.bias"] = tiny((hidden,))
    for norm in ["layernorm_before", "layernorm_after"]:
        tensors[f"{block}{norm}.weight"] = 1 + tiny((hidden,), 0.1)
        tensors[f"{block}{norm}.bias"] = tiny((hidden,), 0.1)
    return tensors


def hub_tensors(hidden=8, mlp=16, patch=4, positions=17, registers=2):
    """A 1-layer DINOv2 with registers under the torch-hub names (fused qkv, layer scale)."""
    tensors = {
        "cls_token": tiny((1, 1, hidden)),
        "register_tokens": tiny((1, registers, hidden)),
        "mask_token": tiny((1, hidden)),
        "pos_embed": tiny((1, positions, hidden)),
        "patch_embed.proj.weight": tiny((hidden, 3, patch, patch)),
        "patch_embed.proj.bias": tiny((hidden,)),
        "norm.weight": 1 + tiny((hidden,), 0.1),
        "norm.bias": tiny((hidden,), 0.1),
        "blocks.0.attn.qkv.weight": tiny((3 * hidden, hidden)),
        "blocks.0.attn.qkv.bias": tiny((3 * hidden,)),
        "blocks.0.attn.proj.weight": tiny((hidden, hidden)),
        "blocks.0.attn.proj.bias": tiny((hidden,)),
        "blocks.0.ls1.gamma": tiny((hidden,)),
        "blocks.0.ls2.gamma": tiny((hidden,)),
        "blocks.0.mlp.fc1.weight": tiny((mlp, hidden)),
        "blocks.0.mlp.fc1.bias": tiny((mlp,)),
        "blocks.0.mlp.fc2.weight": tiny((hidden, mlp)),
        "blocks.0.mlp.fc2.bias": tiny((hidden,)),
    }
    for norm in ["norm1", "norm2"]:
        tensors[f"blocks.0.{norm}.weight"] = 1 + tiny((hidden,), 0.1)
        tensors[f"blocks.0.{norm}.bias"] = tiny((hidden,), 0.1)
    return tensors


VIT_CONFIG = {
    "model_type": "vit", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
    "intermediate_size": 16, "patch_size": 4, "image_size": 16, "hidden_act": "gelu",
    "layer_norm_eps": 1e-12, "qkv_bias": True,
}
DINOV2_CONFIG = {
    "model_type": "dinov2_with_registers", "hidden_size": 8, "num_attention_heads": 2,
    "num_hidden_layers": 1, "mlp_ratio": 2, "patch_size": 4, "image_size": 16,
    "hidden_act": "gelu", "layer_norm_eps": 1e-6, "num_register_tokens": 2, "layerscale_value": 1.0,
}


def checkpoints():
    out = seed_dir("safetensors_checkpoint")
    save_file(vit_tensors(), os.path.join(out, "vit.safetensors"), {"config": json.dumps(VIT_CONFIG)})
    half = {k: v.half() for k, v in vit_tensors().items()}
    save_file(half, os.path.join(out, "vit-f16.safetensors"), {"config": json.dumps(VIT_CONFIG)})
    save_file(hub_tensors(), os.path.join(out, "dinov2-hub.safetensors"), {"config": json.dumps(DINOV2_CONFIG)})
    # No configuration: every field inferred from the tensors.
    save_file(vit_tensors(), os.path.join(out, "vit-no-config.safetensors"))

    out = seed_dir("config_json")
    with open(os.path.join(FIXTURES, "dino_vit", "config.json")) as f:
        fixture = json.load(f)
    variants = {
        "fixture.json": fixture,
        "minimal.json": {"num_attention_heads": 4},
        "gelu-new.json": {**fixture, "hidden_act": "gelu_new", "layer_norm_eps": 1e-6},
        "dinov2.json": {**fixture, "model_type": "dinov2", "mlp_ratio": 4, "layerscale_value": 1.0},
    }
    for name, config in variants.items():
        with open(os.path.join(out, name), "w") as f:
            json.dump(config, f, indent=1)

    out = seed_dir("pickle_checkpoint")
    with zipfile.ZipFile(os.path.join(FIXTURES, "dino_vit_pickle", "pytorch_model.bin")) as archive:
        pickle = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        with open(os.path.join(out, "data.pkl"), "wb") as f:
            f.write(archive.read(pickle))


def heads():
    """Heads for tests/fixtures/dino_vit (hidden size 32), which the target loads."""
    out = seed_dir("head_file")
    save_file({"head.weight": tiny((32,)), "head.bias": tiny((1,))}, os.path.join(out, "per-patch.safetensors"))
    save_file({"head.weight": tiny((4, 32)), "head.bias": tiny((4,))}, os.path.join(out, "split-2.safetensors"))
    save_file({"head.weight": tiny((32,)).half(), "head.bias": tiny((1,)).half()},
              os.path.join(out, "f16.safetensors"), {"segattn_backbone_fingerprint": "0000000000000000"})


def fnv1a_64(data):
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def checksum(parts):
    """src/model/panel_cache.rs's checksum."""
    sums = []
    mask = (1 << 64) - 1
    for part in parts:
        for c in range(0, max(len(part), 1), 1 << 20):
            chunk = part[c:c + (1 << 20)]
            a, b = [0] * 8, [0] * 8
            whole = len(chunk) // 64 * 64
            for block in range(0, whole, 64):
                for lane in range(8):
                    word = struct.unpack_from("<Q", chunk, block + 8 * lane)[0]
                    a[lane] = (a[lane] + word) & mask
                    b[lane] = (b[lane] + a[lane]) & mask
            sums += a + b + [fnv1a_64(chunk[whole:]), len(chunk)]
    return "%016x" % fnv1a_64(b"".join(struct.pack("<Q", s) for s in sums))


def panel_file(layout, lanes, shapes):
    """A panel cache file under the key "fuzz" for `layout`, whose panels are `lanes` wide
    (None: the whole width, as the gemm crate's layout)."""
    parts, weights, start = [], [], 0
    for i, (outputs, inputs) in enumerate(shapes):
        width = lanes or outputs
        values = -(-outputs // width) * inputs * width
        parts.append(struct.pack(f"<{values}f", *[(i % 7) * 0.25 for i in range(values)]))
        weights.append({"name": f"w{i}.weight", "outputs": outputs, "inputs": inputs, "layout": layout, "start": start})
        start += values
    header = json.dumps({"key": "fuzz", "checksum": checksum(parts), "weights": weights}).encode()
    padding = -(24 + len(header)) % 64
    return b"segattn panels\0\x02" + struct.pack("<Q", len(header)) + header + b"\0" * padding + b"".join(parts)


def panels():
    """One file per f32 kernel layout: the target reads the one this CPU runs."""
    out = seed_dir("panel_cache")
    shapes = [(24, 8), (8, 8), (20, 8), (8, 16)]
    for name, layout, lanes in [("avx512", "register tiles, AVX-512", 16), ("avx2", "register tiles, AVX2", 8),
                                ("gemm", "gemm crate", None)]:
        with open(os.path.join(out, f"{name}.panels"), "wb") as f:
            f.write(panel_file(layout, lanes, shapes))


def plans():
    """Trees and command lines for output_plan: flags, places, then (kind, name) pairs."""
    out = seed_dir("output_plan")
    photo, output, fifo, link, directory, loop = 0, 1, 2, 3, 4, 5
    cases = {
        "folder.bin": (0, 0, [(photo, 0), (photo, 3), (photo, 5)]),
        "beside-photos.bin": (0b0100_0101, 1, [(photo, 0), (output, 2), (photo, 1), (fifo, 10)]),
        "overwrite.bin": (0b0011_0010, 0, [(photo, 0), (photo, 11), (output, 14), (link, 9)]),
        "skip-existing.bin": (0b0000_0101, 4, [(photo, 0), (photo, 3), (output, 11), (directory, 6)]),
        "recursive-loop.bin": (0b1000_0001, 12, [(photo, 5), (loop, 6), (photo, 8), (fifo, 7)]),
        "single.bin": (0b0000_1000, 1, [(photo, 0), (output, 1), (link, 9)]),
    }
    for name, (flags, places, entries) in cases.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(bytes([flags, places] + [b for pair in entries for b in pair]))


if __name__ == "__main__":
    photos()
    checkpoints()
    heads()
    panels()
    plans()
