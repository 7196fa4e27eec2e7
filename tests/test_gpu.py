"""The core on a CUDA device: the same numbers as on the CPU, and a monitored GPU training run.

These need a GPU and are skipped without one (CI has none); they run on a lent GPU machine
with ``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from callback_helpers import TRAINER_KW, TinyNet, brute_cka, brute_mutual_knn, loader, read_scalars, synthetic_data, tiny_features
from lightning.pytorch.loggers import TensorBoardLogger

from prh_lightning import alignment_matrix
from prh_lightning.callbacks import AlignmentMonitor
from prh_lightning.functional import cknna, mutual_knn, unbiased_cka
from prh_lightning.metrics import CKA, MutualKNN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _layers(seed: int, n: int = 300, dims=(16, 32, 64)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    return [base @ torch.randn(8, d, generator=g) + 0.5 * torch.randn(n, d, generator=g) for d in dims]


@pytest.mark.parametrize("metric, kwargs", [("mutual_knn", {"k": 10}), ("cknna", {"k": 10}), ("unbiased_cka", {}), ("cka", {})])
def test_alignment_matrix_on_gpu_equals_cpu(metric, kwargs):
    xs, ys = _layers(0), _layers(1)
    on_cpu = alignment_matrix(xs, ys, metric=metric, **kwargs)
    on_gpu = alignment_matrix([x.cuda() for x in xs], [y.cuda() for y in ys], metric=metric, **kwargs)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=0)


def test_functional_metrics_on_gpu_equal_brute_force():
    a, b = _layers(2, n=200, dims=(24, 40))
    a_unit, b_unit = [torch.nn.functional.normalize(x, dim=1) for x in (a, b)]
    assert mutual_knn(a_unit.cuda(), b_unit.cuda(), k=7).item() == pytest.approx(brute_mutual_knn(a, b, 7), abs=1e-6)
    assert 0.0 < unbiased_cka(a.cuda(), b.cuda()).item() <= 1.0
    assert cknna(a_unit.cuda(), b_unit.cuda(), k=7).item() == pytest.approx(cknna(a_unit, b_unit, k=7).item(), abs=1e-4)


def test_metric_classes_on_gpu_stream_to_the_full_batch_value():
    a, b = _layers(3, n=256, dims=(20, 30))
    cka, knn = CKA(normalize=True).cuda(), MutualKNN(k=5, normalize=True).cuda()
    for chunk in range(0, 256, 64):
        cka.update(a[chunk : chunk + 64].cuda(), b[chunk : chunk + 64].cuda())
        knn.update(a[chunk : chunk + 64].cuda(), b[chunk : chunk + 64].cuda())
    assert cka.compute().item() == pytest.approx(brute_cka(a, b), abs=1e-5)
    assert knn.compute().item() == pytest.approx(brute_mutual_knn(a, b, 5), abs=1e-6)


def test_monitor_on_a_gpu_training_run_logs_the_brute_force_values(tmp_path):
    L.seed_everything(0)
    x, y = synthetic_data(96, seed=0)
    probe_x, _ = synthetic_data(40, seed=5)
    model = TinyNet()
    initial = copy.deepcopy(model)
    monitor = AlignmentMonitor(probe=probe_x, layers=["conv1", "conv2", "fc"], metrics=("cka", "mutual_knn"), k=5)
    trainer = L.Trainer(
        **{**TRAINER_KW, "accelerator": "gpu"}, devices=1, max_epochs=2, callbacks=[monitor],
        logger=TensorBoardLogger(str(tmp_path), name="", version=""), log_every_n_steps=1,
    )
    trainer.fit(model, loader(x, y), loader(x[:32], y[:32]))
    assert trainer.strategy.root_device.type == "cuda"

    now, then = tiny_features(model.cpu(), probe_x), tiny_features(initial, probe_x)
    scalars = read_scalars(str(tmp_path))
    for layer in ("conv1", "conv2", "fc"):
        logged = scalars[f"alignment/cka/self_initial/{layer}"][-1][1]
        assert logged == pytest.approx(brute_cka(now[layer], then[layer]), abs=1e-4)
        logged = scalars[f"alignment/mutual_knn/self_initial/{layer}"][-1][1]
        assert logged == pytest.approx(brute_mutual_knn(now[layer], then[layer], 5), abs=1e-6)
