"""Classification metrics on hand-made predictions, and exact merging across processes."""

import pytest
import torch

from mim.metrics import ClassificationEvaluator, save_confusion_matrix


def one_hot_logits(pred, k, second=None):
    logits = torch.zeros(len(pred), k)
    logits[torch.arange(len(pred)), torch.tensor(pred)] = 2.0
    if second is not None:
        logits[torch.arange(len(pred)), torch.tensor(second)] = 1.0
    return logits


def test_hand_made_predictions():
    target = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    pred = [0, 0, 1, 1, 2, 2, 2, 0, 2, 1]  # class 3 never predicted
    ev = ClassificationEvaluator(num_classes=5, topk=2)
    second = [1, 1, 0, 0, 1, 0, 0, 2, 0, 0]  # right at second guess: samples 2, 4, 7
    ev.update(one_hot_logits(pred, 5, second), torch.tensor(target))
    r = ev.compute()
    assert r["num_samples"] == 10 and r["top1"] == pytest.approx(0.6)
    assert r["top5"] == pytest.approx(0.9)  # top-2 here (topk=2): only sample 9 misses
    assert r["precision"][:4] == pytest.approx([2 / 3, 1 / 3, 3 / 4, 0.0])
    assert r["recall"][:4] == pytest.approx([2 / 3, 1 / 2, 3 / 4, 0.0])
    f1 = [2 / 3, 0.4, 0.75, 0.0]
    assert r["f1"][:4] == pytest.approx(f1)
    assert r["macro_f1"] == pytest.approx(sum(f1) / 4)  # class 4: never a target or prediction
    assert r["support"] == [3, 2, 4, 1, 0]
    assert ev.confusion[2].tolist() == [1, 0, 3, 0, 0] and ev.confusion.sum() == 10


def test_merging_shards_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(50, 6, generator=g), torch.randint(0, 6, (50,), generator=g)
    whole = ClassificationEvaluator(6)
    whole.update(logits, target)
    shards = [ClassificationEvaluator(6) for _ in range(3)]
    for r, ev in enumerate(shards):  # the sampler's exact sharding: every 3rd sample
        ev.update(logits[r::3], target[r::3])
    total = sum(torch.cat([ev.confusion.flatten(), torch.tensor([ev.topk_hits, ev.loss_sum],
                                                                dtype=torch.float64)])
                for ev in shards)
    shards[0].merge(lambda t: total)
    a, b = whole.compute(), shards[0].compute()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key]), key


def test_confusion_matrix_png(tmp_path):
    save_confusion_matrix(torch.tensor([[5.0, 1.0], [2.0, 7.0]]), ["cat", "dog"],
                          tmp_path / "cm.png", title="t")
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
