"""Third-party model definitions: every level right, or a clear refusal, or a fallback that says so.

The layers and blocks below are written as model libraries write them (subclasses with their own
forward, grouped convolutions, channel-first and channel-last norms, channel splits and shuffles).
Each test compares the full level with a copy of the original model and every level with its
physically pruned export: a wrong level can never pass silently.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from elastic_utils import TOL, rel_diff
from nni_elastic import ElasticModel, UnsupportedModuleError

WIDTHS = (0.25, 0.5, 1.0)


class BNAct(nn.BatchNorm2d):
    def forward(self, x):
        return F.relu(super().forward(x)) * 3.0

class StdConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        m = w.mean(dim=(1, 2, 3), keepdim=True); v = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - m) / torch.sqrt(v + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)

def head(c, n=5):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n))

class Plain(nn.Module):
    def __init__(self, conv=nn.Conv2d, bn=nn.BatchNorm2d, c=8):
        super().__init__()
        self.c1 = conv(3, c, 3, padding=1); self.b1 = bn(c)
        self.c2 = conv(c, c, 3, padding=1); self.b2 = bn(c)
        self.head = head(c)
    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.head(x)

class Grouped(nn.Module):  # ResNeXt-like bottleneck
    def __init__(self, g=4, w=16):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1); self.bs = nn.BatchNorm2d(w)
        self.c1 = nn.Conv2d(w, w, 1); self.b1 = nn.BatchNorm2d(w)
        self.c2 = nn.Conv2d(w, w, 3, padding=1, groups=g); self.b2 = nn.BatchNorm2d(w)
        self.c3 = nn.Conv2d(w, w, 1); self.b3 = nn.BatchNorm2d(w)
        self.head = head(w)
    def forward(self, x):
        x = F.relu(self.bs(self.stem(x)))
        y = F.relu(self.b1(self.c1(x))); y = F.relu(self.b2(self.c2(y))); y = self.b3(self.c3(y))
        return self.head(F.relu(x + y))

class GN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1); self.n1 = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1); self.n2 = nn.GroupNorm(4, 16)
        self.head = head(16)
    def forward(self, x):
        return self.head(F.relu(self.n2(self.c2(F.relu(self.n1(self.c1(x)))))))

class ConvNeXtish(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2); self.sn = LayerNorm2d(c)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c); self.ln = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 4 * c); self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))
        self.head = head(c)
    def forward(self, x):
        x = self.sn(self.stem(x))
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.ln(y)))).permute(0, 3, 1, 2)
        return self.head(x + self.gamma.view(1, -1, 1, 1) * y)


class INPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1); self.n1 = nn.InstanceNorm2d(8, affine=True); self.a1 = nn.PReLU(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1); self.a2 = nn.PReLU()
        self.head = head(8)
    def forward(self, x):
        return self.head(self.a2(self.c2(self.a1(self.n1(self.c1(x))))))

class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1); self.b1 = nn.BatchNorm2d(8)
        self.t1 = nn.ConvTranspose2d(8, 12, 2, stride=2); self.b2 = nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 8, 3, padding=1)
        self.head = head(8)
    def forward(self, x):
        return self.head(self.c3(F.relu(self.b2(self.t1(F.relu(self.b1(self.c1(x))))))))

class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, stride=2, padding=1); self.b1 = nn.BatchNorm1d(8)
        self.t1 = nn.ConvTranspose1d(8, 12, 2, stride=2); self.b2 = nn.BatchNorm1d(12)
        self.head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(12, 5))

    def forward(self, x):
        return self.head(F.relu(self.b2(self.t1(F.relu(self.b1(self.c1(x)))))))


class Net3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(3, 8, 3, padding=1); self.b1 = nn.BatchNorm3d(8)
        self.c2 = nn.Conv3d(8, 8, 3, padding=1); self.b2 = nn.BatchNorm3d(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 5))
    def forward(self, x):
        return self.head(F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x)))))))

class Chunk(nn.Module):  # CSP-like equal chunks
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 1); self.b1 = nn.BatchNorm2d(16)
        self.ca = nn.Conv2d(8, 8, 3, padding=1); self.cb = nn.Conv2d(8, 8, 1)
        self.c2 = nn.Conv2d(16, 16, 1)
        self.head = head(16)
    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        a, b = x.chunk(2, dim=1)
        return self.head(self.c2(torch.cat([self.ca(a), self.cb(b)], 1)))

class UnequalSplit(nn.Module):  # MixConv-like
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 1); self.b1 = nn.BatchNorm2d(12)
        self.ks = nn.ModuleList([nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in ((4, 3), (8, 5))])
        self.c2 = nn.Conv2d(12, 12, 1)
        self.head = head(12)
    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        parts = torch.split(x, [4, 8], dim=1)
        return self.head(self.c2(torch.cat([k(p) for k, p in zip(self.ks, parts)], 1)))

class Res2(nn.Module):  # Res2Net-like split by width
    def __init__(self, width=4, scale=3):
        super().__init__()
        self.width, self.scale = width, scale
        self.c1 = nn.Conv2d(3, width * scale, 1); self.b1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in range(scale - 1)])
        self.c3 = nn.Conv2d(width * scale, 8, 1)
        self.head = head(8)
    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        spx = torch.split(x, self.width, 1)
        outs = []
        for i in range(self.scale - 1):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = F.relu(self.convs[i](sp)); outs.append(sp)
        outs.append(spx[-1])
        return self.head(self.c3(torch.cat(outs, 1)))

class Ghost(nn.Module):
    def __init__(self, inp=3, oup=13):
        super().__init__()
        self.oup = oup; init = (oup + 1) // 2
        self.primary = nn.Conv2d(inp, init, 1); self.pb = nn.BatchNorm2d(init)
        self.cheap = nn.Conv2d(init, init, 3, padding=1, groups=init); self.cb = nn.BatchNorm2d(init)
        self.c2 = nn.Conv2d(oup, 8, 1)
        self.head = head(8)
    def forward(self, x):
        x1 = F.relu(self.pb(self.primary(x))); x2 = F.relu(self.cb(self.cheap(x1)))
        out = torch.cat([x1, x2], dim=1)[:, :self.oup]
        return self.head(self.c2(out))

class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1); self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.head = head(8)
    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.head(self.c2(x))

def weightnorm():
    m = Plain()
    torch.nn.utils.parametrizations.weight_norm(m.c2)
    return m

def _channel_shuffle(x, groups):
    b, c, h, w = x.size()
    x = torch.transpose(x.view(b, groups, c // groups, h, w), 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """A ShuffleNetV2 unit (chunk, branch, concat, channel shuffle) then one plain layer."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.b = nn.Sequential(nn.Conv2d(c // 2, c // 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU())
        self.c3 = nn.Conv2d(c, 16, 3, padding=1); self.b3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x1, x2 = self.stem(x).chunk(2, dim=1)
        out = _channel_shuffle(torch.cat((x1, self.b(x2)), dim=1), 2)
        return self.fc(F.relu(self.b3(self.c3(out))).mean((2, 3)))


