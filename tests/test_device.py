"""Every stage on the accelerator in bf16: on a CUDA machine these run on the GPU (the checks a GPU session
owes: `pytest tests/test_device.py`); elsewhere on the CPU under bf16 autocast, so CI keeps the bf16 path and
these tests honest. DOWNSCALE_TEST_DEVICE=cpu|cuda picks the device by hand."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from downscale import kd, pipeline
from downscale.ensemble import EnsembleModel
from test_evaluate import SECTIONS
from tiny import fake_data_run, tiny_model

DEVICE = torch.device(os.environ.get("DOWNSCALE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(autouse=True)
def _tf32_as_it_was():
    """The stages set TF32 process-wide (run.tf32); the fp32 comparisons below must not inherit it."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device")
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    sections = {**SECTIONS, "run": {"device": DEVICE.type, "precision": "bf16"}}
    sections["specialize"] = {**SECTIONS["specialize"], "teacher": "cache", "cache_top_k": 16}
    cfg = fake_data_run(tmp, **sections)
    try:
        return cfg, pipeline.run_all(cfg, log=lambda m: None)
    finally:  # the pipeline ran with TF32 on (run.tf32's default); the tests after it compare fp32 to float64
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_whole_pipeline_in_bf16_on_the_device(bf16_run) -> None:
    cfg, entries = bf16_run
    assert all(e["status"] == "complete" for e in entries.values()), {k: e["status"] for k, e in entries.items()}
    res = json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    for r in res["rows"]:
        assert all(math.isfinite(v) and v > 0 for v in r["loss"].values()), r["name"]
    base = next(r for r in res["rows"] if r["kind"] == "base")["loss"]["pooled"]
    pruned = [r["loss"]["pooled"] for r in res["rows"] if r["kind"] == "pruned"]
    assert min(pruned) > base  # pruning costs loss ...
    for i in range(3):  # ... and specialization (KD from the bf16 teacher cache + CE) wins some back on the shard
        summary = json.loads((cfg.run_dir / "specialized" / str(i) / "train_summary.json").read_text())
        shard = summary["shard"]
        assert summary["after"][shard]["ce"] < summary["before"][shard]["ce"], summary
        assert summary["peak_memory_kind"] == ("cuda_max_allocated" if DEVICE.type == "cuda" else "process_peak_rss")


def test_saved_models_are_fp32_on_disk(bf16_run) -> None:
    """bf16 is the compute precision only: master weights and trained folders stay fp32. The pruned students keep
    the dtype compress loaded the base in: base.dtype auto is bf16 on a GPU (an 8B base in fp32 would not fit
    next to the calibration), fp32 on a CPU."""
    from safetensors import safe_open

    cfg, _ = bf16_run
    pruned = "BF16" if DEVICE.type == "cuda" and torch.cuda.is_bf16_supported() else \
        "F16" if DEVICE.type == "cuda" else "F32"
    for folder, want in (("base", "F32"), ("students/0", pruned), ("specialized/0", "F32"), ("eval/control", "F32")):
        with safe_open(str(cfg.run_dir / folder / "model.safetensors"), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {want}, (folder, dtypes)


def test_ensemble_fast_path_equals_sequential_on_the_device() -> None:
    students = [tiny_model("llama", seed=10 + i, vocab_size=128).to(DEVICE) for i in range(3)]
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ens = EnsembleModel(students, mode="prob_mean")
    assert ens.uses_fast_path and ens.device.type == DEVICE.type
    fast = ens(ids).logits
    fast_gen = ens.generate(ids[:, :8], max_new_tokens=6, eos_token_id=[])
    ens.fast = False
    torch.testing.assert_close(fast, ens(ids).logits, atol=1e-4, rtol=0)
    assert torch.equal(fast_gen, ens.generate(ids[:, :8], max_new_tokens=6, eos_token_id=[]))
    ens.fast = True
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        low = ens(ids).logits
    assert float((low.float() - fast).abs().max()) < 0.1


def test_fused_kd_loss_on_the_device_equals_a_float64_reference() -> None:
    """The fused chunked loss and its gradients on the device against full-vocabulary logits in float64."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(40, 16, generator=g), torch.randn(128, 16, generator=g)
    th, tw = torch.randn(40, 24, generator=g), torch.randn(128, 24, generator=g)
    labels = torch.randint(0, 128, (40,), generator=g)

    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    logq = torch.log_softmax(h64 @ w64.T, -1)
    logp = torch.log_softmax(th.double() @ tw.double().T, -1)
    ref = 0.5 * torch.nn.functional.nll_loss(logq, labels) + 0.5 * (logp.exp() * (logp - logq)).sum(-1).mean()
    ref.backward()

    hd, wd = h.to(DEVICE).requires_grad_(), w.to(DEVICE).requires_grad_()
    teacher = kd.DenseTeacher(th.to(DEVICE), tw.to(DEVICE))
    loss, _ = kd.distill_loss(hd, wd, labels.to(DEVICE), teacher, kd_ratio=0.5, chunk_tokens=7)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)
    torch.testing.assert_close(hd.grad.cpu().double(), h64.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(wd.grad.cpu().double(), w64.grad, atol=1e-6, rtol=1e-4)
