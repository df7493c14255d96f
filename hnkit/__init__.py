"""hnkit: NovelAI-style hypernetworks for GPT-style language models and the Stable Diffusion UNet."""

from .attach import Attachment, attach
from .checkpoint import load, save
from .errors import HnkitError
from .forms import LowRankModule
from .fuse import Fusion, fuse, unfuse
from .generator import StyleGenerator
from .hypernetwork import Hypernetwork, HypernetworkConfig
from .merge import merge
from .module import HypernetworkModule
from .stack import Stack
from .steer import StyleLibrary, after, fade_in, fade_out, steer
from .targets import supported_families

__version__ = "0.1.0"

__all__ = [
    "Attachment", "HnkitError", "Hypernetwork", "HypernetworkConfig", "HypernetworkModule", "LowRankModule",
    "attach", "load", "save", "supported_families", "__version__",
    "Fusion", "Stack", "StyleGenerator", "StyleLibrary", "after", "fade_in", "fade_out", "fuse", "merge", "steer", "unfuse",
]
