"""Where a hypernetwork ``.pt`` loads as is: the SD web UI and ComfyUI.

Both read the web UI's dict (:mod:`hnkit.checkpoint`), keep the integer keys (input widths) and add
``strength * f(x)`` to the K and V inputs of every attention layer, self- and cross-attention, whose
input has that width. They build ``f`` from the file differently (read from their source):

- The web UI (AUTOMATIC1111, ``modules/hypernetworks/hypernetwork.py``) builds it as hnkit does. It
  knows the activations hnkit knows (its own six names, "swish" being Hardswish, plus every class of
  ``torch.nn.modules.activation`` by its lowercased name), reads ``activation_func`` None as linear
  and a missing ``activate_output`` as True, places dropout by ``dropout_structure`` and turns
  dropout off to generate.
- ComfyUI (``comfy_extras/nodes_hypernetwork.py``, ``load_hypernetwork_patch``) knows only
  :data:`COMFYUI_ACTIVATIONS` and refuses any other ``activation_func`` (None too; a missing one is
  linear). It reads a missing ``activate_output`` as False, ignores ``layer_structure`` and
  ``dropout_structure``, and builds the layers from the ``.weight`` entries of each state dict in
  order: with layer norm it counts the LayerNorm weights too, so the last Linear always gets the
  activation. Dropout (p=0.3) comes from ``use_dropout`` and ``last_layer_dropout``, and its layers
  are never switched to eval mode: they drop random hidden units while generating.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

from .errors import HnkitWarning, shown
from .forms import FORMS
from .module import ACTIVATIONS, is_linear_activation

WEB_UI, COMFYUI = "web UI", "ComfyUI"
# ComfyUI's loader knows these names and no others ("swish" is Hardswish there too)
COMFYUI_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")


class Problem(NamedTuple):
    """Why a program will not load a file (``refused``), or computes something else from it."""

    refused: bool
    text: str


class PortabilityWarning(HnkitWarning):
    """A ``.pt`` that hnkit wrote will not load, or computes something else, in the web UI or ComfyUI."""


def where_it_loads(hn) -> dict[str, list[Problem]]:
    """For the web UI and ComfyUI, why the ``.pt`` hnkit writes for ``hn`` will not load there or
    computes something else there; an empty list: it loads as is."""
    c = hn.config
    if not FORMS[c.form].webui_format or c.per_site:
        kind = f"{c.form!r}" if not FORMS[c.form].webui_format else "per-site"
        no = [Problem(True, f"a {kind} network has no .pt form (only hnkit reads its .safetensors)")]
        return {WEB_UI: no, COMFYUI: no}
    from .checkpoint import to_a1111

    return where_dict_loads(to_a1111(hn))


def where_dict_loads(data: dict) -> dict[str, list[Problem]]:
    """The same for the dict of a ``.pt``, as a file holds it."""
    return {WEB_UI: _webui_problems(data), COMFYUI: _comfyui_problems(data)}


def _webui_problems(data: dict) -> list[Problem]:
    act = data.get("activation_func")
    if is_linear_activation(act) or (isinstance(act, str) and act in ACTIVATIONS):
        return []
    return [Problem(True, f"it does not know the activation {shown(act)}")]


def _comfyui_problems(data: dict) -> list[Problem]:
    act = data.get("activation_func", "linear")
    if act is None:
        return [Problem(True, "activation_func is None, which it refuses (it wants 'linear', as hnkit convert "
                              "writes)")]
    if not (isinstance(act, str) and act in COMFYUI_ACTIVATIONS):
        return [Problem(True, f"it knows only the activations {', '.join(COMFYUI_ACTIVATIONS)}; "
                              f"not {shown(act)}")]
    problems = []
    output = _output_activation(data, act)
    if output:
        problems.append(Problem(False, output))
    if comfyui_dropouts(data):
        problems.append(Problem(False, "it adds dropout (p=0.3) for use_dropout and never turns it off, so "
                                       "every step drops random hidden units (the web UI turns it off)"))
    return problems


def _output_activation(data: dict, act: str) -> str | None:
    """Why ComfyUI does, or does not, put the activation after the last Linear where the web UI
    does not, or does; None where they agree."""
    if act == "linear":
        return None
    layer_norm = bool(data.get("is_layer_norm", False))
    webui = bool(data.get("activate_output", True))
    comfyui = layer_norm or bool(data.get("activate_output", False))
    if webui == comfyui:
        return None
    if layer_norm:
        return (f"with layer norm it puts the activation ({act}) after the last layer too, though "
                "activate_output is False")
    return (f"the file has no activate_output, which it reads as False (the web UI as True), leaving out the "
            f"activation ({act}) after the last layer")


def comfyui_dropouts(data: dict) -> int:
    """How many Dropout layers ComfyUI builds into a module: it walks the state dict's ``.weight``
    entries (a LayerNorm's too, taken in one step with its Linear) and adds one after every Linear
    but the last two, and after the last but one with ``last_layer_dropout``."""
    if not data.get("use_dropout", False):
        return 0
    n = len([name for name in _first_state_dict(data) if isinstance(name, str) and name.endswith(".weight")])
    step = 2 if data.get("is_layer_norm", False) else 1
    last_dropout = bool(data.get("last_layer_dropout", False))
    return sum(1 for i in range(0, n, step) if i < n - 2 or (i == n - 2 and last_dropout))


def _first_state_dict(data: dict) -> dict:
    for key, pair in data.items():
        if isinstance(key, int) and isinstance(pair, (tuple, list)) and pair and isinstance(pair[0], dict):
            return pair[0]
    return {}


# -- what inspect shows and save warns -----------------------------------------------------------
def verdict(problems: list[Problem]) -> str:
    """"yes", "no: why" (it will not load) or "differently: why" (it loads, computes something else)."""
    if not problems:
        return "yes"
    how = "no" if any(p.refused for p in problems) else "differently"
    return f"{how}: " + "; ".join(p.text for p in problems)


def summary(report: dict[str, list[Problem]]) -> str | None:
    """One line on the programs where a ``.pt`` will not load or loads differently; None: none."""
    parts = []
    for program, problems in report.items():
        if problems:
            how = "will not load it" if any(p.refused for p in problems) else "loads it differently"
            parts.append(f"{program} {how}: {'; '.join(p.text for p in problems)}")
    return ". ".join(parts) or None


def warn_if_not_portable(path, data: dict) -> None:
    """One PortabilityWarning when the ``.pt`` dict ``data`` written to ``path`` will not load, or
    loads differently, in the web UI or ComfyUI (called by :func:`hnkit.checkpoint.save`)."""
    line = summary(where_dict_loads(data))
    if line:
        warnings.warn(f"{path}: {line}", PortabilityWarning, stacklevel=3)


def inspect_rows(path, hn) -> list[tuple[str, str]]:
    """``hnkit inspect``'s "loads in" rows: a web UI ``.pt`` as the file is; hnkit's ``.safetensors``
    as the ``.pt`` that ``hnkit convert`` would write from it."""
    from .checkpoint import _looks_like_safetensors
    from .safe_load import load_plain

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):
        heading, report = f"as a .pt (hnkit convert {path.name} {path.stem}.pt)", where_it_loads(hn)
    else:
        heading, report = "as is", where_dict_loads(load_plain(path))
    return [("loads in", heading)] + [(f"  {program}", verdict(problems)) for program, problems in report.items()]
