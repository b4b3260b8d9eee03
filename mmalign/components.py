"""Load a component (a policy, a judge, a feedback source) by its dotted class path.

Configs and command lines name classes as strings (``models.policy.HFPolicy``) so that
``mmalign`` never imports ``models``: the dependency points from the glue outward, at run time.
"""

from __future__ import annotations

import importlib
from typing import Any


def load_component(class_path: str, **kwargs: Any) -> Any:
    """Instantiate ``package.module.Class(**kwargs)`` (a Policy or a feedback source)."""
    module, _, name = class_path.rpartition(".")
    if not module:
        raise ValueError(f"{class_path!r} is not a class path like 'models.policy.HFPolicy'")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {class_path!r}: {e}") from None
    return cls(**kwargs)
