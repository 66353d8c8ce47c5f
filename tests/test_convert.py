"""fastnn.convert on real models (random init) and tutorial-style models.

For each model: the report lists the replacements counted here from the model's own structure,
eval outputs match the original (fp32, relative error <= 1e-5), and a training step gives the
same loss, gradients and BatchNorm statistics. DropBlock is random, so its models are compared
with drop_prob = 0 in training (and in eval, where it is off).
"""
import copy
import io
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastnn
import fastnn.nn as fnn
from fastnn.conversion import load_original_state_dict, original_state_dict

try:
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.ops.misc import Conv2dNormActivation
except Exception:  # noqa: BLE001 - e.g. torchvision beside a torch it was not built for
    torchvision = None

try:
    import timm
    from timm.layers import DropBlock2d as TimmDropBlock2d
except Exception:  # noqa: BLE001
    timm = None

needs_tv = pytest.mark.skipif(torchvision is None, reason="torchvision does not import here")
needs_timm = pytest.mark.skipif(timm is None, reason="timm does not import here")

EVAL_TOL = 1e-5   # the bar for eval outputs (fp32)
GRAD_TOL = 1e-4   # per-tensor relative error of gradients after a whole network's backward


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def convert(model, **kw):
    out = fastnn.convert(model, **kw)
    assert isinstance(out.fastnn_report, fastnn.ConversionReport)
    return out, out.fastnn_report


def assert_counts(report, expected):
    got = report.counts()
    want = {k: v for k, v in expected.items() if v}
    assert got == want, f"replacements {got}, expected {want}\n{report}"


def check_eval(orig, conv, *inputs, tol=EVAL_TOL):
    orig.eval()
    conv.eval()
    with torch.no_grad():
        a, b = orig(*inputs), conv(*inputs)
    assert rel(b, a) <= tol, f"eval output rel err {rel(b, a):.2e}"
    return a


