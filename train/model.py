"""segattn's own model: a small ViT with a convolutional stem, a sub-patch
segmentation head and optionally a decoder with skips from the stem, in
PyTorch for training. Rust's `segattn` reads what `export_tensors()` writes
(Hugging Face ViT names, batch norms folded into the convolutions).
"""
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open


def subpatch_grid(logits, rows, cols):
    """Per-patch logits (B, rows·cols, s²) as one map (B, 1, s·rows, s·cols):
    cell (i, j) of patch (r, c) lands at row r·s + i, column c·s + j."""
    b, _, cells = logits.shape
    s = math.isqrt(cells)
    return logits.reshape(b, rows, cols, s, s).permute(0, 1, 3, 2, 4).reshape(b, 1, rows * s, cols * s)


def conv_bn_relu(inputs, outputs, stride=1, batch_norm=True):
    """3x3 convolution, batch norm, ReLU; without `batch_norm`, the convolution
    has a bias instead, as export_tensors() folds it."""
    conv = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=not batch_norm)
    return nn.Sequential(conv, nn.BatchNorm2d(outputs) if batch_norm else nn.Identity(), nn.ReLU())


def fold(layer):
    """A conv_bn_relu's convolution with its batch norm folded in: (weight, bias)."""
    conv, bn = layer[0], layer[1]
    if isinstance(bn, nn.Identity):
        return conv.weight, conv.bias
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


class ConvStem(nn.Module):
    """Three 3x3 stride-2 convolutions (Xiao et al., 2021: early convolutions
    help ViTs learn from few images); the patch projection adds the last 2x."""

    def __init__(self, widths=(32, 64, 128), batch_norm=True):
        super().__init__()
        channels = [3, *widths]
        self.layers = nn.ModuleList(conv_bn_relu(i, o, 2, batch_norm) for i, o in zip(channels, widths))
        self.widths = widths

    def forward(self, x):
        """Each layer's output: 1/2, 1/4 and 1/8 of the input."""
        outputs = []
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return outputs


def upsample2(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class Decoder(nn.Module):
    """Tokens (B, D, R, C) to 64 channels, then two 2x bilinear upsamplings,
    each followed by a 3x3 convolution, batch norm and ReLU (64 then 32
    channels); logits at 1/4 of the input. With `stem_widths`, the stem's
    1/8 and 1/4 outputs are concatenated before each convolution, which
    brings the photo's edges back at the finer scales."""

    def __init__(self, dim, stem_widths=None, batch_norm=True):
        super().__init__()
        self.skip = stem_widths is not None
        extra8, extra4 = (stem_widths[2], stem_widths[1]) if self.skip else (0, 0)
        self.reduce = nn.Conv2d(dim, 64, 1)
        self.up8 = conv_bn_relu(64 + extra8, 64, batch_norm=batch_norm)
        self.up4 = conv_bn_relu(64 + extra4, 32, batch_norm=batch_norm)
        self.out = nn.Conv2d(32, 1, 1)

    def forward(self, stem, tokens):
        x = self.up8(self._join(upsample2(self.reduce(tokens)), stem[2]))
        return self.out(self.up4(self._join(upsample2(x), stem[1])))

    def _join(self, x, skip):
        return torch.cat([x, skip], 1) if self.skip else x


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, keep_cls_attention=False):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if not keep_cls_attention:
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)), None
        scores = (q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)
        probs = scores.float().softmax(-1)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out), probs[:, :, 0, :]  # (B, heads, tokens): the class token's row


def drop_path(x, rate, training):
    """Stochastic depth: in training, drops a residual branch for a random
    `rate` of the samples and scales the rest to keep the expectation."""
    if not training or rate == 0:
        return x
    keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= rate).to(x.dtype)
    return x * keep / (1 - rate)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4, eps=1e-6, drop_path=0.0):
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x, keep_cls_attention=False):
        a, cls_attention = self.attn(self.norm1(x), keep_cls_attention)
        x = x + drop_path(a, self.drop_path, self.training)
        x = x + drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))), self.drop_path, self.training)
        return x, cls_attention


