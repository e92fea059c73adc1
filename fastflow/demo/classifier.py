"""The evaluation classifier: a small CNN that recognises the 36 glyph classes.

It is trained on the same procedural generator as the flow model but on a
disjoint seed (:data:`fastflow.demo.glyphs.CLASSIFIER_TRAIN_SEED`) and measured
on another one (:data:`~fastflow.demo.glyphs.CLASSIFIER_VAL_SEED`), so it is an
independent judge of generated samples.  Its penultimate layer (256 features)
is used for Frechet feature distances.

    python -m fastflow.demo.classifier --out fastflow/demo/weights/glyph-classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import DEFAULT_CLASSIFIER_PATH, NUM_CLASSES, DemoModelError
from . import glyphs

FORMAT = "fastflow-glyph-classifier"
FEATURE_DIM = 256


class GlyphClassifier(nn.Module):
    """(B, 3, 32, 32) in [-1, 1] -> logits (B, 36); ``features`` gives the 256-d penultimate activations."""

    def __init__(self, num_classes: int = NUM_CLASSES, feature_dim: int = FEATURE_DIM):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(3, 32), nn.MaxPool2d(2),  # 16x16
            *block(32, 64), nn.MaxPool2d(2),  # 8x8
            *block(64, 128), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(128 * 4 * 4, feature_dim), nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))


def save_classifier(model: GlyphClassifier, path: str, info: dict | None = None) -> str:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # BatchNorm's num_batches_tracked is an int64 counter; weights stored as float16 to keep the file small
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    meta = {"format": FORMAT, "info": json.dumps(info or {})}
    save_file(sd, path, metadata=meta)
    return path


def load_classifier(path: str | None = None, device: str | torch.device = "cpu") -> GlyphClassifier:
    """Load the classifier (``path=None``: the shipped weights), in eval mode.
    Raises :class:`~fastflow.demo.DemoModelError` naming the path on problems."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(DEFAULT_CLASSIFIER_PATH if path is None else path)
    if not os.path.isfile(path):
        raise DemoModelError(f"glyph classifier weights not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        sd = load_file(path)
    except Exception as e:
        raise DemoModelError(f"corrupt glyph classifier file {path}: {type(e).__name__}: {e}") from e
    if meta.get("format") != FORMAT:
        raise DemoModelError(f"{path} is not a glyph classifier file (metadata format {meta.get('format')!r})")
    model = GlyphClassifier()
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    except Exception as e:
        raise DemoModelError(f"glyph classifier file {path} does not match the architecture: {e}") from e
    return model.to(device).eval().requires_grad_(False)


def classifier_info(path: str | None = None) -> dict:
    from safetensors import safe_open

    path = os.fspath(DEFAULT_CLASSIFIER_PATH if path is None else path)
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("info", "{}"))


@torch.no_grad()
def accuracy(model: GlyphClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        correct += int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    return correct / max(1, images.shape[0])


def train_classifier(out_path: str, *, seed: int = 0, n_train: int = 30_000, n_val: int = 3_600, epochs: int = 3,
                     batch_size: int = 128, lr: float = 2e-3, threads: int | None = 1,
                     progress: bool = True) -> dict:
    """Train the classifier on ``glyphs.CLASSIFIER_TRAIN_SEED`` data, measure it on
    ``glyphs.CLASSIFIER_VAL_SEED`` data, save it to ``out_path``; returns the info dict."""
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    t0 = time.time()
    xtr, ytr = glyphs.make_dataset(n_train, glyphs.CLASSIFIER_TRAIN_SEED)
    xva, yva = glyphs.make_dataset(n_val, glyphs.CLASSIFIER_VAL_SEED)
    xtr_u8 = torch.from_numpy(xtr).permute(0, 3, 1, 2).contiguous()
    ytr = torch.from_numpy(ytr)
    xva, yva = glyphs.to_tensor(xva), torch.from_numpy(yva)
    if progress:
        print(f"[classifier] rendered {n_train}+{n_val} glyphs in {time.time() - t0:.1f}s", flush=True)
    model = GlyphClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (n_train // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=gen)
        tot = 0.0
        for i in range(n_train // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = xtr_u8[idx].float() / 127.5 - 1.0
            # light noise augmentation so that slightly noisy generated samples are judged on their shape
            sig = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * 0.1
            x = x + sig * torch.randn(x.shape, generator=gen)
            loss = F.cross_entropy(model(x), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tot += loss.item()
        acc = accuracy(model, xva, yva)
        if progress:
            print(f"[classifier] epoch {ep + 1}/{epochs} loss {tot / (n_train // batch_size):.4f} "
                  f"val acc {acc:.4f} elapsed {time.time() - t0:.0f}s", flush=True)
    info = {"val_accuracy": acc, "n_train": n_train, "n_val": n_val, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "seed": seed, "train_seed": glyphs.CLASSIFIER_TRAIN_SEED,
            "val_seed": glyphs.CLASSIFIER_VAL_SEED, "wall_seconds": round(time.time() - t0, 1),
            "parameters": sum(p.numel() for p in model.parameters())}
    save_classifier(model, out_path, info)
    # report the accuracy of the float16-stored weights that ship
    info["val_accuracy_stored"] = accuracy(load_classifier(out_path), xva, yva)
    save_classifier(model, out_path, info)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastflow.demo.classifier",
                                 description="Train the glyph evaluation classifier.")
    ap.add_argument("--out", default=DEFAULT_CLASSIFIER_PATH)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=30_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    info = train_classifier(args.out, seed=args.seed, n_train=args.n_train, epochs=args.epochs, threads=args.threads)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