def check_train_step(orig, conv, report, *inputs, tol=GRAD_TOL):
    """One forward + backward in train mode: same loss, same gradient per parameter (mapped to the
    original's names), same running statistics afterwards."""
    orig.train()
    conv.train()
    for m in (orig, conv):
        m.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks (fastnn's Conv-BN blocks draw no random numbers)
    la = orig(*inputs).float().square().mean()
    torch.manual_seed(1)
    lb = conv(*inputs).float().square().mean()
    la.backward()
    lb.backward()
    assert rel(lb, la) <= 1e-5, (la.item(), lb.item())
    ga = {k: p.grad for k, p in orig.named_parameters()}
    gb = report.to_original_keys({k: p.grad for k, p in conv.named_parameters()})
    assert set(ga) == set(gb)
    # per tensor: relative error, with the whole gradient's rms as the floor (a BatchNorm bias
    # followed by another BatchNorm has a gradient of ~1e-11, all rounding)
    rms = torch.cat([g.detach().double().flatten() for g in ga.values() if g is not None]).square().mean().sqrt()
    for k in ga:
        assert (ga[k] is None) == (gb[k] is None), k
        if ga[k] is not None:
            a, b = ga[k].double(), gb[k].double()
            err = (a - b).norm()
            assert err <= tol * (a.norm() + rms * a.numel() ** 0.5), f"grad {k}: rel err {rel(b, a):.2e}"
    sa, sb = orig.state_dict(), original_state_dict(conv)
    assert set(sa) == set(sb)
    for k in sa:
        if sa[k].is_floating_point():
            assert rel(sb[k], sa[k]) <= 1e-5 or (sa[k] - sb[k]).abs().max() <= 1e-6, k
        else:
            assert torch.equal(sa[k], sb[k]), k


def check_state_dict_both_ways(orig, conv, fresh, *inputs):
    """converted -> a fresh unconverted model, and the original's state -> the converted model."""
    fresh.load_state_dict(original_state_dict(conv))  # strict
    check_eval(conv, fresh, *inputs)
    conv2 = copy.deepcopy(conv)
    for p in conv2.parameters():
        p.data.add_(0.5)
    load_original_state_dict(conv2, orig.state_dict())  # strict
    check_eval(orig, conv2, *inputs)


def found_by(report, new_type):
    return Counter(r.found_by for r in report.replacements if r.new == new_type)


# ----------------------------------------------------------------------------- torchvision

def tv_expected(model):
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    relu_convs = sum(1 if isinstance(b, BasicBlock) else 2 for b in blocks)
    downs = sum(b.downsample is not None for b in blocks)
    return {"ConvBNReLU2d": 1 + relu_convs, "ConvBN2d": len(blocks) + downs}, downs


@needs_tv
def test_torchvision_resnet18():
    model = torchvision.models.resnet18(num_classes=10)
    expected, downs = tv_expected(model)
    assert expected == {"ConvBNReLU2d": 9, "ConvBN2d": 11}
    before = copy.deepcopy(model.state_dict())
    conv, report = convert(model)
    assert_counts(report, expected)
    assert found_by(report, "ConvBN2d") == {"fx": 8, "module walk": downs}
    assert found_by(report, "ConvBNReLU2d") == {"fx": 9}
    assert not report.skipped and not report.fallbacks
    # the shared self.relu is kept (used after the residual add); conv1 + bn1 + relu call became one block
    assert isinstance(conv.layer1[0].conv1, fnn.ConvBNReLU2d) and isinstance(conv.layer1[0].relu, nn.ReLU)
    # in a Sequential the elements stay; the Sequential's forward runs the fused block for them
    down = conv.layer2[0].downsample
    assert type(down[0]) is nn.Conv2d and type(down[1]) is nn.BatchNorm2d
    block, c, b, relu = down._fastnn_plan[0]
    assert isinstance(block, fnn.ConvBN2d) and block.conv is c is down[0] and block.bn is b is down[1] and relu is None
    assert isinstance(down, nn.Sequential) and type(down).__name__ == "Sequential"
    x = torch.randn(2, 3, 64, 64)
    check_eval(model, conv, x)
    check_train_step(model, conv, report, x)
    check_state_dict_both_ways(model, conv, torchvision.models.resnet18(num_classes=10), x)
    # the rewritten modules keep their classes (a subclass with the traced forward)
    assert isinstance(conv, torchvision.models.ResNet) and isinstance(conv.layer1[0], BasicBlock)
    assert type(conv).__name__ == "ResNet" and "self.conv1(x)" in type(conv)._fastnn_fx_code
    assert isinstance(conv.bn1, nn.Identity)
    # inplace=False: the input model is untouched (module types, parameters and buffers)
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d) and type(model) is torchvision.models.ResNet
    model.load_state_dict(before)  # strict: same keys
    text = str(report)
    assert "layer1.0.conv1" in text and "ConvBNReLU2d" in text and "fx" in text and "module walk" in text


@needs_tv
def test_torchvision_resnet50_eval_and_one_step():
    model = torchvision.models.resnet50(num_classes=10)
    expected, _ = tv_expected(model)
    conv, report = convert(model)
    assert_counts(report, expected)
    assert expected == {"ConvBNReLU2d": 33, "ConvBN2d": 20}
    x = torch.randn(2, 3, 64, 64)
    check_eval(model, conv, x)
    # A training step of a randomly initialised torchvision ResNet-50 is chaotic in fp32: torch's
    # own fp32 gradients are 0.4-2% away from float64's (ReLU masks flip on rounding), and
    # fastnn's land just as far, elsewhere. In float64 the two agree to ~1e-12.
    model64 = model.double()
    conv64, report64 = convert(model64)
    check_train_step(model64, conv64, report64, x.double(), tol=1e-9)