class SegAttnViT(nn.Module):
    def __init__(self, dim=192, depth=6, heads=3, pos_grid=14, subpatch=4, eps=1e-6, drop_path=0.0, decoder=False,
                 batch_norm=True):
        super().__init__()
        self.patch_size, self.subpatch, self.eps, self.heads = 16, subpatch, eps, heads
        self.stem = ConvStem(batch_norm=batch_norm)
        self.proj = nn.Conv2d(self.stem.widths[-1], dim, 2, 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + pos_grid * pos_grid, dim) * 0.02)
        self.pos_grid = pos_grid
        # Stochastic depth rising linearly to `drop_path` in the last block (DeiT).
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, eps=eps, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=eps)
        # Sub-patch head: subpatch² logits per patch, laid out as a finer grid.
        self.head = nn.Linear(dim, subpatch * subpatch)
        # The plain per-patch head, trained beside it to measure which is better.
        self.patch_head = nn.Linear(dim, 1)
        self.decoder = Decoder(dim, self.stem.widths, batch_norm) if decoder else None
        self.apply(self._init)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @classmethod
    def from_exported(cls, path, decoder=False, drop_path=0.0):
        """The model in a file export_tensors() wrote, to train on: its batch
        norms stay folded (the stem's convolutions get biases), the per-patch
        head starts afresh, and a decoder the file lacks starts afresh."""
        tensors, meta = read_exported(path)
        config = json.loads(meta["config"])
        dim = tensors["embeddings.cls_token"].shape[-1]
        pos_grid = math.isqrt(tensors["embeddings.position_embeddings"].shape[1] - 1)
        has_decoder = "decoder.out.weight" in tensors
        model = cls(dim, config["num_hidden_layers"], config["num_attention_heads"], pos_grid,
                    math.isqrt(tensors["head.weight"].shape[0]), config["layer_norm_eps"], drop_path,
                    decoder or has_decoder, batch_norm=False)
        params = export_tensors(model, views=True)
        missing = [k for k in params if k not in tensors and (has_decoder or not k.startswith("decoder."))]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)}")
        with torch.no_grad():
            for name, param in params.items():
                if name in tensors:
                    param.copy_(tensors[name].reshape(param.shape))
        return model

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def positions(self, rows, cols):
        """transformers' ViT interpolation: bicubic to (rows, cols), align_corners=False."""
        g, d = self.pos_grid, self.pos_embed.shape[-1]
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (rows, cols) != (g, g):
            grid = grid.reshape(1, g, g, d).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, d)
        return torch.cat([cls, grid], 1)

    def forward(self, pixels, keep_cls_attention=False):
        """pixels (B, 3, H, W), H and W multiples of 16. Returns the final tokens
        (B, 1 + N, D), the sub-patch logits (B, 1, 4R, 4C), the per-patch logits
        (B, 1, R, C), the decoder's logits (B, 1, 4R, 4C) or None, and the last
        layer's class-token attention (B, heads, 1 + N)."""
        stem = self.stem(pixels)
        x = self.proj(stem[-1])
        b, d, rows, cols = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1) + self.positions(rows, cols)
        cls_attention = None
        for i, block in enumerate(self.blocks):
            x, a = block(x, keep_cls_attention and i == len(self.blocks) - 1)
            cls_attention = a if a is not None else cls_attention
        x = self.norm(x)
        patches = x[:, 1:]
        fine = subpatch_grid(self.head(patches).float(), rows, cols)
        coarse = self.patch_head(patches).float().reshape(b, 1, rows, cols)
        decoded = None
        if self.decoder is not None:
            grid = patches.transpose(1, 2).reshape(b, d, rows, cols)
            decoded = self.decoder(stem, grid).float()
        return x, fine, coarse, decoded, cls_attention


def export_tensors(model, views=False):
    """The Rust loader's tensors (transformers' ViTModel names plus the stem
    and decoder), batch norms folded into the convolutions. With `views`, the
    model's own parameters under those names, to load into (no batch norms)."""
    m = model.eval() if not views else model
    t = {}
    for i, layer in enumerate(m.stem.layers):
        t[f"embeddings.patch_embeddings.stem.{i}.weight"], t[f"embeddings.patch_embeddings.stem.{i}.bias"] = fold(layer)
    t["embeddings.patch_embeddings.projection.weight"] = m.proj.weight
    t["embeddings.patch_embeddings.projection.bias"] = m.proj.bias
    t["embeddings.cls_token"] = m.cls_token
    t["embeddings.position_embeddings"] = m.pos_embed
    d = m.cls_token.shape[-1]
    for i, blk in enumerate(m.blocks):
        p = f"encoder.layer.{i}."
        t[p + "layernorm_before.weight"], t[p + "layernorm_before.bias"] = blk.norm1.weight, blk.norm1.bias
        for j, name in enumerate(["query", "key", "value"]):
            t[p + f"attention.attention.{name}.weight"] = blk.attn.qkv.weight[j * d:(j + 1) * d]
            t[p + f"attention.attention.{name}.bias"] = blk.attn.qkv.bias[j * d:(j + 1) * d]
        t[p + "attention.output.dense.weight"], t[p + "attention.output.dense.bias"] = blk.attn.proj.weight, blk.attn.proj.bias
        t[p + "layernorm_after.weight"], t[p + "layernorm_after.bias"] = blk.norm2.weight, blk.norm2.bias
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = blk.fc1.weight, blk.fc1.bias
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = blk.fc2.weight, blk.fc2.bias
    t["layernorm.weight"], t["layernorm.bias"] = m.norm.weight, m.norm.bias
    t["head.weight"], t["head.bias"] = m.head.weight, m.head.bias
    if m.decoder is not None:
        t["decoder.reduce.weight"], t["decoder.reduce.bias"] = m.decoder.reduce.weight, m.decoder.reduce.bias
        t["decoder.up8.weight"], t["decoder.up8.bias"] = fold(m.decoder.up8)
        t["decoder.up4.weight"], t["decoder.up4.bias"] = fold(m.decoder.up4)
        t["decoder.out.weight"], t["decoder.out.bias"] = m.decoder.out.weight, m.decoder.out.bias
    if views:
        return t
    return {k: v.detach().contiguous() for k, v in t.items()}


