"""The embedded fact world: real geography plus generated people, in the paper's release schemas."""

from .annotate import states_fact
from .profiles import PROFILES, WorldProfile, get_profile
from .store import LoadedWorld, build_world, load_world

__all__ = ["PROFILES", "WorldProfile", "get_profile", "build_world", "load_world", "LoadedWorld", "states_fact"]