@needs_tv
def test_torchvision_mobilenet_v3_small():
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    expected = Counter()
    for m in model.modules():
        if isinstance(m, Conv2dNormActivation) and isinstance(m[1], nn.BatchNorm2d):
            expected["ConvBNReLU2d" if len(m) > 2 and type(m[2]) is nn.ReLU else "ConvBN2d"] += 1
    assert expected["ConvBNReLU2d"] and expected["ConvBN2d"]  # ReLU and Hardswish blocks
    conv, report = convert(model)
    assert_counts(report, expected)
    assert {r.found_by for r in report.replacements} == {"module walk"}
    assert not report.rewritten  # nothing to trace: everything is in Sequentials
    x = torch.randn(2, 3, 64, 64)
    check_eval(model, conv, x)
    check_train_step(model, conv, report, x)
    check_state_dict_both_ways(model, conv, torchvision.models.mobilenet_v3_small(num_classes=10), x)


@needs_tv
def test_inplace_keeps_parameter_tensors_and_module_copies():
    model = torchvision.models.resnet18(num_classes=10)
    ids = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    conv = fastnn.convert(model, inplace=True)
    assert conv is model
    assert {id(t) for t in list(conv.parameters()) + list(conv.buffers())} == ids
    # deepcopy, pickling and train/eval of the GraphModule result
    x = torch.randn(2, 3, 32, 32)
    conv.eval()
    with torch.no_grad():
        ref = conv(x)
    dup = copy.deepcopy(conv)
    assert isinstance(dup.fastnn_report, fastnn.ConversionReport) and dup.inplanes == conv.inplanes
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (dup, loaded):
        m.eval()
        with torch.no_grad():
            assert torch.equal(m(x), ref)
        m.train()
        assert all(t.training for t in m.modules())
        assert set(original_state_dict(m)) == set(torchvision.models.resnet18(num_classes=10).state_dict())
    assert {id(t) for t in dup.parameters()}.isdisjoint(ids)


@needs_tv
def test_convert_in_eval_mode_then_train():
    model = torchvision.models.resnet18(num_classes=10).eval()
    conv, report = convert(model)
    assert not any(m.training for m in conv.modules())
    x = torch.randn(2, 3, 64, 64)  # (at 32 x 32, layer4's BatchNorms see 2 values per channel)
    check_train_step(model, conv, report, x)
    check_eval(model, conv, x)


# ----------------------------------------------------------------------------- timm

@needs_timm
def test_timm_resnet50_cbam_dropblock():
    model = timm.create_model("resnet50", drop_block_rate=0.1, block_args=dict(attn_layer="cbam"), num_classes=10)
    blocks = [m for m in model.modules() if type(m).__name__ == "Bottleneck"]
    timm_db = [m for m in model.modules() if isinstance(m, TimmDropBlock2d)]
    n_cbam = sum(type(m).__name__ == "CbamModule" for m in model.modules())
    with_db = sum(isinstance(b.drop_block, TimmDropBlock2d) for b in blocks)
    downs = sum(b.downsample is not None for b in blocks)
    # conv2 -> bn2 -> drop_block -> act2: the ReLU fuses only where drop_block is an nn.Identity
    expected = {"CBAM": n_cbam, "DropBlock2d": len(timm_db),
                "ConvBNReLU2d": 1 + len(blocks) + (len(blocks) - with_db),
                "ConvBN2d": len(blocks) + with_db + downs}
    assert n_cbam == 16 and len(timm_db) == with_db == 9
    conv, report = convert(model)
    assert_counts(report, expected)
    assert not report.skipped
    new_db = [m for m in conv.modules() if isinstance(m, fnn.DropBlock2d)]
    for a, b in zip(timm_db, new_db):
        assert (a.drop_prob, a.block_size, a.gamma_scale, a.couple_channels) == \
               (b.drop_prob, b.block_size, b.gamma_scale, b.couple_channels)
    assert isinstance(conv.layer1[0].se, fnn.CBAM) and conv.layer1[0].se.layout == "timm"
    x = torch.randn(2, 3, 64, 64)
    check_eval(model, conv, x)
    y = copy.deepcopy(conv).train()(x)  # DropBlock active: runs, finite
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    for m in list(model.modules()) + list(conv.modules()):
        if isinstance(m, (TimmDropBlock2d, fnn.DropBlock2d)):
            m.drop_prob = 0.0
    fresh = copy.deepcopy(model)
    check_train_step(model, conv, report, x)
    fresh.load_state_dict(original_state_dict(conv))
    # timm's other methods still work on the rewritten model: forward_features runs
    # conv1 (now Conv-BN-ReLU) -> bn1 (now Identity) -> act1, the same values
    model.eval()
    conv.eval()
    with torch.no_grad():
        assert rel(conv.forward_features(x), model.forward_features(x)) <= EVAL_TOL
    conv.reset_classifier(5)
    assert conv(x).shape == (2, 5) and isinstance(conv, timm.models.ResNet)


