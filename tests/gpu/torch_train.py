#!/usr/bin/env python3
"""A deterministic PyTorch training job for tests/gpu/test_gpu_pytorch.py (issue 15).

    python3 -I torch_train.py --gib 2 --steps 40 --seed 1234 --losses /tmp/losses [--pace-ms 100] [--exit-when-done]
    python3 -I torch_train.py --probe     # JSON on stdout: what this interpreter loads to train, for bind mounts

Training: a residual MLP of `layers` blocks of width 4096 in fp32 with Adam, on CUDA device 0. Weights,
gradients and Adam's two moments take 16 bytes a parameter; --gib picks the number of blocks so that
these come to about that many GiB of VRAM (plus CUDA's context, the activations and cuBLAS's workspace).
Gradients are zeroed in place (never freed) and Adam is the fused kernel (no temporaries the size of
the model), so the footprint stays the same from the first step on.

Determinism: fixed seed (torch.manual_seed before the model is built on the GPU), deterministic
algorithms (torch.use_deterministic_algorithms(True); an op without a deterministic kernel raises),
CUBLAS_WORKSPACE_CONFIG=:4096:8 (set here before torch loads if the environment has none), TF32 off.
Each step's batch comes from a generator seeded with (seed, step) alone: the losses of an uninterrupted
run are a function of the seed and the size, and a run that was checkpointed, restored, paused or
resumed must reproduce them bit for bit.

Output: each step appends "STEP LOSS" to --losses (STEP from 0, LOSS the repr of the Python float, exact),
opening and closing the file around the one write, so that no file of the container's rootfs is open
while the process waits for its next CUDA call (a CRIU image then holds no open file that a restore into
a fresh rootfs would have to find). After the step it sleeps --pace-ms, so that a test can checkpoint or
pause it mid-run. After the last step it writes --done (default: the losses path + ".done") and sleeps
until killed, so that a test can still read its files through /proc/<pid>/root (--exit-when-done: exits).
--info (default: the losses path + ".json") gets the model's size and torch's facts after the first step.

--probe: runs two steps of a small model the same way, then prints what the interpreter is and loaded
(sys.executable, its real path and ELF interpreter, sys.prefix/base_prefix, the existing sys.path
entries, every file mapped from /proc/self/maps, LD_LIBRARY_PATH, the loader's cache and the directories
it names, the host's mount points, torch's version and the device): the test bind-mounts exactly that into a busybox rootfs (tests/gpu/host_python.py).
Standard library and torch only: it runs inside the container with the host's interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before torch (cuBLAS) loads

WIDTH = 4096
BATCH = 64
BYTES_PER_PARAM = 16  # fp32 weight + gradient + Adam's exp_avg and exp_avg_sq


def layers_for(gib: float, width: int = WIDTH) -> int:
    """Blocks of width x width (+ bias) whose weights, gradients and Adam state come to about `gib` GiB."""
    per_block = (width * width + width) * BYTES_PER_PARAM
    return max(1, round(gib * (1 << 30) / per_block))


def build(torch, layers: int, width: int):
    nn = torch.nn

    class ResidualMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
            self.head = nn.Linear(width, 1)
            self.scale = 1.0 / layers ** 0.5

        def forward(self, x):
            for block in self.blocks:
                x = x + torch.tanh(block(x)) * self.scale
            return self.head(x)

    with torch.device("cuda"):
        return ResidualMLP()


def deterministic(torch, seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def batch(torch, seed: int, step: int, width: int):
    """The step's inputs and targets: a function of (seed, step) alone."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed * 1_000_003 + step)
    x = torch.randn(BATCH, width, generator=gen, device="cuda")
    y = torch.randn(BATCH, 1, generator=gen, device="cuda")
    return x, y


