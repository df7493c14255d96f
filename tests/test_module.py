"""HypernetworkModule: the web UI's child order (it decides .pt key names), options and init."""

import copy

import pytest
import torch
from torch import nn

from hnkit import HnkitError, HypernetworkConfig, HypernetworkModule
from hnkit.module import legacy_dropout_structure


def kinds(module):
    return [type(m).__name__ for m in module.linear]


def test_child_order_reproduces_the_key_names():
    m = HypernetworkModule(8, [1, 2, 1], "relu", layer_norm=True, dropout_structure=[0, 0.3, 0])
    assert kinds(m) == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm"]
    assert list(m.state_dict()) == [
        "linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias",
        "linear.4.weight", "linear.4.bias", "linear.5.weight", "linear.5.bias",
    ]
    m = HypernetworkModule(8, [1, 1.5, 2, 1], "tanh", activate_output=True, dropout_structure=[0, 0.1, 0.2, 0])
    assert kinds(m) == ["Linear", "Tanh", "Dropout", "Linear", "Tanh", "Dropout", "Linear", "Tanh"]
    assert [tuple(p.shape) for p in m.parameters()] == [(12, 8), (12,), (16, 12), (16,), (8, 16), (8,)]
    assert kinds(HypernetworkModule(8, [1, 2, 1], "linear")) == ["Linear", "Linear"]
    assert kinds(HypernetworkModule(8, [1, 2, 1], None, activate_output=True)) == ["Linear", "Linear"]


def test_activation_names():
    assert isinstance(HypernetworkModule(4, activation="swish").linear[1], nn.Hardswish)  # not SiLU
    for name, cls in [("relu", nn.ReLU), ("leakyrelu", nn.LeakyReLU), ("elu", nn.ELU), ("tanh", nn.Tanh),
                      ("sigmoid", nn.Sigmoid), ("gelu", nn.GELU), ("silu", nn.SiLU), ("mish", nn.Mish)]:
        assert isinstance(HypernetworkModule(4, activation=name).linear[1], cls)
    with pytest.raises(HnkitError, match="unknown activation 'swoosh'"):
        HypernetworkModule(4, activation="swoosh")
    with pytest.raises(HnkitError, match="unknown activation"):  # even where the last layer has none
        HypernetworkModule(4, [1, 1], activation="swoosh")


def test_legacy_dropout_rule():
    assert legacy_dropout_structure([1, 2, 1], False, True) == [0, 0, 0]
    assert legacy_dropout_structure([1, 2, 1], True, False) == [0, 0, 0]
    assert legacy_dropout_structure([1, 2, 1], True, True) == [0, 0.3, 0]
    assert legacy_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    assert legacy_dropout_structure([1, 2, 4, 2, 1], True, True) == [0, 0.3, 0.3, 0.3, 0]
    assert HypernetworkConfig([1, 2, 2, 1], use_dropout=True).dropout_structure == [0, 0.3, 0, 0]


def test_bad_structures():
    with pytest.raises(HnkitError, match="start and end with 1"):
        HypernetworkModule(4, [2, 1])
    with pytest.raises(HnkitError, match="dropout_structure"):
        HypernetworkModule(4, [1, 2, 1], dropout_structure=[0, 0.3])
    with pytest.raises(HnkitError, match="dropout_structure"):
        HypernetworkModule(4, [1, 2, 1], dropout_structure=[0, 1.5, 0])
    with pytest.raises(HnkitError, match="weight initialization"):
        HypernetworkModule(4, weight_init="Orthogonal")


def test_initializations():
    torch.manual_seed(0)
    m = HypernetworkModule(256, [1, 2, 1], "relu", layer_norm=True)
    lin, ln = m.linear[0], m.linear[2]
    assert abs(lin.weight.std().item() - 0.01) < 0.001 and torch.all(lin.bias == 0)
    assert abs(ln.weight.std().item() - 0.01) < 0.002 and torch.all(ln.bias == 0)  # LayerNorm N(0, 0.01) too
    bound = (6 / (256 + 512)) ** 0.5
    m = HypernetworkModule(256, weight_init="XavierUniform")
    assert m.linear[0].weight.abs().max() <= bound and m.linear[0].weight.abs().max() > 0.9 * bound
    m = HypernetworkModule(256, weight_init="XavierNormal")
    assert abs(m.linear[0].weight.std().item() - (2 / (256 + 512)) ** 0.5) < 0.003
    m = HypernetworkModule(256, weight_init="KaimingNormal")  # fan_in 256, gain sqrt(2)
    assert abs(m.linear[0].weight.std().item() - (2 / 256) ** 0.5) < 0.005
    m = HypernetworkModule(256, weight_init="KaimingUniform")
    assert m.linear[0].weight.abs().max() <= (6 / 256) ** 0.5
    for init in ("XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"):
        m = HypernetworkModule(16, weight_init=init)
        assert all(torch.all(m.linear[i].bias == 0) for i in (0, 1))


def test_forward_is_residual_with_strength():
    torch.manual_seed(0)
    m = HypernetworkModule(8, [1, 2, 1], "relu", weight_init="XavierNormal")
    x = torch.randn(3, 8)
    mlp = m.linear[2](torch.relu(m.linear[0](x)))
    torch.testing.assert_close(m(x, 0.7), x + 0.7 * mlp)
    assert torch.equal(m(x, 0.0), x)
    assert m(x.half(), 1.0).dtype == torch.float16  # cast at the edges, weights stay fp32
    assert m.linear[0].weight.dtype == torch.float32


