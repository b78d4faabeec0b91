"""A training run as a state on disk, so that one run can go on across
processes, machines and short GPU slots with the schedule it started with
(not a warm restart): the model, AdamW's moments and step, the LR schedule's
position, the epoch, the random generators and the log so far.

A folder of four files, each small enough to travel on its own (16 MB): the
model and the two moment buffers as f32 safetensors, and state.json, which
names the epoch they belong to. state.json is replaced last, and the files
of the epoch before are removed only after it, so a process killed while
writing leaves the last whole state behind.
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file

TENSOR_FILES = ("model", "adam-m", "adam-v")


def _files(epoch):
    return {name: f"{name}-{epoch:05d}.safetensors" for name in TENSOR_FILES}


def _write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def exists(folder):
    return os.path.isfile(os.path.join(folder, "state.json"))


def read(folder):
    """state.json of the run in `folder`: its recipe, epoch and log."""
    try:
        return json.load(open(os.path.join(folder, "state.json")))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{folder}: no training state to resume ({e})")


def save(folder, epoch, model, opt, sched, rng, gen, extra):
    """Writes the state after `epoch`; `extra` (the recipe, the log, ...) goes
    into state.json as it is."""
    os.makedirs(folder, exist_ok=True)
    files = _files(epoch)
    model_tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    model_tensors["rng.torch"] = torch.get_rng_state()
    model_tensors["rng.augment"] = gen.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            model_tensors[f"rng.cuda.{i}"] = s
    opt_state = opt.state_dict()
    moments = {name: {str(i): s[key].detach().cpu().contiguous() for i, s in opt_state["state"].items()}
               for name, key in (("adam-m", "exp_avg"), ("adam-v", "exp_avg_sq"))}
    for name, tensors in (("model", model_tensors), *moments.items()):
        path = os.path.join(folder, files[name])
        save_file(tensors, path + ".tmp", metadata={"epoch": str(epoch)})
        os.replace(path + ".tmp", path)
    scheduler = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    _write_json(os.path.join(folder, "state.json"), extra | {
        "epoch": epoch,
        "files": files,
        "optimizer": {"steps": {str(i): float(s["step"]) for i, s in opt_state["state"].items()},
                      "param_groups": opt_state["param_groups"]},
        "scheduler": scheduler,
        "rng": rng.getstate(),
    })
    keep = set(files.values()) | {"state.json"}
    for f in os.listdir(folder):
        if f.endswith(".safetensors") and f.split("-")[0] in ("model", "adam") and f not in keep:
            os.remove(os.path.join(folder, f))
    return [os.path.join(folder, f) for f in sorted(keep)]


def load(folder, model, opt, sched, rng, gen):
    """Puts the state of `folder` into the model, optimizer, schedule and
    random generators (Python's `rng`, the device's `gen`, torch's global
    ones) built for its recipe; returns state.json."""
    state = read(folder)
    tensors = {}
    for name, f in state["files"].items():
        path = os.path.join(folder, f)
        try:
            tensors[name] = load_file(path)
        except Exception as e:  # safetensors raises its own errors for a damaged file
            raise SystemExit(f"{path}: unreadable training state ({e})")
    params = tensors["model"]
    torch_rng = params.pop("rng.torch")
    gen.set_state(params.pop("rng.augment"))
    cuda_rng = [params.pop(k) for k in sorted(k for k in list(params) if k.startswith("rng.cuda."))]
    model.load_state_dict(params)
    steps = state["optimizer"]["steps"]
    opt.load_state_dict({
        "state": {int(i): {"step": torch.tensor(steps[i]), "exp_avg": tensors["adam-m"][i], "exp_avg_sq": tensors["adam-v"][i]}
                  for i in steps},
        "param_groups": state["optimizer"]["param_groups"],
    })
    sched.load_state_dict(state["scheduler"] | {"lr_lambdas": [None] * len(opt.param_groups)})
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch_rng)
    if cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng[:torch.cuda.device_count()])
    return state
