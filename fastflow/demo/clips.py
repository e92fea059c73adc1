"""The second embedded model: 8-frame 16x16 video clips of a coloured disc moving in
one of 8 directions, and a small class-conditional 3-D convolutional velocity network
trained on them by flow matching (a different data set and architecture from the
glyph transformer, so that skipping is measured on more than one network, and on video).

    python -m fastflow.demo.clips --out DIR      # 3,000 steps: about 8 minutes on 2 CPU cores

Data (made here, deterministic per seed): background and disc colours, radius, start
position and speed are random; the label is the direction of motion (0 = right, then
counter-clockwise in steps of 45°); label 8 is the unconditional (null) label.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from torch import nn

from fastflow.modelspec import check_labels

FRAMES, SIZE, CHANNELS, DIRECTIONS = 8, 16, 3, 8
NULL_LABEL = DIRECTIONS
WEIGHTS = "clip_flow.safetensors"
CONFIG = "clip_flow.json"


def render(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Clips (N, 3, FRAMES, SIZE, SIZE) in [-1, 1] moving in the direction of each label."""
    n = labels.shape[0]
    g = generator
    bg = torch.rand(n, 3, generator=g) * 2 - 1
    fg = torch.rand(n, 3, generator=g) * 2 - 1
    fg = torch.where((fg - bg).abs().mean(1, keepdim=True) < 0.5, -bg, fg)  # keep the disc visible
    radius = 2.0 + torch.rand(n, generator=g) * 2.0
    speed = 0.8 + torch.rand(n, generator=g) * 0.8
    angle = labels.float() * (2 * math.pi / DIRECTIONS)
    dx, dy = torch.cos(angle) * speed, -torch.sin(angle) * speed
    x0 = SIZE / 2 - dx * (FRAMES - 1) / 2 + (torch.rand(n, generator=g) - 0.5) * 4
    y0 = SIZE / 2 - dy * (FRAMES - 1) / 2 + (torch.rand(n, generator=g) - 0.5) * 4
    f = torch.arange(FRAMES).float()
    cx = x0[:, None] + dx[:, None] * f  # (n, F)
    cy = y0[:, None] + dy[:, None] * f
    grid = torch.arange(SIZE).float() + 0.5
    d2 = (grid[None, None, None, :] - cx[..., None, None]) ** 2 + (grid[None, None, :, None] - cy[..., None, None]) ** 2
    mask = torch.sigmoid((radius[:, None, None, None] - d2.sqrt()) * 2.0)  # (n, F, H, W), soft edge
    return bg[:, :, None, None, None] + (fg - bg)[:, :, None, None, None] * mask[:, None]


class _Block(nn.Module):
    def __init__(self, ch: int, emb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, ch)
        self.conv1 = nn.Conv3d(ch, ch, 3, padding=1)
        self.film = nn.Linear(emb, 2 * ch)
        self.glob = nn.Linear(ch, 2 * ch)  # the clip's mean feature: one background, one disc colour
        self.norm2 = nn.GroupNorm(8, ch)
        self.conv2 = nn.Conv3d(ch, ch, 3, padding=1)

    def forward(self, h, e):
        mod = self.film(e) + self.glob(h.mean(dim=(2, 3, 4)))
        scale, shift = mod[:, :, None, None, None].chunk(2, dim=1)
        y = self.conv1(torch.nn.functional.silu(self.norm1(h)))
        y = self.norm2(y) * (1 + scale) + shift
        return h + self.conv2(torch.nn.functional.silu(y))


