"""segattn vs the same models in PyTorch, side by side (see bench/run).

Prints, as ratios segattn / torch (below 1 means segattn is faster or smaller):
  - encoder forward, median of RUNS after a warm-up, both limited to the same
    number of threads: ViT-S/16 and ViT-S/8 (DINO v1 layout), DINOv2-S/14.
    Each side runs ROUNDS times, the two alternating, and its figure is the
    median over rounds: on a shared machine a slow spell then lands on both
    sides instead of on whichever happened to run in it;
  - how time grows with the token count (ViT-S/16, 256 -> 4096 tokens);
  - a folder of 16 photos end to end (decode, resize, encode, attention-mass
    mask, PNG): the segattn CLI against an equivalent torch + Pillow script;
  - peak memory (max RSS) of every process, and segattn's model load time;
  - where --precision bf16 runs (AVX512-BF16 that outruns f32), segattn's encoder with it too.
`bench/run ab BASE` times segattn's encoder against itself instead: BASE (a git
revision, built in a worktree, or an encoder benchmark binary) and this tree,
alternating for --rounds rounds, on --threads threads (1 resolves a few percent
on a shared VM, where two threads' times swing by a fifth from minute to minute).
Models are random-weight, real-size, saved once by transformers as
safetensors so that both sides load the same file.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(HERE, ".work")
THREADS = os.cpu_count()

MODELS = {
    "ViT-S/16": ("vits16", "vit", 16),
    "ViT-S/8": ("vits8", "vit", 8),
    "DINOv2-S/14": ("dinov2s14", "dinov2", 14),
}


def make_models():
    import torch
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(0)
    for _, (name, kind, patch) in MODELS.items():
        path = os.path.join(WORK, name)
        if os.path.exists(os.path.join(path, "model.safetensors")):
            continue
        if kind == "vit":
            config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                               intermediate_size=1536, patch_size=patch, image_size=224)
            model = ViTModel(config, add_pooling_layer=False)
        else:
            config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                  mlp_ratio=4, patch_size=patch, image_size=518)
            model = Dinov2Model(config)
        model.save_pretrained(path, safe_serialization=True)


def make_photos():
    from PIL import Image, ImageOps

    folder = os.path.join(WORK, "photos")
    os.makedirs(folder, exist_ok=True)
    samples = sorted(f for f in os.listdir(os.path.join(ROOT, "samples")) if f.endswith(".jpg"))
    variants = [lambda im: im, ImageOps.mirror, lambda im: im.rotate(90, expand=True),
                lambda im: im.resize((im.width * 3 // 2, im.height * 3 // 2), Image.BICUBIC)]
    for s in samples:
        image = Image.open(os.path.join(ROOT, "samples", s)).convert("RGB")
        for i, variant in enumerate(variants):
            variant(image).save(os.path.join(folder, f"{s[:-4]}_{i}.jpg"), quality=90)
    return folder


def timed(cmd, env=None):
    """Runs cmd under GNU time; returns (stdout, wall seconds, max RSS in MB)."""
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    rss_kb = int(out.stderr.strip().splitlines()[-1])
    return out.stdout, wall, rss_kb / 1024


def torch_encoder(args):
    import torch
    from transformers import AutoModel

    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.weights).eval()
    kwargs = {"interpolate_pos_encoding": True} if model.config.model_type == "vit" else {}
    x = torch.randn(1, 3, args.height, args.width)
    with torch.no_grad():
        model(pixel_values=x, **kwargs)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            model(pixel_values=x, **kwargs)
            times.append((time.perf_counter() - start) * 1000)
    print(json.dumps({"median_ms": statistics.median(times)}))


def torch_folder(args):
    """What a user would write: transformers + Pillow, DINO's attention mass."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps
    from transformers import AutoModel

    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.weights, attn_implementation="eager").eval()
    patch = model.config.patch_size
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    os.makedirs(args.output, exist_ok=True)
    for name in sorted(os.listdir(args.input)):
        image = ImageOps.exif_transpose(Image.open(os.path.join(args.input, name))).convert("RGB")
        w, h = image.size
        scale = args.size / min(w, h)
        rw, rh = (max(1, round(v * scale / patch)) * patch for v in (w, h))
        x = torch.from_numpy(np.asarray(image.resize((rw, rh), Image.BICUBIC), dtype=np.float32) / 255.0)
        x = ((x.permute(2, 0, 1) - mean) / std).unsqueeze(0)
        with torch.no_grad():
            out = model(pixel_values=x, output_attentions=True, interpolate_pos_encoding=True)
        attention = out.attentions[-1][0, :, 0, 1:]
        heads = attention.shape[0]
        values, order = torch.sort(attention / attention.sum(dim=1, keepdim=True), dim=1)
        kept = torch.zeros_like(attention)
        kept.scatter_(1, order, (torch.cumsum(values, dim=1) > 1 - 0.6).float())
        votes = kept.sum(0).reshape(1, 1, rh // patch, rw // patch) / heads
        soft = torch.nn.functional.interpolate(votes, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        mask = ((soft >= 0.5).numpy() * 255).astype(np.uint8)
        Image.fromarray(mask).save(os.path.join(args.output, os.path.splitext(name)[0] + ".png"))


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def cargo_encoder_binary(tree=ROOT):
    out = subprocess.run(["cargo", "bench", "--bench", "encoder", "--no-run", "--message-format=json"],
                         cwd=tree, capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable") and message["target"]["name"] == "encoder":
            return message["executable"]
    sys.exit("could not build the encoder benchmark")


ENCODER_SIZES = [("ViT-S/16", 224, 224, 197), ("ViT-S/16", 480, 640, 1201), ("ViT-S/8", 224, 224, 785),
                 ("ViT-S/8", 480, 640, 4801), ("DINOv2-S/14", 224, 224, 257), ("DINOv2-S/14", 476, 644, 1565)]


def hold_to_avx2():
    """Both sides of a comparison held to AVX2 + FMA; every process below inherits it, each reads its own."""
    os.environ.update({"SEGATTN_KERNELS": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
                       "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"})


def base_encoder(base):
    """BASE's encoder benchmark: the binary named, or the revision's, built in a worktree beside this one."""
    if os.path.isfile(base) and os.access(base, os.X_OK):
        return base
    rev = subprocess.run(["git", "rev-parse", "--verify", base + "^{commit}"], cwd=ROOT, capture_output=True,
                         text=True)
    if rev.returncode != 0:
        sys.exit(f"ab: {base}: neither an executable nor a git revision")
    tree = os.path.join(WORK, "ab-" + rev.stdout.strip()[:12])
    kept = tree + ".encoder"
    if not os.path.exists(kept):
        if not os.path.isdir(tree):
            subprocess.run(["git", "worktree", "add", "--detach", tree, rev.stdout.strip()], cwd=ROOT, check=True,
                           capture_output=True)
        # This tree's target folder: the dependencies are built already.
        os.environ["CARGO_TARGET_DIR"] = os.path.join(ROOT, "target")
        shutil.copy(cargo_encoder_binary(tree), kept)
        del os.environ["CARGO_TARGET_DIR"]
    return kept


def against_base(args):
    if args.isa == "avx2":
        hold_to_avx2()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.makedirs(WORK, exist_ok=True)
    make_models()
    base, new = base_encoder(args.base), cargo_encoder_binary()
    wanted = None if args.sizes == "all" else {int(t) for t in args.sizes.split(",")}
    print(f"CPU: {cpu_model()}; {args.threads} threads; kernels: {args.isa}; base {args.base}\n"
          f"encoder: medians of {args.runs} runs after a warm-up, median over {args.rounds} alternating rounds; "
          f"fastest: the two sides' fastest rounds, which a spell that slows the whole machine for a while "
          f"(common on a shared virtual machine) leaves out\n")
    print(f"{'encoder forward':<28}{'tokens':>7}{'base ms':>10}{'new ms':>10}{'new/base':>10}{'fastest':>9}"
          f"  rounds (base/new)")
    for model, height, width, tokens in ENCODER_SIZES:
        if wanted is not None and tokens not in wanted:
            continue
        command = [os.path.join(WORK, MODELS[model][0]), str(height), str(width), str(args.runs), "none", "f32"]
        times = {base: [], new: []}
        for i in range(args.rounds):
            for binary in (base, new) if i % 2 == 0 else (new, base):
                out = subprocess.run([binary, *command], capture_output=True, text=True, check=True).stdout
                times[binary].append(json.loads(out)["median_ms"])
        b, n = statistics.median(times[base]), statistics.median(times[new])
        fastest = min(times[new]) / min(times[base])
        rounds = " ".join(f"{x:.0f}/{y:.0f}" for x, y in zip(times[base], times[new]))
        print(f"{f'{model} {height}x{width}':<28}{tokens:>7}{b:>10.1f}{n:>10.1f}{n / b:>10.3f}{fastest:>9.3f}  {rounds}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--isa", choices=["widest", "avx2"], default="widest",
                        help="avx2: both sides held to AVX2 + FMA, as on a CPU without AVX-512 (segattn by "
                             "SEGATTN_KERNELS, torch by ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, "
                             "ONEDNN_MAX_CPU_ISA)")
    sub = parser.add_subparsers(dest="command")
    enc = sub.add_parser("torch-encoder")
    fol = sub.add_parser("torch-folder")
    ab = sub.add_parser("ab", help="this tree's encoder against BASE's, alternating")
    ab.add_argument("base", help="a git revision, or an encoder benchmark binary")
    ab.add_argument("--threads", type=int, default=THREADS)
    ab.add_argument("--sizes", default="all", help="comma-separated tokens to run (197,1201,785,4801,257,1565)")
    for p in (enc, fol):
        p.add_argument("--weights", required=True)
        p.add_argument("--threads", type=int, default=THREADS)
    enc.add_argument("--height", type=int, required=True)
    enc.add_argument("--width", type=int, required=True)
    enc.add_argument("--runs", type=int, default=5)
    fol.add_argument("--input", required=True)
    fol.add_argument("--output", required=True)
    fol.add_argument("--size", type=int, default=480)
    args = parser.parse_args()
    if args.command == "torch-encoder":
        return torch_encoder(args)
    if args.command == "torch-folder":
        return torch_folder(args)
    if args.command == "ab":
        return against_base(args)

    if args.isa == "avx2":
        hold_to_avx2()
    os.makedirs(WORK, exist_ok=True)
    make_models()
    photos = make_photos()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    segattn = os.path.join(ROOT, "target", "release", "segattn")
    encoder = cargo_encoder_binary()
    me = [sys.executable, os.path.abspath(__file__)]
    weights16 = os.path.join(WORK, "vits16")
    info = json.loads(subprocess.run([segattn, "info", "--weights", weights16, "--json"], capture_output=True,
                                     text=True, check=True).stdout)
    bf16_info = json.loads(subprocess.run([segattn, "info", "--weights", weights16, "--json", "--precision", "bf16"],
                                          capture_output=True, text=True, check=True).stdout)
    has_bf16 = bf16_info["linear_kernel"] != info["linear_kernel"]
    print(f"CPU: {cpu_model()}; segattn's linear layers on {info['linear_kernel']}, attention on "
          f"{info['attention_kernel']}" + (f"; with --precision bf16, linear layers on {bf16_info['linear_kernel']}, "
                                            f"attention on {bf16_info['attention_kernel']}"
                                            if has_bf16 else "; --precision bf16 runs in f32 here, so no bf16 column"))
    if args.isa == "avx2":
        print("--isa avx2: both sides held to AVX2 + FMA (SEGATTN_KERNELS=avx2; torch by ATEN_CPU_CAPABILITY, "
              "MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA)")
    # Laid-out weights are kept here, not in the user's cache; the first
    # load of each model lays them out and writes them, later loads map them.
    cache = os.path.join(WORK, "panel-cache")
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["SEGATTN_CACHE_DIR"] = cache
    os.environ.pop("SEGATTN_CACHE", None)
    loads = [json.loads(subprocess.run([encoder, weights16, "224", "224", "0"], capture_output=True, text=True,
                                       check=True).stdout) for _ in range(4)]
    later = ", ".join(f"{load['load_ms']:.1f}" for load in loads[1:])
    kept = all(load["weights_from_cache"] for load in loads[1:])
    print(f"ViT-S/16 f32 load: {loads[0]['load_ms']:.1f} ms the first time (lays the weights out and keeps "
          f"them), then {later} ms (from the kept layout: {kept}); with SEGATTN_CACHE=off every load lays out")
    print(f"{THREADS} threads on each side; encoder: medians of {args.runs} runs after a warm-up, "
          f"median over {args.rounds} alternating rounds\n")

    def compare(model, height, width, bf16=False):
        weights = os.path.join(WORK, MODELS[model][0])
        size = [str(height), str(width), str(args.runs)]

        def our_round(precision):
            out, _, rss = timed([encoder, weights, *size, "none", precision])
            return json.loads(out), rss

        def their_round():
            out, _, rss = timed(me + ["torch-encoder", "--weights", weights, "--height", str(height),
                                      "--width", str(width), "--runs", str(args.runs), "--threads", str(THREADS)])
            return json.loads(out), rss

        ours, theirs, ours_bf16 = [], [], []
        sides = [(lambda: our_round("f32"), ours), (their_round, theirs)]
        if bf16:
            sides.append((lambda: our_round("bf16"), ours_bf16))
        for i in range(args.rounds):
            for run, results in sides if i % 2 == 0 else sides[::-1]:
                results.append(run())
        median = lambda results, key: statistics.median(r[key] for r, _ in results)
        summary = {"tokens": ours[0][0]["tokens"], "median_ms": median(ours, "median_ms"),
                   "load_ms": median(ours, "load_ms"),
                   "bf16_ms": median(ours_bf16, "median_ms") if bf16 else None}
        return summary, max(rss for _, rss in ours), median(theirs, "median_ms"), max(rss for _, rss in theirs)

    bf16_header = f"{'bf16 ms':>9}{'ratio':>7}" if has_bf16 else ""
    print(f"{'encoder forward':<28}{'tokens':>7}{'segattn ms':>12}{'torch ms':>10}{'ratio':>7}"
          f"{'segattn MB':>12}{'torch MB':>10}{'ratio':>7}{'load ms':>9}{bf16_header}")
    for model, height, width, _ in ENCODER_SIZES:
        ours, our_rss, theirs, their_rss = compare(model, height, width, bf16=has_bf16)
        label = f"{model} {height}x{width}"
        bf16_columns = f"{ours['bf16_ms']:>9.1f}{ours['bf16_ms'] / theirs:>7.2f}" if has_bf16 else ""
        print(f"{label:<28}{ours['tokens']:>7}{ours['median_ms']:>12.1f}{theirs:>10.1f}{ours['median_ms'] / theirs:>7.2f}"
              f"{our_rss:>12.0f}{their_rss:>10.0f}{our_rss / their_rss:>7.2f}{ours['load_ms']:>9.1f}{bf16_columns}")

    print(f"\n{'scaling (ViT-S/16)':<28}{'tokens':>7}{'segattn ms':>12}{'torch ms':>10}{'ratio':>7}{'ms/token':>10}")
    for side in (256, 512, 1024):
        ours, _, theirs, _ = compare("ViT-S/16", side, side)
        print(f"{f'{side}x{side}':<28}{ours['tokens']:>7}{ours['median_ms']:>12.1f}{theirs:>10.1f}"
              f"{ours['median_ms'] / theirs:>7.2f}{ours['median_ms'] / ours['tokens']:>10.3f}")

    weights = weights16
    count = len(os.listdir(photos))
    # segattn keeps outputs that exist; each run starts from empty folders.
    for side in ("masks_segattn", "masks_torch"):
        shutil.rmtree(os.path.join(WORK, side), ignore_errors=True)
    _, our_wall, our_rss = timed([segattn, "run", photos, "--out-dir", os.path.join(WORK, "masks_segattn"),
                                  "--weights", weights, "--size", "480"])
    _, their_wall, their_rss = timed(me + ["torch-folder", "--weights", weights, "--input", photos,
                                           "--output", os.path.join(WORK, "masks_torch"), "--threads", str(THREADS)])
    print(f"\n{'folder, ViT-S/16 at 480':<28}{'photos':>7}{'segattn s':>12}{'torch s':>10}{'ratio':>7}"
          f"{'segattn MB':>12}{'torch MB':>10}{'ratio':>7}")
    print(f"{'decode..mask..PNG':<28}{count:>7}{our_wall:>12.2f}{their_wall:>10.2f}{our_wall / their_wall:>7.2f}"
          f"{our_rss:>12.0f}{their_rss:>10.0f}{our_rss / their_rss:>7.2f}")


if __name__ == "__main__":
    main()