class ShapeBound(nn.Module):
    """A forward that hard-codes a channel count: the small levels cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1); self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1); self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.reshape(x.shape[0], 8, -1).mean(-1))


SLICED = {
    "batchnorm_subclass_with_activation": (lambda: Plain(bn=BNAct), (1, 3, 8, 8)),
    "weight_standardised_conv": (lambda: Plain(conv=StdConv), (1, 3, 8, 8)),
    "grouped_conv_resnext": (Grouped, (1, 3, 8, 8)),
    "groupnorm": (GN, (1, 3, 8, 8)),
    "layernorm_both_forms_and_layer_scale": (ConvNeXtish, (1, 3, 8, 8)),
    "instancenorm_prelu": (INPReLU, (1, 3, 8, 8)),
    "conv_transpose": (Transposed, (1, 3, 8, 8)),
    "conv3d_batchnorm3d": (Net3d, (1, 3, 4, 6, 6)),
    "conv1d_conv_transpose1d": (Net1d, (1, 3, 16)),
    "equal_chunks_csp": (Chunk, (1, 3, 8, 8)),
    "ghost_concat_then_slice": (Ghost, (1, 3, 8, 8)),
}
REFUSED = {  # model, what the message names, the groups that cannot shrink
    "unequal_split_mixconv": (UnequalSplit, "unequal chunks [4, 8]", {"ks.0", "ks.1"}),
    "split_res2net_literal_width": (Res2, "fixed channel count", {"c1"}),
    "channel_shuffle": (Shuffle, "channel shuffle", {"c1"}),
    "shufflenet_unit": (ShuffleUnit, "torch-pruning", {"b.0", "stem"}),
}


def _perturb(model: nn.Module) -> None:
    """Non-trivial norm parameters and statistics, so a wrong channel shows in the outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and t is not None:
                    t.copy_(torch.rand(t.shape, generator=gen) + (0.5 if name == "weight" else -0.5))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _model(make, shape):
    torch.manual_seed(0)
    model = make()
    _perturb(model)
    x = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(2))
    return model.eval(), x