@needs_timm
def test_timm_vit_reports_sdpa():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    conv, report = convert(model)
    assert not report.replacements
    assert any("scaled_dot_product_attention" in n and "fastnn.patch_sdpa()" in n and "blocks.0.attn" in n
               for n in report.notes), report.notes
    check_eval(model, conv, torch.randn(2, 3, 32, 32))


# ----------------------------------------------------------------------------- nn.Transformer*

@pytest.mark.parametrize("batch_first,norm_first", [(True, False), (False, True)])
def test_transformer_encoder(batch_first, norm_first):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    conv, report = convert(model)
    assert_counts(report, {"MultiheadAttention": 2})
    assert all(type(l.self_attn) is fnn.MultiheadAttention for l in conv.layers)
    assert any("fast path" in n for n in report.notes)
    x = torch.randn(3, 5, 32) if batch_first else torch.randn(5, 3, 32)
    check_eval(model, conv, x)  # no grad: torch's fused encoder fast path where batch_first
    model.eval()
    conv.eval()
    xg = x.clone().requires_grad_()
    assert rel(conv(xg), model(xg)) <= EVAL_TOL  # with grad: through fastnn.nn.MultiheadAttention
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        assert rel(conv(x, mask=mask, is_causal=True), model(x, mask=mask, is_causal=True)) <= EVAL_TOL
    check_train_step(model, conv, report, x)
    fresh = nn.TransformerEncoder(copy.deepcopy(layer), 2, enable_nested_tensor=False)
    fresh.load_state_dict(conv.state_dict())  # same keys


def test_transformer_decoder_and_bare_mha():
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerDecoder(layer, 2)
    conv, report = convert(model)
    assert_counts(report, {"MultiheadAttention": 4})  # self_attn and multihead_attn per layer
    tgt, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    check_eval(model, conv, tgt, mem)
    check_train_step(model, conv, report, tgt, mem)
    mha = nn.MultiheadAttention(16, 2)
    new = fastnn.convert(mha)  # the model itself is replaced
    assert type(new) is fnn.MultiheadAttention and new.fastnn_report.counts() == {"MultiheadAttention": 1}
    q = torch.randn(5, 2, 16)
    mha.eval()
    new.eval()
    assert rel(new(q, q, q, need_weights=False)[0], mha(q, q, q, need_weights=False)[0]) <= EVAL_TOL


# ----------------------------------------------------------------------------- tutorial-style models