def train_step(torch, model, optimizer, seed: int, step: int, width: int) -> float:
    x, y = batch(torch, seed, step, width)
    optimizer.zero_grad(set_to_none=False)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def write_file(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def train(args) -> int:
    import torch

    deterministic(torch, args.seed)
    layers = layers_for(args.gib)
    model = build(torch, layers, WIDTH)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    params = sum(p.numel() for p in model.parameters())
    done = args.done or args.losses + ".done"
    info = args.info or args.losses + ".json"
    for step in range(args.steps):
        value = train_step(torch, model, optimizer, args.seed, step, WIDTH)
        append_line(args.losses, f"{step} {value!r}\n")
        if step == 0:
            write_file(info, json.dumps({
                "pid": os.getpid(), "layers": layers, "width": WIDTH, "batch": BATCH, "params": params,
                "state_bytes": params * BYTES_PER_PARAM, "allocated": torch.cuda.memory_allocated(),
                "reserved": torch.cuda.memory_reserved(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0)}))
        if args.pace_ms > 0:
            time.sleep(args.pace_ms / 1000)
    write_file(done, f"done {args.steps}\n")
    if args.exit_when_done:
        return 0
    while True:  # keep the process (and its rootfs) for the test to read; it kills us
        time.sleep(3600)


# ---- --probe: what this interpreter is and loads ------------------------------------------------------
def elf_interpreter(path: str):
    """The PT_INTERP of a 64-bit ELF file (the dynamic loader it names), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
                return None
            order = "<" if head[5] == 1 else ">"
            (phoff,) = struct.unpack_from(order + "Q", head, 0x20)
            phentsize, phnum = struct.unpack_from(order + "HH", head, 0x36)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack(order + "IIQQQQ", f.read(40))
                if p_type == 3:  # PT_INTERP
                    f.seek(p_offset)
                    return f.read(p_filesz).rstrip(b"\0").decode()
    except OSError:
        return None
    return None


def mapped_files() -> list:
    """Every regular file mapped into this process, in the order first mapped."""
    seen: dict = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.rstrip("\n").split(None, 5)
            if len(parts) < 6 or not parts[5].startswith("/") or parts[5].endswith(" (deleted)"):
                continue
            path = parts[5]
            if path.startswith(("/dev/", "/proc/", "/sys/", "/memfd:")) or not os.path.isfile(path):
                continue
            seen.setdefault(path, None)
    return list(seen)


def mount_points() -> list:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:  # octal escapes: \040 (space), \011, \012, \134
                points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
    return points


def ld_cache_dirs(cache: str = "/etc/ld.so.cache") -> list:
    """The directories the loader's cache names libraries in (its string table holds their paths)."""
    try:
        with open(cache, "rb") as f:
            data = f.read()
    except OSError:
        return []
    paths = {p.decode(errors="replace") for p in data.split(b"\0") if p.startswith(b"/") and b".so" in p}
    return sorted({os.path.dirname(p) for p in paths})


def probe() -> int:
    facts = {"executable": sys.executable, "real_executable": os.path.realpath(sys.executable),
             "prefix": sys.prefix, "base_prefix": sys.base_prefix,
             "path": [p for p in sys.path if p and os.path.exists(p)],
             "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""), "mount_points": mount_points(),
             "ld_cache": "/etc/ld.so.cache" if os.path.isfile("/etc/ld.so.cache") else None,
             "ld_cache_dirs": ld_cache_dirs()}
    facts["interpreter"] = elf_interpreter(facts["real_executable"])
    cfg = os.path.join(sys.prefix, "pyvenv.cfg")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "home":
                    facts["venv_home"] = value.strip()
    try:
        import torch
    except ImportError as exc:
        facts["torch_error"] = f"{type(exc).__name__}: {exc}"
    else:
        facts.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            deterministic(torch, 1)
            model = build(torch, 1, 256)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
            facts["probe_losses"] = [train_step(torch, model, optimizer, 1, step, 256) for step in range(2)]
            facts["device"] = torch.cuda.get_device_name(0)
    facts["libraries"] = mapped_files()
    print(json.dumps(facts))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", action="store_true", help="print what this interpreter loads, as JSON")
    parser.add_argument("--gib", type=float, default=2.0, help="GiB of weights, gradients and Adam state")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--losses", default="/tmp/losses")
    parser.add_argument("--done", default=None)
    parser.add_argument("--info", default=None)
    parser.add_argument("--pace-ms", type=float, default=100.0, help="sleep after each step")
    parser.add_argument("--exit-when-done", action="store_true")
    args = parser.parse_args(argv)
    return probe() if args.probe else train(args)


if __name__ == "__main__":
    sys.exit(main())