def _check_levels(em: ElasticModel, original: nn.Module, x: torch.Tensor) -> None:
    em.eval()
    with torch.no_grad():
        em.set_level(-1)
        assert rel_diff(em(x), original(x)) <= 1e-5, "the full level must equal the original model"
        for level in range(em.num_levels):
            em.set_level(level)
            assert rel_diff(em(x), em.export(level)(x)) <= TOL, f"level {level} differs from its export"
    assert em.levels[0].macs < em.levels[-1].macs


@pytest.mark.parametrize("name", SLICED)
def test_third_party_layers_are_sliced_not_refused(name: str) -> None:
    model, x = _model(*SLICED[name])
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: every group is elastic
        em = ElasticModel(model, x[:1], widths=WIDTHS)
    assert not em.graph.problems
    _check_levels(em, original, x)


def test_own_forward_survives_slicing_and_export() -> None:
    model, x = _model(*SLICED["batchnorm_subclass_with_activation"])
    em = ElasticModel(model, x[:1], widths=WIDTHS).eval()
    assert isinstance(em.model.b1, BNAct)  # still the user's class, with its own forward
    exported = em.export(0)
    assert type(exported.b1) is BNAct and exported.b1.num_features == em.levels[0].channels["c1"]
    with torch.no_grad(), em.use_level(0):
        h = em.model.b1(em.model.c1(x))
    assert (h >= 0).all(), "the activation of BNAct.forward runs at every level"


def test_equal_chunks_keep_the_same_share_of_each_chunk() -> None:
    """``x.chunk(2, 1)`` still cuts the sliced tensor in the right place: each chunk keeps a prefix."""
    model, x = _model(*SLICED["equal_chunks_csp"])
    em = ElasticModel(model, x[:1], widths=WIDTHS)
    group = em.graph.group("c1")
    assert group.step == 2
    for level in em.levels:
        kept = set(group.order[: level.channels["c1"]])
        assert len(kept & set(range(8))) == len(kept & set(range(8, 16)))
        exported = em.export(level.index)
        assert exported.ca.in_channels == exported.cb.in_channels == level.channels["c1"] // 2


def test_ghost_module_slice_keeps_its_cut() -> None:
    """``torch.cat([x1, x2], 1)[:, :13]``: channels cut by the slice are only kept by the full level."""
    model, x = _model(*SLICED["ghost_concat_then_slice"])
    em = ElasticModel(model, x[:1], widths=(0.25, 0.5, 0.75, 1.0))
    for level in em.levels[:-1]:
        k = level.channels["cheap"]
        assert em.export(level.index).c2.in_channels == 2 * k  # no kept channel falls beyond the cut
    assert em.export(-1).c2.in_channels == 13