class TutBlock(nn.Module):
    """The classic CIFAR ResNet BasicBlock: F.relu, an nn.Sequential shortcut."""

    def __init__(self, cin, cout, stride=1, bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class TutResNet(nn.Module):
    def __init__(self, widths=(8, 16, 32, 32), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers += [TutBlock(cin, w, 1 if i == 0 else 2, bias=(i == 1)), TutBlock(w, w)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tut_expected(model):
    blocks = [m for m in model.modules() if isinstance(m, (TutBlock, CbamBlock, DropBlockBlock))]
    shortcuts = sum(len(getattr(b, "shortcut", ())) > 0 for b in blocks)
    stems = sum(isinstance(m, nn.Sequential) and len(m) == 3 and isinstance(m[0], nn.Conv2d)
                for m in model.modules())
    return blocks, shortcuts, stems


def test_tutorial_resnet18_like():
    model = TutResNet()
    blocks, shortcuts, stems = tut_expected(model)
    conv, report = convert(model)
    assert_counts(report, {"ConvBNReLU2d": stems + len(blocks), "ConvBN2d": len(blocks) + shortcuts})
    assert found_by(report, "ConvBNReLU2d") == {"module walk": stems, "fx": len(blocks)}
    assert "torch.nn.functional.relu" in report.replacements[1].detail
    x = torch.randn(2, 3, 32, 32)
    check_eval(model, conv, x)
    check_train_step(model, conv, report, x)
    check_state_dict_both_ways(model, conv, TutResNet(), x)


class ChannelAttention(nn.Module):
    def __init__(self, c, r=8):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(c, c // r, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(c // r, c, 1, bias=False))

    def forward(self, x):
        return torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))


class SpatialAttention(nn.Module):
    def __init__(self, k=7, max_first=False):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)
        self.max_first = max_first

    def forward(self, x):
        avg, mx = x.mean(1, keepdim=True), x.amax(1, keepdim=True)
        return torch.sigmoid(self.conv(torch.cat([mx, avg] if self.max_first else [avg, mx], 1)))


def test_converted_model_compiles():
    model = TutResNet()
    conv, _ = convert(model)
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 16, 16)
    check_eval(model, compiled, x)


class TutCBAM(nn.Module):
    def __init__(self, c, max_first=False, residual=False):
        super().__init__()
        self.channel_attention = ChannelAttention(c)
        self.spatial_attention = SpatialAttention(max_first=max_first)
        self.residual = residual

    def forward(self, x):
        y = x * self.channel_attention(x)
        y = y * self.spatial_attention(y)
        return x + y if self.residual else y


