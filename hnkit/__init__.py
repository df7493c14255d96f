"""hnkit: NovelAI-style hypernetworks for GPT-style language models and the Stable Diffusion UNet."""

from .attach import Attachment, attach
from .checkpoint import load, save
from .errors import HnkitError
from .hypernetwork import Hypernetwork, HypernetworkConfig
from .module import HypernetworkModule
from .targets import supported_families

__version__ = "0.1.0"

__all__ = [
    "Attachment", "HnkitError", "Hypernetwork", "HypernetworkConfig", "HypernetworkModule",
    "attach", "load", "save", "supported_families", "__version__",
]
