"""``none``: compute every step — the reference every speed-up is measured against."""

from fastflow.hookspecs import hookimpl
from fastflow.policy import Policy


class NonePolicy(Policy):
    """Every step calls the model."""

    name = "none"


@hookimpl
def register_policies(register):
    register("none", NonePolicy, description="every step computed (the reference)")