def test_zero_init_last():
    m = HypernetworkModule(8, [1, 2, 1], "relu", layer_norm=True, zero_init_last=True)
    x = torch.randn(3, 8)
    assert torch.equal(m(x), x)
    assert m.linear[0].weight.abs().sum() > 0  # the rest keeps its init


def test_forward_follows_the_registered_children_through_copies_and_moves():
    # forward() walks a plain tuple of the children for speed; it must stay the same objects as
    # self.linear after deepcopy, dtype moves and load_state_dict.
    import copy

    m = HypernetworkModule(8, [1, 2, 1], "relu")
    x = torch.randn(3, 8)
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.linear[2].bias.fill_(1.0)
    assert torch.equal(m(x), x + m.linear[2](torch.relu(m.linear[0](x))))
    assert torch.equal(c(x), x + c.linear[2](torch.relu(c.linear[0](x))))
    d = HypernetworkModule(8, [1, 2, 1], "relu")
    d.load_state_dict(c.state_dict())
    assert torch.equal(d(x), c(x))
    d.double()
    assert d(x).dtype == torch.float32 and torch.allclose(d(x), c(x), atol=1e-6)


def layer_by_layer(module, x, strength):
    y = x
    for layer in module.linear:
        y = layer(y)
    return x + strength * y


@pytest.mark.parametrize("structure", [[1, 2, 1], [1, 2, 1.5, 1]])
def test_a_linear_chain_collapses_for_many_rows_with_the_same_values_and_gradients(structure):
    torch.manual_seed(0)
    m = HypernetworkModule(12, structure, None, dropout_structure=[0] + [0.2] * (len(structure) - 2) + [0],
                           weight_init="XavierNormal")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases too
    few, many = torch.randn(1, m._collapse_rows - 1, 12), torch.randn(1, m._collapse_rows, 12)
    m.eval()  # dropout is the identity: the chain is an affine map
    assert not m.collapses(few) and m.collapses(many)
    m.train()
    assert not m.collapses(many)  # active dropout: layer by layer, so each row draws its own mask
    m.eval()
    grads = []
    for run in (lambda x: m(x, 0.7), lambda x: layer_by_layer(m, x, 0.7)):
        x = many.clone().requires_grad_(True)
        out = run(x)
        out.pow(2).sum().backward()
        grads.append((out.detach(), x.grad, [p.grad.clone() for p in m.parameters()]))
        m.zero_grad()
    (out_a, dx_a, dp_a), (out_b, dx_b, dp_b) = grads
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_a, dx_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(dp_a, dp_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_only_chains_of_linear_layers_collapse():
    many = torch.randn(1000, 8)
    assert not HypernetworkModule(8, [1, 2, 1], "relu").collapses(many)
    assert not HypernetworkModule(8, [1, 2, 1], None, layer_norm=True).collapses(many)
    assert not HypernetworkModule(8, [1, 0.5, 1], None).collapses(many)  # a bottleneck: no work to save
    assert HypernetworkModule(8, [1, 2, 1], None).collapses(many)
    with pytest.raises(HnkitError, match="ReLU layer is not linear"):
        HypernetworkModule(8, [1, 2, 1], "relu").collapsed()


def test_a_kept_product_serves_calls_with_few_rows_until_a_weight_changes(monkeypatch):
    torch.manual_seed(0)
    m = HypernetworkModule(12, [1, 2, 1], None, weight_init="XavierNormal")
    few = torch.randn(2, 3, 12)
    assert not m.collapses(few)
    products = []
    original = HypernetworkModule.collapsed
    monkeypatch.setattr(HypernetworkModule, "collapsed",
                        lambda self, dtype=None: products.append(1) or original(self, dtype))
    m.keep_collapsed()
    assert len(products) == 1 and m.collapses(few)
    outs, grads = [], []
    for _ in range(3):  # three sites of one call: one product, its gradient summed over all three
        x = few.clone().requires_grad_(True)
        outs.append(m(x, 0.7))
        grads.append(x)
    assert len(products) == 1
    sum(o.pow(2).sum() for o in outs).backward()
    kept_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    for x, out in zip(grads, outs):
        torch.testing.assert_close(out, layer_by_layer(m, x, 0.7), rtol=1e-5, atol=1e-6)
    sum(layer_by_layer(m, x.detach(), 0.7).pow(2).sum() for x in grads).backward()
    for a, b in zip(kept_grads, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    with torch.no_grad():
        m.linear[0].weight.add_(0.1)  # what an optimizer step does: the kept product is stale
    assert not m.collapses(few)
    torch.testing.assert_close(m(few), layer_by_layer(m, few, 1.0), rtol=1e-5, atol=1e-6)
    m.keep_collapsed()
    with torch.no_grad():
        assert not m.collapses(few)  # kept with gradients, asked for without
    assert m.collapses(few)
    copy_ = copy.deepcopy(m)  # a copy leaves the product (and its graph) behind
    assert copy_._kept is None
    m.train()
    assert m.collapses(few)  # no dropout in this module: training mode changes nothing
    m.forget_collapsed()
    assert not m.collapses(few)
