"""Per-pass values live no longer than the graph that needs them (issue 25): forwards with gradients
and no backward (a scoring loop without torch.no_grad(), a notebook cell run again and again, an
evaluation in train mode) leave nothing behind once their outputs are dropped, in every module form
and under gradient checkpointing; several passes before one backward still work."""

import gc
import weakref

import pytest
import torch
from diffusers import UNet2DConditionModel

import hnkit
from hnkit import Hypernetwork, HypernetworkConfig, Stack
from hnkit.kernels import Collapsed, Memo
from hnkit.models import enable_gradient_checkpointing
from hnkit.testing import CONTEXT_WIDTH, build_tiny_sd

N = 50  # forwards of the tiny Llama (a few ms each)
N_UNET = 20  # forwards of the tiny UNet (about 80 ms each with gradients)

LINEAR = HypernetworkConfig([1, 2, 1], "linear", weight_init="XavierNormal")
LINEAR_PER_SITE = HypernetworkConfig([1, 2, 1], "linear", weight_init="XavierNormal", per_site=True)
RELU = HypernetworkConfig([1, 2, 1], "relu", weight_init="XavierNormal")
RELU_PER_SITE = HypernetworkConfig([1, 2, 1], "relu", weight_init="XavierNormal", per_site=True)


def made_values(monkeypatch) -> list:
    """Weak references to the tensors of every per-pass value the kernels make from now on (a
    Collapsed kernel's products; a Memo's K and V inputs, not the context, which is the caller's)."""
    refs = []

    def recording(make, part):
        def wrapped(self, *args, **kwargs):
            value = make(self, *args, **kwargs)
            if value is not None:
                todo = [part(value)]
                while todo:
                    item = todo.pop()
                    if isinstance(item, torch.Tensor):
                        refs.append(weakref.ref(item))
                    else:
                        todo.extend(item)
            return value
        return wrapped

    monkeypatch.setattr(Collapsed, "make", recording(Collapsed.make, lambda value: value))
    monkeypatch.setattr(Memo, "make", recording(Memo.make, lambda value: value[1]))
    return refs


def live_tensors() -> int:
    """Tensors alive in this process, after a full collection."""
    gc.collect()
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def assert_nothing_left(call, n: int, refs: list, values: bool) -> None:
    """``call()`` (a forward with gradients whose output is dropped) ``n`` times: no per-pass value
    of those passes is alive afterwards, and the process holds no more tensors than after the first."""
    call()  # lazily made buffers (rotary tables, ...) are made once
    del refs[:]
    before = live_tensors()
    for _ in range(n):
        call()
    after = live_tensors()
    if values:
        assert len(refs) >= n  # the passes did make values (the form has some)
    assert [ref for ref in refs if ref() is not None] == []
    assert after <= before, f"{after - before} more tensors alive after {n} forwards"


FORMS = {"collapsed_shared": LINEAR, "collapsed_per_site": LINEAR_PER_SITE, "chain_per_site": RELU_PER_SITE,
         "sum": RELU, "stack": RELU}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("form", list(FORMS))
def test_forwards_with_gradients_and_no_backward_keep_nothing(form, checkpointing, load_tiny, ids,
                                                              monkeypatch):
    """A linear network takes the Collapsed kernel (products made per pass); the other forms make
    no per-pass value and must stay flat too."""
    model = load_tiny("llama")
    if checkpointing:
        enable_gradient_checkpointing(model.train())
    torch.manual_seed(0)
    nets = [Hypernetwork.for_model(model, FORMS[form], name=f"s{i}") for i in range(2)]
    if form == "sum":
        attached = [(net, 0.8) for net in nets]
    elif form == "stack":
        attached = Stack(nets)
    else:
        attached = nets[0]
    refs = made_values(monkeypatch)
    with hnkit.attach(model, attached, [0.5, 0.8] if form == "stack" else 0.8, blend="sum") as handle:
        if form.startswith("collapsed"):
            assert all(isinstance(k, Collapsed) for k in handle.kernels)
        out = model(ids, use_cache=False).logits
        assert out.requires_grad  # gradients are on: each pass records a graph
        del out
        assert_nothing_left(lambda: model(ids, use_cache=False), N, refs, values=form.startswith("collapsed"))


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.mark.parametrize("config", [RELU, LINEAR, RELU_PER_SITE], ids=["memo", "memo_collapsed", "per_site"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_unet_forwards_with_gradients_and_no_backward_keep_nothing(config, checkpointing, sd1_dir,
                                                                   monkeypatch):
    """The SD UNet's cross-attention context (a Memo, over a Chain or a Collapsed kernel) and the
    self-attention sites (Collapsed for the linear network)."""
    unet = UNet2DConditionModel.from_pretrained(sd1_dir, subfolder="unet").eval()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    torch.manual_seed(0)
    hn = Hypernetwork.for_model(unet, config)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, CONTEXT_WIDTH["sd1"], generator=g)
    refs = made_values(monkeypatch)
    with hnkit.attach(unet, hn) as handle:
        assert any(isinstance(k, Memo) for k in handle.kernels)
        assert_nothing_left(lambda: unet(latents, 10, encoder_hidden_states=context), N_UNET, refs,
                            values=True)


def test_a_dropped_pass_does_not_disturb_a_pending_backward(load_tiny, ids, monkeypatch):
    """Under checkpointing: a pass with gradients, then passes with gradients whose outputs are
    dropped, then the first pass's backward: the same gradients as its backward alone, and every value
    is gone once that pass's loss is dropped too."""
    torch.manual_seed(0)
    hn = Hypernetwork.for_model(load_tiny("llama"), LINEAR)
    refs = made_values(monkeypatch)
    grads = []
    for others in (0, 3):
        model = load_tiny("llama")
        enable_gradient_checkpointing(model.train())
        hn.zero_grad()
        with hnkit.attach(model, hn):
            loss = model(ids, labels=ids, use_cache=False).loss
            for _ in range(others):
                model(ids.flip(0), use_cache=False)  # dropped: scored, never backpropagated
            assert refs[0]() is not None  # the first pass's values: its graph holds them
            loss.backward()
            del loss
            gc.collect()
            assert len(refs) == 4 * (1 + others) and all(ref() is None for ref in refs)  # still attached
        grads.append([p.grad.clone() for p in hn.parameters()])
        del refs[:]
    assert all(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
