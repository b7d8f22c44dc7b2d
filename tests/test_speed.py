"""Speed options keep behaviour: persistent workers, reduced JPEG decode, the sync-free
non-finite guard, activation checkpointing and regional compilation."""

import copy

import pytest
import torch
from PIL import Image

from mim.config import load_config
from mim.data.loader import build_epoch_loader
from mim.data.sources import decode_image, min_decode_size
from mim.data.synthetic import SyntheticShapes
from mim.data.transforms import pretrain_transform
from mim.engine.loop import step_if_finite
from mim.engine.optim import apply_speed_options, build_optimizer
from mim.methods import build_pretrainer
from tests.conftest import TINY


def _epochs(num_workers: int) -> list[torch.Tensor]:
    tf = pretrain_transform(16, (0.2, 1.0), (0.5,) * 3, (0.5,) * 3)
    loader = build_epoch_loader(SyntheticShapes(16, 24), tf, batch_size=8,
                                num_workers=num_workers, rank=0, world_size=1, seed=3)
    return [torch.cat([b["image"] for b in loader.epoch(e)]) for e in range(2)]


def test_persistent_workers_draw_each_epochs_augmentation():
    inline, workers = _epochs(0), _epochs(2)
    for a, b in zip(inline, workers):
        assert torch.equal(a, b)
    assert not torch.equal(inline[0], inline[1])


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_to_normalized_tensor_equals_totensor_normalize(mode):
    from torchvision import transforms as T

    from mim.data.transforms import ToNormalizedTensor

    img = Image.fromarray(torch.randint(0, 256, (13, 17, 3), dtype=torch.uint8).numpy()).convert(mode)
    mean, std = (0.485, 0.456, 0.406)[: len(mode)], (0.229, 0.224, 0.225)[: len(mode)]
    want = T.Normalize(mean, std)(T.ToTensor()(img))
    assert torch.equal(ToNormalizedTensor(mean, std)(img), want)


def _jpeg(path, size):
    Image.new("RGB", size, (120, 30, 200)).save(path, quality=90)
    return str(path)


def test_reduced_jpeg_decode_keeps_every_crop_at_full_resolution(tmp_path):
    side, area = min_decode_size(224, 0.2)
    assert area * 0.2 * 0.75 >= 224 * 224  # the smallest crop still has 224 px sides
    big = decode_image(_jpeg(tmp_path / "big.jpg", (2000, 1500)), side, area)
    assert big.size == (1000, 750)  # 1/4 would be 500x375, under the area bound
    assert decode_image(_jpeg(tmp_path / "mid.jpg", (1200, 900)), side, area).size == (1200, 900)
    assert decode_image(_jpeg(tmp_path / "off.jpg", (2000, 1500))).size == (2000, 1500)
    png = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500)).save(png)
    assert decode_image(str(png), side, area).size == (2000, 1500)


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_gradient_skips_the_step(fused):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=fused, foreach=None if fused else True)
    p.grad = torch.ones(3)
    assert step_if_finite(opt, torch.tensor(float("nan"))).item() == 1
    assert torch.equal(p.detach(), torch.ones(3))
    assert not opt.state or opt.state[p]["step"].item() == 0
    assert step_if_finite(opt, torch.tensor(1.0)).item() == 0
    assert opt.state[p]["step"].item() == 1 and not torch.equal(p.detach(), torch.ones(3))


def test_optimizer_is_fused_on_cpu():
    cfg = load_config(None, TINY + ["data.synthetic=true"])
    opt = build_optimizer(build_pretrainer(cfg), cfg, lr=1e-3)
    assert opt.defaults["fused"]


def _loss_and_grads(cfg):
    torch.manual_seed(0)
    model = apply_speed_options(build_pretrainer(cfg), cfg)
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    loss = model(images).loss
    loss.backward()
    return model, loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    cfg = load_config(None, TINY + ["data.synthetic=true"])
    _, loss, grads = _loss_and_grads(cfg)
    ck = copy.deepcopy(cfg)
    ck.train.grad_checkpointing = True
    model, loss_ck, grads_ck = _loss_and_grads(ck)
    assert model.encoder.vit.grad_checkpointing
    assert torch.equal(loss, loss_ck)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ck))


@pytest.mark.slow
def test_compile_keeps_state_dict_names_and_loss():
    cfg = load_config(None, TINY + ["data.synthetic=true"])
    eager, loss, _ = _loss_and_grads(cfg)
    cc = copy.deepcopy(cfg)
    cc.train.compile = True
    compiled, loss_c, _ = _loss_and_grads(cc)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-5)