class ClipFlow(nn.Module):
    """Velocity model ``v = model(x, t, label=label)`` on clips (B, 3, F, H, W);
    t = 1 is noise. A stem, residual 3-D conv blocks at half resolution modulated by
    the time and label embeddings, and a transposed-conv head."""

    def __init__(self, channels: int = 32, blocks: int = 3, emb: int = 64):
        super().__init__()
        self.config = {"channels": channels, "blocks": blocks, "emb": emb, "null_label": NULL_LABEL}
        self.label_embed = nn.Embedding(DIRECTIONS + 1, emb)
        self.time_mlp = nn.Sequential(nn.Linear(32, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.stem = nn.Conv3d(CHANNELS, channels, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1))
        self.blocks = nn.ModuleList(_Block(channels, emb) for _ in range(blocks))
        self.head = nn.ConvTranspose3d(channels, CHANNELS, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1))
        self.skip = nn.Conv3d(CHANNELS, CHANNELS, 1)

    def _time_features(self, t):
        freqs = torch.exp(torch.arange(16, device=t.device) * (-math.log(1000.0) / 16))
        a = t[:, None] * 1000.0 * freqs[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    def forward(self, x, t, label=None):
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        t = t.expand(b) if t.ndim == 0 else t.reshape(b)
        if label is None:
            label = torch.full((b,), NULL_LABEL, dtype=torch.long, device=x.device)
        label = torch.as_tensor(label)
        check_labels(self, label, b, NULL_LABEL)
        e = self.time_mlp(self._time_features(t)) + self.label_embed(label.to(x.device).long().reshape(b))
        h = self.stem(x)
        for blk in self.blocks:
            h = blk(h, e)
        return self.head(torch.nn.functional.silu(h)) + self.skip(x)


def train(out: str, steps: int = 3000, batch: int = 32, lr: float = 2e-3, seed: int = 0, log=print) -> dict:
    """Flow matching (x_t = t·noise + (1 − t)·data, target v = noise − data), labels
    dropped to the null label 10 % of the time for guidance; AdamW with cosine decay."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ClipFlow()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    started, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        labels = torch.randint(0, DIRECTIONS, (batch,), generator=g)
        data = render(labels, g)
        noise = torch.randn(data.shape, generator=g)
        t = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal, as SD3 trains
        xt = t[:, None, None, None, None] * noise + (1 - t[:, None, None, None, None]) * data
        drop = torch.rand(batch, generator=g) < 0.1
        v = model(xt, t, label=torch.where(drop, NULL_LABEL, labels))
        loss = (v - (noise - data)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 250 == 0 or step == steps:
            log(f"step {step}/{steps}  loss {sum(losses[-250:]) / len(losses[-250:]):.4f}  "
                f"{time.perf_counter() - started:.0f} s")
    os.makedirs(out, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, os.path.join(out, WEIGHTS))
    info = {**model.config, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "final_loss": sum(losses[-250:]) / len(losses[-250:]), "train_seconds": time.perf_counter() - started,
            "default_guidance": 3.0}
    with open(os.path.join(out, CONFIG), "w") as fh:
        json.dump(info, fh, indent=1)
    return info


def load(directory: str) -> ClipFlow:
    """The trained model from ``directory`` (float32, eval mode)."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG)) as fh:
        cfg = json.load(fh)
    model = ClipFlow(channels=cfg["channels"], blocks=cfg["blocks"], emb=cfg["emb"])
    model.load_state_dict({k: v.float() for k, v in load_file(os.path.join(directory, WEIGHTS)).items()})
    return model.eval()


def direction_of(clips: torch.Tensor) -> torch.Tensor:
    """The direction (0..7) a clip's disc moves in, read off its frames: the centroid
    of the pixels that differ most from the clip's median colour, first to last frame."""
    bg = clips.flatten(2).median(dim=2).values[:, :, None, None, None]
    w = (clips - bg).abs().sum(1)  # (N, F, H, W)
    w = (w - w.flatten(2).mean(2)[..., None, None]).clamp_min(0)
    grid = torch.arange(SIZE).float() + 0.5
    mass = w.flatten(2).sum(2).clamp_min(1e-6)
    cx = (w * grid[None, None, None, :]).flatten(2).sum(2) / mass
    cy = (w * grid[None, None, :, None]).flatten(2).sum(2) / mass
    dx, dy = cx[:, -1] - cx[:, 0], -(cy[:, -1] - cy[:, 0])
    angle = torch.atan2(dy, dx) % (2 * math.pi)
    return torch.round(angle / (2 * math.pi / DIRECTIONS)).long() % DIRECTIONS


def evaluate(samples: torch.Tensor, labels: torch.Tensor) -> dict:
    """Direction accuracy (does the disc move the asked way?) and temporal consistency
    (mean absolute change between consecutive frames, against the data's)."""
    acc = (direction_of(samples.float()) == labels.cpu()).float().mean().item()
    return {"class_accuracy": acc,
            "frame_change": (samples[:, :, 1:] - samples[:, :, :-1]).abs().mean().item()}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(json.dumps(train(a.out, steps=a.steps, seed=a.seed), indent=1))
