"""A hypernetwork: ``(k, v)`` module pairs keyed by input width (the web UI's way) or by site."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from .errors import HnkitError
from .forms import FORMS, check_form, make_module
from .module import MAX_WIDTH, check_structure, legacy_dropout_structure

# How many pairs a hypernetwork may hold, so that a file cannot make hnkit build millions of modules.
# Keyed by width, a model has a few distinct attention input widths (SD 1.x: 320, 640, 768, 1280);
# keyed by site, one per attention layer (the deepest LMs have ~130, the SDXL UNet 140).
MAX_WIDTH_KEYS, MAX_SITE_KEYS = 64, 1024


@dataclass
class HypernetworkConfig:
    """Module options; the names of the web UI's ``.pt`` keys are in the comments."""

    layer_structure: list = field(default_factory=lambda: [1, 2, 1])  # layer_structure
    activation: str | None = None  # activation_func; None or "linear" = no activation
    layer_norm: bool = False  # is_layer_norm
    dropout_structure: list | None = None  # dropout_structure; None = legacy rule below
    use_dropout: bool = False  # use_dropout
    last_layer_dropout: bool = False  # last_layer_dropout
    activate_output: bool = False  # activate_output (missing in a .pt file means True)
    weight_init: str = "Normal"  # weight_initialization
    zero_init_last: bool = False  # hnkit only: last Linear starts at zero (exact identity)
    per_site: bool = False  # hnkit only: one pair per attention site instead of per width
    # hnkit only: the module form (hnkit.forms.FORMS): "mlp" (the options above) or "lowrank", of
    # rank `rank` (1 to the input width; the MLP options are not used by it)
    form: str = "mlp"
    rank: int | None = None

    def __post_init__(self):
        self.layer_structure = list(self.layer_structure)
        if self.dropout_structure is None:
            self.dropout_structure = legacy_dropout_structure(
                self.layer_structure, self.use_dropout, self.last_layer_dropout
            )
        self.dropout_structure = [float(p) for p in self.dropout_structure]
        self.use_dropout = bool(self.use_dropout or any(self.dropout_structure))
        check_structure(self.layer_structure, self.dropout_structure)
        check_form(self.form, self.rank)

    @property
    def is_linear(self) -> bool:
        """The modules are affine maps (they can be fused): an MLP without activation and layer norm."""
        return FORMS[self.form].config_is_linear(self)

    def to_dict(self) -> dict:
        """The fields, without ``form`` and ``rank`` for an MLP: its files stay as they were."""
        d = dataclasses.asdict(self)
        if self.form == "mlp":
            del d["form"], d["rank"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HypernetworkConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise HnkitError(f"unknown hypernetwork option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def pair_name(key) -> str:
    """The ModuleDict name of a key's pair: names cannot hold dots (the real key is kept apart)."""
    return str(key).replace(".", ":")


class Hypernetwork(nn.Module):
    """Named ``(k, v)`` pairs of modules of ``config.form`` (:mod:`hnkit.forms`).

    Keys are input widths (``int``: every attention site whose K/V input has that width shares the
    pair) or, with ``config.per_site``, site names (``str``, e.g. ``"layers.3.self_attn"``).
    The object is an ``nn.Module`` of its own and is never registered inside a base model.
    """

    def __init__(
        self,
        config: HypernetworkConfig | None = None,
        keys=(),
        *,
        name: str = "hypernetwork",
        step: int = 0,
        family: str | None = None,
        base_model: str | None = None,
        base_model_hash: str | None = None,
        description: str = "",
        extra: dict | None = None,
        widths: dict | None = None,
    ):
        super().__init__()
        self.config = config or HypernetworkConfig()
        self.name = name
        self.step = step
        self.family = family
        self.base_model = base_model
        self.base_model_hash = base_model_hash
        self.description = description
        # Web UI fields hnkit carries but does not use (sd_checkpoint, sd_checkpoint_name, optional_info).
        self.extra = dict(extra or {})
        # The web UI's optimizer sidecar (x.pt.optim) when one was loaded, written back by save() to
        # a .pt: {'optimizer_name', 'hash', 'optimizer_state_dict'}. See hnkit.checkpoint.
        self.optimizer_state: dict | None = None
        self._keys: list = []
        self._widths: dict = {}  # key -> input width
        self.pairs = nn.ModuleDict()
        for key in keys:
            width = key if isinstance(key, int) else (widths or {}).get(key)
            if width is None:
                raise HnkitError(f"site key {key!r} needs its input width")
            self.add_pair(key, width)

    # -- structure ---------------------------------------------------------------------------
    @property
    def keyed_by(self) -> str:
        return "site" if self.config.per_site else "width"

    def add_pair(self, key, width: int) -> None:
        if isinstance(key, int) == self.config.per_site:
            raise HnkitError(f"key {key!r} does not fit a hypernetwork keyed by {self.keyed_by}")
        if key in self._widths:
            raise HnkitError(f"duplicate hypernetwork key {key!r}")
        limit = MAX_SITE_KEYS if self.config.per_site else MAX_WIDTH_KEYS
        if len(self._keys) >= limit:
            raise HnkitError(f"more than {limit} hypernetwork keys (keyed by {self.keyed_by}); no model has that many")
        if isinstance(width, bool) or not isinstance(width, int) or not 0 < width <= MAX_WIDTH:
            raise HnkitError(f"key {key!r}: input width {width!r} is not an integer from 1 to {MAX_WIDTH}")
        self.pairs[pair_name(key)] = nn.ModuleList([make_module(self.config, width) for _ in "kv"])
        self._keys.append(key)
        self._widths[key] = width

    def keys(self) -> list:
        return list(self._keys)

    def width_of(self, key) -> int:
        return self._widths[key]

    def __contains__(self, key) -> bool:
        return key in self._widths

    def __getitem__(self, key) -> tuple[nn.Module, nn.Module]:
        if key not in self._widths:
            raise KeyError(key)
        k, v = self.pairs[pair_name(key)]
        return k, v

    def key_for(self, site):
        """The key of the pair that applies at an attention site: its name, or its input width."""
        return site.key if self.config.per_site else site.width

    def pair_for(self, site):
        """The ``(k, v)`` pair that applies at an attention site, or None."""
        key = self.key_for(site)
        return self[key] if key in self else None

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        c = self.config
        shape = (f"rank={c.rank}" if c.form == "lowrank" else
                 f"layer_structure={c.layer_structure}, activation={c.activation!r}")
        form = "" if c.form == "mlp" else f"form={c.form!r}, "
        return (f"Hypernetwork(name={self.name!r}, keyed_by={self.keyed_by}, keys={self._keys}, {form}{shape}, "
                f"params={n})")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model, config: HypernetworkConfig | None = None, *, name: str = "hypernetwork",
                  **kwargs) -> "Hypernetwork":
        """Modules for exactly the widths (or, with ``config.per_site``, the sites) ``model`` has."""
        from .targets import find_sites, model_name

        config = config or HypernetworkConfig()
        family, sites = find_sites(model)
        hn = cls(config, name=name, family=family, base_model=model_name(model), **kwargs)
        for site in sites:
            key = hn.key_for(site)
            if key not in hn:
                hn.add_pair(key, site.width)
        return hn
