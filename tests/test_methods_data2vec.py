"""data2vec: the loss falls, the teacher moves only by its EMA (the decay schedule, timm's
update), the loss sees the masked patches only, and a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from mim.config import ConfigError, load_config
from mim.data import eval_transform
from mim.data.synthetic import SyntheticShapes
from mim.engine.optim import build_optimizer
from mim.methods import build_pretrainer
from tests.conftest import full_and_resumed_losses

TINY = ["model.arch=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8",
        "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "data.synthetic=true",
        "data.synthetic_size=64", "data.batch_size=16", "data.num_workers=0",
        "tracking.backend=none", "train.epochs=2", "train.log_every=1", "train.vis_every=0",
        "optim.warmup_epochs=0", "optim.base_lr=0.005",
        "method.name=data2vec", "method.mask_ratio=0.5", "method.mask_type=block",
        "method.block_min_patches=2", "method.top_k_layers=2", "method.ema_decay=0.99",
        "method.ema_end_decay=0.999", "method.ema_anneal_updates=40"]


def _model(*extra: str):
    torch.manual_seed(0)
    return build_pretrainer(load_config(None, TINY + list(extra)))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    tf = eval_transform(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    source = SyntheticShapes(64, 32, seed=0)
    return torch.stack([tf(source.load(i)[0]) for i in range(len(source))])


def test_loss_falls_on_synthetic_images(images):
    model = _model()
    opt = build_optimizer(model, load_config(None, TINY), lr=2e-3)
    torch.manual_seed(0)
    losses = []
    for step in range(1, 41):
        loss = model(images[torch.randint(len(images), (16,))]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_update(step)
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.92 * sum(losses[:5]), losses


def test_teacher_moves_only_by_its_ema(images):
    model = _model()
    cfg = load_config(None, TINY)
    opt = build_optimizer(model, cfg, lr=1e-2)
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in model.teacher.parameters())
    before = {k: v.clone() for k, v in model.teacher.module.state_dict().items()}
    model(images[:16]).loss.backward()
    opt.step()
    after_step = model.teacher.module.state_dict()
    assert all(torch.equal(before[k], after_step[k]) for k in before)  # the optimizer left it
    student = model.encoder.state_dict()
    assert not torch.equal(student["vit.blocks.0.mlp.fc1.weight"],
                           before["vit.blocks.0.mlp.fc1.weight"])
    model.after_update(10)  # decay 0.99 + (0.999 - 0.99) * 10 / 40
    decay = 0.99 + 0.009 * 10 / 40
    assert model.teacher_decay(10) == pytest.approx(decay) and model.teacher_decay(99) == 0.999
    for k, v in model.teacher.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, before[k] * decay + student[k] * (1 - decay))


def test_loss_counts_masked_patches_only(images):
    model = _model()
    mask = model.sample_mask(4, "cpu", torch.Generator().manual_seed(0))
    out = model(images[:4], masking=mask)
    out.pred.retain_grad()
    out.loss.backward()
    assert out.pred.shape == out.target.shape == (4, 16, 64)
    assert out.pred.grad[~mask].abs().sum() == 0 and out.pred.grad[mask].abs().sum() > 0
    # the teacher sees the whole image: its targets do not depend on the mask
    torch.testing.assert_close(model.targets(images[:4]), out.target)


def test_config_checks():
    with pytest.raises(ConfigError, match="method.top_k_layers"):
        load_config(None, TINY + ["method.top_k_layers=3"])
    with pytest.raises(ConfigError, match="method.ema_decay"):
        load_config(None, TINY + ["method.ema_decay=0.9999"])
    with pytest.raises(ConfigError, match="hog_bins"):
        load_config(None, TINY + ["method.hog_bins=9"])


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    """The teacher is part of the model state, so a resumed run's targets and losses repeat."""
    a, b = full_and_resumed_losses(TINY + ["train.save_every=2", f"run.output_dir={tmp_path}"])
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert a[-1] != a[0]
