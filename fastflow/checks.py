"""What the sampling loops check of a model's output, without a sync per step: the
shape once, finiteness once at the end of a sample (from one device sum per evaluation)."""

from __future__ import annotations

from .errors import NonFiniteError, OptionError


def check_velocity(v, x) -> None:
    """Once per sample (shape and type are host metadata: no sync): a velocity that is
    not a tensor of the sample's shape would broadcast into garbage."""
    import torch

    if not torch.is_tensor(v):
        raise OptionError(f"the model returned {type(v).__name__}, not a torch tensor; it must return the "
                          f"velocity, a tensor of the input's shape {tuple(x.shape)}")
    if tuple(v.shape) != tuple(x.shape):
        raise OptionError(f"the model returned a velocity of shape {tuple(v.shape)} for an input of shape "
                          f"{tuple(x.shape)}; they must be equal (one velocity per sample and element)")


def check_finite(sums, computed_steps, x, ts) -> None:
    import torch

    finite = torch.isfinite(torch.stack(sums)).tolist()  # the one sync of the sample
    for ok, k in zip(finite, computed_steps):
        if not ok:
            raise NonFiniteError(
                f"the model returned a NaN or Inf velocity at step {k} (t={ts[k]:.4f}); "
                f"the output would be garbage, so the run stopped. Check the model, its "
                f"dtype (try float32) and the inputs."
            )
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(
            "the sample became NaN or Inf although every computed velocity was finite: the "
            "extrapolation overflowed. Use a smaller skip (e.g. --option arms=0,1,2) or float32."
        )