def test_grouped_convolution_levels_keep_every_group() -> None:
    model, x = _model(*SLICED["grouped_conv_resnext"])
    em = ElasticModel(model, x[:1], widths=WIDTHS)
    for level in em.levels:
        conv = em.export(level.index).c2
        assert conv.groups == 4 and conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
    assert em.levels[0].channels["c1"] == 4  # 0.25 of 16 channels: one per group


def test_sliced_levels_train(tmp_path) -> None:
    """Gradients reach the shared parameters through the sliced forwards, at every level."""
    model, x = _model(*SLICED["layernorm_both_forms_and_layer_scale"])
    em = ElasticModel(model, x[:1], widths=WIDTHS).train()
    for level in range(em.num_levels):
        em.zero_grad()
        with em.use_level(level):
            em(x).square().mean().backward()
        assert em.model.gamma.grad is not None and em.model.dw.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", REFUSED)
def test_what_torch_pruning_cannot_follow_is_refused_then_kept_on_request(name: str) -> None:
    make, op, groups = REFUSED[name]
    model, x = _model(make, (1, 3, 8, 8))
    with pytest.raises(UnsupportedModuleError) as info:
        ElasticModel(copy.deepcopy(model), x[:1], widths=WIDTHS)
    message = str(info.value)
    assert op in message and "\n" not in message
    assert any(repr(g) in message for g in groups) and "unsupported='keep'" in message

    with pytest.warns(UserWarning, match="full width") as record:
        em = ElasticModel(copy.deepcopy(model), x[:1], widths=WIDTHS, unsupported="keep")
    warned = " ".join(str(r.message) for r in record)
    assert groups <= set(em.graph.problems) and all(g in warned for g in em.graph.problems)
    assert all(em.levels[0].channels.get(g) is None for g in groups)
    _check_levels(em, model, x)


def test_a_forward_bound_to_a_channel_count_is_caught_by_the_self_check() -> None:
    model, x = _model(ShapeBound, (1, 3, 8, 8))
    with pytest.raises(UnsupportedModuleError, match=r"'c2'.*export.*RuntimeError"):
        ElasticModel(copy.deepcopy(model), x[:1], widths=WIDTHS)
    with pytest.warns(UserWarning, match="'c2'"):
        em = ElasticModel(copy.deepcopy(model), x[:1], widths=WIDTHS, unsupported="keep")
    assert list(em.graph.problems) == ["c2"] and em.graph.names == ["c1"]
    _check_levels(em, model, x)


def test_fallback_groups_stay_full_after_save_and_load(tmp_path) -> None:
    model, x = _model(Shuffle, (1, 3, 8, 8))
    with pytest.warns(UserWarning):
        em = ElasticModel(model, x[:1], widths=WIDTHS, unsupported="keep").eval()
    em.save(tmp_path / "elastic.pt")
    fresh, _ = _model(Shuffle, (1, 3, 8, 8))
    loaded = ElasticModel.load(tmp_path / "elastic.pt", model=fresh).eval()
    assert loaded.graph.names == em.graph.names and "c1" in loaded.graph.fixed
    with torch.no_grad():
        for level in range(em.num_levels):
            em.set_level(level)
            loaded.set_level(level)
            assert rel_diff(loaded(x), em(x)) <= TOL


def test_single_channel_groups_are_checked_and_counted_at_their_level() -> None:
    """A group of 4 channels at width 0.25 keeps exactly one channel (not read back as width 1.0)."""
    import torch_pruning as tp

    model, x = _model(lambda: Plain(c=4), (1, 3, 8, 8))
    em = ElasticModel(model, x[:1], widths=(0.25, 1.0))
    assert set(em.levels[0].channels.values()) == {1}
    macs, params = tp.utils.count_ops_and_params(em.export(0), x[:1])
    assert (em.levels[0].macs, em.levels[0].params) == (int(macs), int(params))
    assert em.levels[0].macs < em.levels[1].macs