class CbamBlock(TutBlock):
    """Residual block with CBAM after the second conv (before the add)."""

    def __init__(self, cin, cout, stride=1, **cbam):
        super().__init__(cin, cout, stride)
        self.cbam = TutCBAM(cout, **cbam)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.cbam(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


def test_tutorial_cbam_block():
    model = nn.Sequential(CbamBlock(3, 16), CbamBlock(16, 32, 2, max_first=True), CbamBlock(32, 32, residual=True))
    blocks, shortcuts, _ = tut_expected(model)
    conv, report = convert(model)
    # the third CBAM adds its input back: not what fastnn.nn.CBAM computes, so it is skipped
    assert_counts(report, {"CBAM": 2, "ConvBNReLU2d": len(blocks), "ConvBN2d": len(blocks) + shortcuts})
    assert [s.path for s in report.skipped] == ["2.cbam"] and "probe" in report.skipped[0].reason
    assert conv[1].cbam.sa.spatial_order == "max_mean"  # found by the probe
    assert isinstance(conv[2].cbam, TutCBAM)
    x = torch.randn(2, 3, 24, 20)
    check_eval(model, conv, x)
    check_train_step(model, conv, report, x)


class DropBlockBlock(nn.Module):
    """conv-bn-relu, DropBlock, conv-bn-relu (DropBlock between the convs)."""

    def __init__(self, cin, cout, drop_block):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.drop = drop_block
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.drop(self.relu(self.bn1(self.conv1(x))))
        return self.relu(self.bn2(self.conv2(x)))


class HomemadeDropBlock(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


@needs_timm
def test_tutorial_dropblock_block():
    model = nn.Sequential(DropBlockBlock(3, 16, TimmDropBlock2d(0.2, 3)), DropBlockBlock(16, 16, HomemadeDropBlock(0.)))
    conv, report = convert(model)
    assert_counts(report, {"DropBlock2d": 1, "ConvBNReLU2d": 4})
    assert [(s.path, s.op) for s in report.skipped] == [("1.drop", "drop_block")]
    x = torch.randn(2, 3, 20, 20)
    check_eval(model, conv, x)
    conv.train()
    y = conv[0].drop(torch.ones(2, 16, 20, 20))  # drops blocks: zeros and 1 / keep-rate elsewhere
    assert (y == 0).any() and (y > 1).any()
    conv[0].drop.drop_prob = model[0].drop.drop_prob = 0.0
    check_train_step(model, conv, report, x)


class TutTransformerBlock(nn.Module):
    def __init__(self, d=32, heads=4, need_weights=True):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.need_weights = need_weights

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=self.need_weights)[0]
        return x + self.mlp(self.ln2(x))


def test_tutorial_transformer_block():
    model = nn.Sequential(TutTransformerBlock(need_weights=False), TutTransformerBlock(need_weights=True))
    conv, report = convert(model)
    assert_counts(report, {"MultiheadAttention": 2})
    x = torch.randn(2, 7, 32)
    check_eval(model, conv, x)
    check_train_step(model, conv, report, x)


def test_model_calling_sdpa_is_reported():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    model = nn.Sequential(Attn(), nn.Linear(16, 4))
    _, report = convert(model)
    assert any("Attn" in n and "patch_sdpa" in n for n in report.notes)
    _, report = convert(model, ops={"conv_bn_relu"})
    assert not report.notes


# ----------------------------------------------------------------------------- what is not converted, and why

class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        if x.mean() > 0:  # data-dependent: torch.fx cannot trace this
            x = x * 2
        return self.seq(x)


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return x * 0.5 if self.training else x


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.shared_bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y  # the conv output is used twice
        z = self.shared_bn(self.conv2(z))
        return self.shared_bn(z)  # one BatchNorm called twice


class ListModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(8), nn.BatchNorm2d(8)])

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = bn(conv(x)).relu()
        return x



class FrozenStem(nn.Module):  # forward decorated: fx would drop the decorator
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    @torch.no_grad()
    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class FrozenBlock(nn.Module):  # a no_grad region inside forward: fx records no grad-mode change
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        with torch.no_grad():
            x = F.relu(self.bn(self.conv(x)))
        return self.head(x)


class OptionalMask(nn.Module):  # an argument tested for None: fx would freeze the branch
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x, mask):
        y = self.bn(self.conv(x))
        if mask is not None:
            y = y * mask
        return y


class Taps(nn.Module):  # a Sequential run element by element, BatchNorm outputs kept (perceptual losses)
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (1, 4):
                outs.append(x)
        return torch.cat([o.flatten(1) for o in outs], 1)


@pytest.mark.parametrize("cls, why", [(FrozenStem, "decorated"), (FrozenBlock, "no_grad"),
                                      (OptionalMask, "mask")])
def test_forwards_fx_cannot_rewrite_faithfully(cls, why):
    model = cls().train()
    conv, report = convert(model)
    assert why in str(report), str(report)
    assert not report.replacements and not report.rewritten
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    args = (x, None) if cls is OptionalMask else (x,)
    model.eval()
    conv.eval()
    ya, yb = model(*args), conv(*args)
    torch.testing.assert_close(yb, ya)
    assert ya.requires_grad == yb.requires_grad