def config_json(model):
    return json.dumps({
        "model_type": "vit",
        "num_attention_heads": model.heads,
        "num_hidden_layers": len(model.blocks),
        "layer_norm_eps": model.eps,
        "hidden_act": "gelu",
    })


def read_exported(path):
    """The tensors of a file export_tensors() wrote, and its metadata."""
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


class ExportedViT(nn.Module):
    """The exported file, run the way segattn runs it (folded stem, f16 weights
    widened to f32): the reference for the Rust parity test."""

    def __init__(self, tensors, config):
        super().__init__()
        self.t = {k: v.float() for k, v in tensors.items()}
        self.heads, self.eps = config["num_attention_heads"], config["layer_norm_eps"]
        self.depth = config["num_hidden_layers"]

    @classmethod
    def load(cls, path):
        """The model in a file export_tensors() wrote, and the file's metadata."""
        tensors, meta = read_exported(path)
        return cls(tensors, json.loads(meta["config"])), meta

    @torch.no_grad()
    def forward(self, pixels):
        """The final tokens, the sub-patch head's logits, the decoder's logits
        (None if the file has no decoder) and the class-token attention."""
        stem, x, cls_attention = self.features(pixels)
        b, rows, cols = x.shape[0], pixels.shape[-2] // 16, pixels.shape[-1] // 16
        t = self.t
        fine = subpatch_grid(F.linear(x[:, 1:], t["head.weight"], t["head.bias"]), rows, cols)
        decoded = None
        if "decoder.out.weight" in t:
            conv = lambda x, n, padding=0: F.conv2d(x, t[n + ".weight"], t[n + ".bias"], padding=padding)
            y = conv(x[:, 1:].transpose(1, 2).reshape(b, -1, rows, cols), "decoder.reduce")
            y = F.relu(conv(torch.cat([upsample2(y), stem[2]], 1), "decoder.up8", 1))
            y = F.relu(conv(torch.cat([upsample2(y), stem[1]], 1), "decoder.up4", 1))
            decoded = conv(y, "decoder.out")
        return x, fine, decoded, cls_attention

    @torch.no_grad()
    def features(self, pixels):
        """The stem's outputs (1/2, 1/4, 1/8 of the input), the final tokens
        and the last layer's class-token attention."""
        t = self.t
        x = pixels
        stem = []
        while f"embeddings.patch_embeddings.stem.{len(stem)}.weight" in t:
            i = len(stem)
            x = F.relu(F.conv2d(x, t[f"embeddings.patch_embeddings.stem.{i}.weight"], t[f"embeddings.patch_embeddings.stem.{i}.bias"], 2, 1))
            stem.append(x)
        x = F.conv2d(x, t["embeddings.patch_embeddings.projection.weight"], t["embeddings.patch_embeddings.projection.bias"], 2)
        b, d, rows, cols = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos = t["embeddings.position_embeddings"]
        g = math.isqrt(pos.shape[1] - 1)
        grid = pos[:, 1:]
        if (rows, cols) != (g, g):
            grid = F.interpolate(grid.reshape(1, g, g, d).permute(0, 3, 1, 2), size=(rows, cols), mode="bicubic", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, d)
        x = torch.cat([t["embeddings.cls_token"].expand(b, -1, -1), x], 1) + torch.cat([pos[:, :1], grid], 1)
        ln = lambda x, n: F.layer_norm(x, (d,), t[n + ".weight"], t[n + ".bias"], self.eps)
        lin = lambda x, n: F.linear(x, t[n + ".weight"], t[n + ".bias"])
        h = self.heads
        cls_attention = None
        for l in range(self.depth):
            p = f"encoder.layer.{l}."
            y = ln(x, p + "layernorm_before")
            q, k, v = (lin(y, p + f"attention.attention.{n}").reshape(b, -1, h, d // h).transpose(1, 2) for n in ("query", "key", "value"))
            probs = ((q @ k.transpose(-2, -1)) * (d // h) ** -0.5).softmax(-1)
            cls_attention = probs[:, :, 0, :]
            x = x + lin((probs @ v).transpose(1, 2).reshape(b, -1, d), p + "attention.output.dense")
            y = ln(x, p + "layernorm_after")
            x = x + lin(F.gelu(lin(y, p + "intermediate.dense")), p + "output.dense")
        return stem, ln(x, "layernorm"), cls_attention
