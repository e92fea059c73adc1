"""Train the glyph flow model from a seed.

    python -m fastflow.demo.train --out DIR --seed 0

Objective (rectified flow, fastflow's convention): ``x_t = t * noise + (1 - t) * x0``
with ``t`` logit-normal (sigmoid of a standard normal), the model regresses
``v = noise - x0`` with an MSE loss.  Labels are replaced by the null label
with probability ``label_dropout`` so the model also learns the unconditional
velocity used by classifier-free guidance.  Muon for the matrices of the
transformer blocks and AdamW for the other parameters (or AdamW throughout),
linear warm-up then cosine decay, gradient clipping, bfloat16 autocast, and an
exponential moving average (EMA) of the weights; the EMA weights are what is saved.

The reference recipe (the embedded weights) is the default arguments with
``seed=0`` (:data:`RECIPE`: one stage of 3,200 Muon steps at lr 3e-3 through
``torch.compile``; see docs/demo-model.md for its time on the 2-core CPU machine).  A recipe may
have several stages, each restarting the optimizer from the previous stage's EMA
weights, so a longer one can be run (or an existing model extended) in pieces::

    python -m fastflow.demo.train --out DIR2 --seed 0 --init-from DIR1 --steps 2000 --lr 5e-4   # more training

It is step-based, so it is reproducible independently of speed (``--minutes``
is only an optional safety cap, which makes a run time-dependent).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import re
import sys
import time

import numpy as np
import torch

from . import NULL_LABEL, NUM_CLASSES
from . import glyphs
from .model import DEFAULT_CONFIG, TINY_CONFIG, GlyphFlow, count_parameters, save_glyph_flow

#: the reference recipe of the embedded model.  A recipe runs in stages: stage 1 from scratch; every
#: later stage (none in the reference recipe) restarts the optimizer (fresh moments, warm-up then cosine
#: decay, new data order) from the previous stage's EMA weights rounded to float16 -- exactly what
#: ``--init-from DIR --start-stage 2`` does with a saved stage-1 model, so a long recipe can also be
#: run in pieces.
RECIPE = {
    "stages": [
        {"steps": 3200, "lr": 3e-3, "warmup_steps": 100},
    ],
    "batch_size": 64,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.0,
    "betas": (0.9, 0.99),
    "grad_clip": 1.0,
    "ema_decay": 0.999,
    "label_dropout": 0.1,
    "num_data": 100_000,
    "time_sampling": "logit-normal(0, 1)",
    "autocast": "bfloat16",
    "compile": True,
    "optimizer": "muon",
}

#: optimizers the trainer knows: ``adamw`` for every parameter, or ``muon`` -- torch's Muon
#: (momentum 0.95, Nesterov, Newton-Schulz orthogonalised updates, lr scaled to AdamW's update RMS)
#: for the 2-D weights of the transformer blocks, AdamW for the rest (embeddings, norms, biases,
#: the input/output projections).
OPTIMIZERS = ("adamw", "muon")


def _muon_param(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 2 and (".transformer_blocks." in name or ".single_transformer_blocks." in name)


def _check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


def make_optimizers(model: torch.nn.Module, name: str, lr: float) -> list[torch.optim.Optimizer]:
    """The optimizer(s) of one stage: ``[AdamW]`` or ``[Muon, AdamW]`` (see :data:`OPTIMIZERS`)."""
    _check_optimizer(name)
    adam_kw = dict(lr=lr, betas=RECIPE["betas"], weight_decay=RECIPE["weight_decay"])
    if name == "adamw":
        return [torch.optim.AdamW(model.parameters(), **adam_kw)]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if _muon_param(n, p)]
    rest = [p for n, p in named if not _muon_param(n, p)]
    return [torch.optim.Muon(muon, lr=lr, weight_decay=RECIPE["weight_decay"], momentum=0.95, nesterov=True,
                             adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(rest, **adam_kw)]


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def parse_time_sampling(spec: str):
    """``"logit-normal(m, s)"`` -> t = sigmoid(m + s * N(0, 1)); ``"uniform"`` -> U(0, 1).
    Returns ``draw(n, generator) -> (n,) float32``."""
    spec = spec.replace(" ", "").lower()
    if spec == "uniform":
        return lambda n, gen: torch.rand(n, generator=gen)
    m = re.fullmatch(r"logit-normal\(([-+0-9.eE]+),([-+0-9.eE]+)\)", spec)
    if not m:
        raise ValueError(f"unknown time sampling {spec!r}: use 'uniform' or 'logit-normal(m, s)'")
    mean, std = float(m.group(1)), float(m.group(2))
    return lambda n, gen: torch.sigmoid(mean + std * torch.randn(n, generator=gen))


def _log(msg: str, bar=None) -> None:
    if bar is not None:
        bar.write(msg)
    else:
        print(msg, flush=True)


def train_glyph_flow(
    out_dir: str,
    *,
    seed: int = 0,
    minutes: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    tiny: bool = False,
    progress: bool = True,
    log_every: int = 50,
    sample_dir: str | None = None,
    sample_every: int = 250,
    checkpoint_every: int = 500,
    num_data: int | None = None,
    threads: int | None = 2,
    amp: bool = True,
    config: dict | None = None,
    init_from: str | None = None,
    start_stage: int = 1,
    device: str = "cpu",
    time_sampling: str | None = None,
    callback=None,
    compile: bool | None = None,
    optimizer: str | None = None,
) -> str:
    """Train a :class:`~fastflow.demo.model.GlyphFlow` and save its EMA weights to ``out_dir``.

    Default: the reference recipe (:data:`RECIPE`, all its stages).  ``steps``
    (and ``lr``) replace it by a single stage of that length.  ``init_from`` (a
    saved model directory) with ``start_stage=k`` runs only stages ``k, k+1, ...``
    starting from that model's weights.  ``tiny=True`` uses
    :data:`~fastflow.demo.model.TINY_CONFIG`, 3 steps of batch 8 on 64 images
    (seconds; for tests).  ``sample_dir`` gets a PNG grid of EMA samples (one per
    class, 20 Euler steps, guidance 3) every ``sample_every`` steps.  ``minutes``
    is an optional wall-clock cap.  ``device`` trains elsewhere than on the CPU
    (recipe experiments on a GPU; the recipe itself is sized for the CPU).
    ``time_sampling`` overrides the recipe's law of t (``"logit-normal(m, s)"`` or
    ``"uniform"``).  ``callback(step, ema_model)`` is called every
    ``checkpoint_every`` steps (and at the end).  ``compile`` (default: the
    recipe's, on) runs the training forward through ``torch.compile`` (10-20 %
    faster per step on the 2-core CPU; a minute of compiling first); where it
    cannot compile (no C++ compiler), training goes on eagerly, with a message.
    ``optimizer`` (default: the recipe's) is one of :data:`OPTIMIZERS`.
    Returns ``out_dir``.
    """
    if threads:
        torch.set_num_threads(int(threads))
    if tiny:
        steps = 3 if steps is None else steps
        batch_size = 8 if batch_size is None else batch_size
        num_data = 64 if num_data is None else num_data
        config = TINY_CONFIG if config is None else config
        amp = False
        compile = False if compile is None else compile
    compile = RECIPE["compile"] if compile is None else bool(compile)
    optimizer = RECIPE["optimizer"] if optimizer is None else str(optimizer)
    _check_optimizer(optimizer)  # before rendering the data, not after
    if steps is not None:
        stages = [{"steps": int(steps), "lr": float(lr) if lr is not None else RECIPE["stages"][0]["lr"],
                   "warmup_steps": min(RECIPE["stages"][0]["warmup_steps"], max(1, int(steps) // 10))}]
    else:
        stages = [dict(st) for st in RECIPE["stages"]]
        if lr is not None:
            stages[0]["lr"] = float(lr)
    t_law = parse_time_sampling(time_sampling or RECIPE["time_sampling"])
    if amp and torch.device(device).type != "cpu":
        # measured on an H100 (torch 2.11): under CUDA bf16 autocast the gradients of
        # FluxTransformer2DModel's timestep embedder are NaN from the first step
        _log(f"[glyph-flow] bfloat16 autocast is CPU-only here (NaN gradients on {device}); training in float32")
        amp = False
    if not 1 <= start_stage <= len(stages):
        raise ValueError(f"start_stage must be in 1..{len(stages)}")
    if start_stage > 1 and init_from is None:
        raise ValueError("start_stage > 1 needs init_from (the model saved after the previous stage)")
    batch_size = RECIPE["batch_size"] if batch_size is None else int(batch_size)
    num_data = RECIPE["num_data"] if num_data is None else int(num_data)
    t_start = time.time()

    torch.manual_seed(seed)
    if init_from is not None:
        from .model import load_glyph_flow

        model = load_glyph_flow(init_from)  # weights as saved (float16-rounded EMA), float32
        model.requires_grad_(True)
        if config is not None and config.get("transformer") != model.config.get("transformer"):
            raise ValueError(f"{init_from} has a different transformer config than requested")
    else:
        model = GlyphFlow(config if config is not None else DEFAULT_CONFIG)
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = count_parameters(model)

    data_seed = glyphs.FLOW_TRAIN_SEED + seed
    t0 = time.time()
    images, labels = glyphs.make_dataset(num_data, data_seed, workers=min(os.cpu_count() or 1, 16))
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, 32, 32)
    data_labels = torch.from_numpy(labels)
    render_s = time.time() - t0
    run_stages = list(range(start_stage - 1, len(stages)))
    total_steps = sum(stages[i]["steps"] for i in run_stages)
    _log(f"[glyph-flow] {n_params / 1e6:.2f}M parameters; rendered {num_data} glyphs (seed {data_seed}) "
         f"in {render_s:.1f}s; stages {[stages[i] for i in run_stages]} x batch {batch_size}, "
         f"threads {torch.get_num_threads()}")

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, desc="glyph-flow", unit="it", dynamic_ncols=True,
                       mininterval=1.0 if sys.stderr.isatty() else 30.0)
        except ImportError:  # pragma: no cover - tqdm ships with diffusers' deps
            bar = None

    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    forward = torch.compile(model) if compile else model

    def ema_update(decay: float) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)

    def write_samples(tag: str) -> None:
        if sample_dir is None:
            return
        from .evaluate import sample_euler
        from .metrics import save_image_grid

        labs = torch.arange(NUM_CLASSES)
        imgs = sample_euler(ema, labs, seed=0, steps=20, guidance=3.0)
        save_image_grid(imgs, os.path.join(sample_dir, f"{tag}.png"), nrow=NUM_CLASSES, scale=2)

    history: list[dict] = []
    if init_from is not None:  # keep the record of the stages that produced the starting model
        prev = model.config.get("training") or {}
        if prev.get("completed"):
            history.extend(h for h in prev["completed"] if h.get("stage", 0) < start_stage)
        elif "steps" in prev:
            history.append({"stage": 1, "steps": prev["steps"], "lr": prev.get("lr"),
                            "wall_seconds": prev.get("wall_seconds")})

    def recipe_summary(final_loss: float, done: bool) -> dict:
        return {"training": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in RECIPE.items() if k != "stages"},
            "time_sampling": time_sampling or RECIPE["time_sampling"],
            "stages": stages, "completed": history, "finished": done,
            "seed": seed, "batch_size": batch_size, "num_data": num_data, "data_seed": data_seed, "amp": amp,
            "compile": forward is not model, "optimizer": optimizer,
            "init_from_stage": start_stage, "final_loss_ema100": final_loss,
            "wall_seconds": round(time.time() - t_start, 1), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.machine(),
        }}

    losses: list[float] = []
    pending: list[torch.Tensor] = []  # off the CPU: losses still on the device, read at log points only

    def host_losses() -> list[float]:
        losses.extend(float(v) for v in pending)
        pending.clear()
        return losses
    global_step = sum(int(stages[i]["steps"]) for i in range(start_stage - 1))  # EMA warm-up continues
    stopped = False
    for si in run_stages:
        st = stages[si]
        n_steps, stage_lr = int(st["steps"]), float(st["lr"])
        warmup = min(int(st["warmup_steps"]), max(1, n_steps // 10))
        if si > start_stage - 1:
            # next stage: restart from the EMA weights, rounded to float16 like a saved model
            with torch.no_grad():
                for pm, pe in zip(model.parameters(), ema.parameters()):
                    pe.copy_(pe.half().float())
                    pm.copy_(pe)
        opts = make_optimizers(model, optimizer, stage_lr)
        gen = torch.Generator().manual_seed(seed + 12345 + 1000 * si)
        perm = torch.randperm(num_data, generator=gen)
        pos = 0
        last_log = time.time()
        done_steps = 0
        for step in range(n_steps):
            if minutes is not None and time.time() - t_start > minutes * 60:
                _log(f"[glyph-flow] time cap of {minutes} min reached in stage {si + 1} at step {step}", bar)
                stopped = True
                break
            if pos + batch_size > num_data:
                perm = torch.randperm(num_data, generator=gen)
                pos = 0
            idx = perm[pos:pos + batch_size]
            pos += batch_size
            x0 = data[idx].float() / 127.5 - 1.0
            lab = data_labels[idx].clone()
            drop = torch.rand(batch_size, generator=gen) < RECIPE["label_dropout"]
            lab[drop] = NULL_LABEL
            noise = torch.randn(x0.shape, generator=gen)
            t = t_law(batch_size, gen)
            if device != "cpu":
                x0, lab, noise, t = (a.to(device, non_blocking=True) for a in (x0, lab, noise, t))
            tt = t.view(-1, 1, 1, 1)
            xt = tt * noise + (1 - tt) * x0
            target = noise - x0

            cur_lr = _lr_at(step, n_steps, stage_lr, warmup, RECIPE["min_lr_ratio"])
            for opt in opts:
                for g in opt.param_groups:
                    g["lr"] = cur_lr
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
                try:
                    v = forward(xt, t, label=lab)
                except Exception as exc:  # noqa: BLE001 - inductor failures have many types
                    if forward is model:
                        raise
                    _log(f"[glyph-flow] torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
                         f"training eagerly", bar)
                    forward = model
                    v = model(xt, t, label=lab)
            loss = (v.float() - target).pow(2).mean()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["grad_clip"])
            for opt in opts:
                opt.step()
            ema_update(min(RECIPE["ema_decay"], (1 + global_step) / (10 + global_step)))
            if device == "cpu":
                losses.append(loss.item())
            else:
                pending.append(loss.detach())
            global_step += 1
            done_steps += 1
            if bar is not None:
                bar.update(1)
            if log_every and ((step + 1) % log_every == 0 or step + 1 == n_steps):
                host_losses()
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(
                        f"training diverged: the loss is {losses[-1]} at stage {si + 1} step {step + 1}; "
                        f"lower the learning rate (--lr) or train in float32 (--no-amp)")
                now = time.time()
                n_recent = min(log_every, len(losses))
                _log(f"[glyph-flow] stage {si + 1} step {step + 1}/{n_steps} loss {np.mean(losses[-n_recent:]):.4f} "
                     f"lr {cur_lr:.2e} {(now - last_log) / n_recent:.2f}s/it elapsed {(now - t_start) / 60:.1f}min",
                     bar)
                last_log = now
            if sample_every and (step + 1) % sample_every == 0:
                write_samples(f"stage{si + 1}_step{step + 1:06d}")
            if callback is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
                callback(global_step, ema)
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < n_steps:
                host_losses()
                save_glyph_flow(ema, out_dir, extra=recipe_summary(
                    float(np.mean(losses[-100:])), False) | {"checkpoint": {"stage": si + 1, "step": step + 1}})
        history.append({"stage": si + 1, "steps": done_steps, "lr": stage_lr,
                        "wall_seconds": round(time.time() - t_start, 1)})
        if stopped:
            break
    if bar is not None:
        bar.close()
    host_losses()
    final = float(np.mean(losses[-100:])) if losses else float("nan")
    save_glyph_flow(ema, out_dir, extra=recipe_summary(final, not stopped))
    write_samples("final")
    _log(f"[glyph-flow] done: {sum(h['steps'] for h in history if h['stage'] >= start_stage)} steps in {(time.time() - t_start) / 60:.1f} min, final loss {final:.4f}; "
         f"saved to {out_dir}")
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastflow.demo.train",
                                 description="Train the fastflow glyph demo model (reference recipe by default).")
    ap.add_argument("--out", required=True, help="output model directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="single-stage run of this many steps (default: the recipe's stages)")
    ap.add_argument("--batch-size", type=int, default=None, help=f"default {RECIPE['batch_size']}")
    ap.add_argument("--lr", type=float, default=None, help="peak lr of the (first) stage")
    ap.add_argument("--init-from", default=None, help="start from this saved model (with --start-stage)")
    ap.add_argument("--start-stage", type=int, default=1, help="first recipe stage to run (needs --init-from if > 1)")
    ap.add_argument("--minutes", type=float, default=None, help="optional wall-clock cap (makes the run time-dependent)")
    ap.add_argument("--num-data", type=int, default=None, help=f"default {RECIPE['num_data']}")
    ap.add_argument("--tiny", action="store_true", help="tiny config and 3 steps (smoke test)")
    ap.add_argument("--samples", default=None, help="directory for periodic sample grids")
    ap.add_argument("--sample-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-amp", action="store_true", help="train in float32 instead of bfloat16 autocast")
    ap.add_argument("--no-compile", action="store_true", help="train eagerly instead of through torch.compile")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--time-sampling", default=None,
                    help=f"law of t: 'uniform' or 'logit-normal(m, s)' (default {RECIPE['time_sampling']!r})")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                    help=f"default {RECIPE['optimizer']!r} (muon: Muon for the blocks' matrices, AdamW for the rest)")
    ap.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    ap.add_argument("--prediction", choices=["v", "x0"], default=None,
                    help="network output parametrisation (the model always returns v); default from the config")
    args = ap.parse_args(argv)
    config = None
    if args.prediction is not None and not args.tiny:
        config = {**DEFAULT_CONFIG, "prediction": args.prediction}
    train_glyph_flow(args.out, seed=args.seed, minutes=args.minutes, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, tiny=args.tiny, progress=not args.no_progress, log_every=args.log_every,
                     sample_dir=args.samples, sample_every=args.sample_every, num_data=args.num_data,
                     threads=args.threads, amp=not args.no_amp, config=config,
                     init_from=args.init_from, start_stage=args.start_stage, device=args.device,
                     time_sampling=args.time_sampling, compile=False if args.no_compile else None,
                     optimizer=args.optimizer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