def test_sequential_elements_called_one_by_one():
    # the Sequential's elements stay the original modules (a tap reads the BatchNorm's own output); only
    # the whole-Sequential call runs the fused blocks. Before, the elements became [fused, Identity,
    # Identity] and the tapped BatchNorm outputs came back ReLU'd.
    model = Taps()
    conv, report = convert(model)
    assert_counts(report, {"ConvBNReLU2d": 2})
    assert list(conv.state_dict()) == list(model.state_dict()) and not report.key_map
    x = torch.randn(2, 3, 6, 6)
    check_eval(model, conv, x)
    check_train_step(model, conv, report, x)
    model.eval()
    conv.eval()
    torch.testing.assert_close(conv.features(x), model.features(x))
    # an edited Sequential (the plan's modules moved) runs unfused, still right
    conv.features.insert(0, nn.Identity())
    model.features.insert(0, nn.Identity())
    torch.testing.assert_close(conv.features(x), model.features(x))



class StoresFeature(nn.Module):  # a feature tap stored on self: fx records no attribute write
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        self.feat = y
        return F.relu(y)


def test_forward_that_stores_on_self_is_not_rewritten():
    model = StoresFeature().eval()
    conv, report = convert(model)
    assert "sets attributes (feat)" in str(report.fallbacks) and not report.replacements
    assert "feat" not in conv.__dict__ and "feat" not in model.__dict__  # tracing left no Proxy behind
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(conv(x), model(x))
    torch.testing.assert_close(conv.feat, model.feat)


def test_converted_sequential_under_fx_and_sliced():
    model = Taps().eval()
    conv, _ = convert(model)
    x = torch.randn(2, 3, 6, 6)
    gm = torch.fx.symbolic_trace(conv.features)  # the fused blocks are no submodules: fx sees the elements
    torch.testing.assert_close(gm(x), model.features(x))
    head = conv.features[:3]  # a slice keeps the subclass but no plan; converting it fuses again
    conv2, report = convert(head)
    assert_counts(report, {"ConvBNReLU2d": 1})
    torch.testing.assert_close(conv2(x), model.features[:3](x))

def test_hooks_inside_a_cbam_keep_it_unconverted():
    model = TutCBAM(16)
    calls = []
    model.spatial_attention.register_forward_hook(lambda *a: calls.append(1))
    conv, report = convert(model)
    assert calls == []  # convert's probe forward did not run the user's hook
    assert not report.replacements and "hooks (spatial_attention)" in str(report)
    conv(torch.randn(2, 16, 5, 5))
    assert calls == [1]

def test_untraceable_falls_back_to_module_walk():
    model = Untraceable()
    conv, report = convert(model)
    assert [(p, t) for p, t, _ in report.fallbacks] == [("", "Untraceable")]
    assert "torch.fx" in report.fallbacks[0][2]
    assert_counts(report, {"ConvBNReLU2d": 1})
    assert report.replacements[0].path == "seq.0" and report.replacements[0].found_by == "module walk"
    assert [s.path for s in report.skipped] == ["conv1"]
    assert "not traced" in str(report)
    x = torch.randn(2, 3, 12, 12)
    check_eval(model, conv, x)
    check_train_step(model, conv, report, x)


def test_mode_dependent_forward_not_rewritten():
    model = ModeDependent()
    conv, report = convert(model)
    assert "self.training" in report.fallbacks[0][2] and not report.replacements
    assert type(conv) is ModeDependent


def test_not_fused_where_unsafe():
    model = TwoUsers()
    conv, report = convert(model)
    reasons = {s.path: s.reason for s in report.skipped}
    assert "2 users" in reasons["conv"]
    assert "more than once" in reasons["conv2"]
    assert not report.replacements and not report.rewritten
    x = torch.randn(2, 3, 10, 10)
    check_eval(model, conv, x)


def test_module_list_elements():
    model = ListModel()
    conv, report = convert(model)
    assert_counts(report, {"ConvBNReLU2d": 2})
    assert isinstance(conv.convs[0], fnn.ConvBNReLU2d) and isinstance(conv.bns[1], nn.Identity)
    assert isinstance(conv.convs, nn.ModuleList)
    x = torch.randn(2, 3, 10, 10)
    check_eval(model, conv, x)
    check_train_step(model, conv, report, x)
    check_state_dict_both_ways(model, conv, ListModel(), x)
    buf = io.BytesIO()
    torch.save(conv, buf)  # the rewritten forward indexes the ModuleLists: it pickles and re-traces
    buf.seek(0)
    check_eval(conv, torch.load(buf, weights_only=False), x)


