"""The backbone registry. Backbone modules register into it; ``pancls.models`` imports them (no cycle)."""
from __future__ import annotations

from pancls.registry import Registry

BACKBONES = Registry("backbone")