def test_subclasses_and_shared_modules_are_left_alone():
    class MyBN(nn.BatchNorm2d):
        pass

    shared = nn.Conv2d(4, 4, 1)
    hooked = nn.Conv2d(4, 4, 1)
    hooked.register_forward_pre_hook(lambda m, args: None)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), MyBN(4), nn.ReLU(), shared, nn.BatchNorm2d(4),
                          nn.Sequential(shared, nn.BatchNorm2d(4)), hooked, nn.BatchNorm2d(4))
    conv, report = convert(model)
    assert not report.replacements
    reasons = [s.reason for s in report.skipped]
    assert any("MyBN is not nn.BatchNorm2d" in r for r in reasons)
    assert sum("used at 2 places" in r for r in reasons) == 2
    assert any("hooks" in r for r in reasons)
    check_eval(model, conv, torch.randn(2, 3, 5, 5))


def test_ops_argument():
    model = TutResNet()
    with pytest.raises(ValueError, match="valid ops are.*conv_bn_relu.*cbam.*drop_block.*attention"):
        fastnn.convert(model, ops={"conv_bn_relu", "flash"})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastnn.convert(lambda x: x)
    _, report = convert(model, ops={"attention", "cbam"})
    assert not report.replacements and report.ops == ("cbam", "attention")
    walked, report = convert(model, ops="conv_bn_relu", trace=False)
    assert set(r.found_by for r in report.replacements) == {"module walk"}
    again, report2 = convert(walked)  # converting again: the rest, keys still map to the first model
    assert found_by(report2, "ConvBNReLU2d") == {"fx": len(tut_expected(model)[0])}
    TutResNet().load_state_dict(original_state_dict(again))
    m2, rep2 = fastnn.convert(model, return_report=True)
    assert rep2 is m2.fastnn_report
    assert "ConvBNReLU2d" in repr(rep2)


# ----------------------------------------------------------------------------- CUDA (GPU machine)

@pytest.fixture
def no_tf32():
    """fp32 comparisons on the GPU: TF32 convs/matmuls would differ at ~1e-3 between any two
    summation orders (here: BN folded into the conv weight vs applied after)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.cuda
@needs_tv
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_resnet18(no_tf32, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = torchvision.models.resnet18(num_classes=10).cuda().to(memory_format=fmt)
    conv, report = convert(model)
    assert_counts(report, tv_expected(model)[0])
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=fmt)
    check_eval(model, conv, x)
    check_train_step(model, conv, report, x)


@pytest.mark.cuda
@needs_timm
def test_cuda_timm_resnet50_cbam_dropblock(no_tf32):
    model = timm.create_model("resnet50", drop_block_rate=0.1, block_args=dict(attn_layer="cbam"),
                              num_classes=10).cuda()
    conv, report = convert(model)
    assert report.counts()["CBAM"] == 16 and report.counts()["DropBlock2d"] == 9 and not report.skipped
    x = torch.randn(4, 3, 64, 64, device="cuda")
    check_eval(model, conv, x)
    for m in list(model.modules()) + list(conv.modules()):
        if isinstance(m, (TimmDropBlock2d, fnn.DropBlock2d)):
            m.drop_prob = 0.0
    check_train_step(model, conv, report, x)


@pytest.mark.cuda
def test_cuda_transformer_encoder(no_tf32):
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).cuda()
    conv, report = convert(model)
    assert_counts(report, {"MultiheadAttention": 2})
    x = torch.randn(4, 33, 64, device="cuda")
    check_eval(model, conv, x)
    check_train_step(model, conv, report, x)
