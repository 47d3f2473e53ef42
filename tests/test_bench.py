"""bench.py on the CPU: where its results go is checked before it measures anything."""
import contextlib
import io
import json
import runpy
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMALL = ["config/tinystories_debug.py", "--device=cpu", "--steps=1", "--warmup=0", "--twin=False",
         "--vocab_size=256", "--batch_size=2", "--block_size=32"]


def run_bench(monkeypatch, *args):
    """bench.py in this process up to its exit -> (exit code, stdout, stderr); a traceback counts as one."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["bench.py", *SMALL, *args])
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(REPO / "bench.py"), run_name="__main__")
        except SystemExit as e:
            if isinstance(e.code, str):  # the interpreter prints it and exits with 1
                print(e.code, file=sys.stderr)
            code = 1 if isinstance(e.code, str) else e.code or 0
        except Exception:
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


def test_unwritable_outputs_are_one_line_before_the_benchmark(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    for key in ("out_json", "profile_file"):
        for bad in (tmp_path, tmp_path / "missing" / "r.json", tmp_path / "file" / "r.json"):
            code, out, err = run_bench(monkeypatch, f"--{key}={bad}")
            assert code != 0 and "ms/step" not in out, out  # refused before it measures anything
            assert err.strip().count("\n") == 0 and "Traceback" not in err, err
            assert err.startswith(f"error: cannot write {bad} ("), err
    assert not (tmp_path / "missing").exists()
    # a good path: the probe leaves nothing behind, the results land there at the end
    code, out, err = run_bench(monkeypatch, f"--out_json={tmp_path / 'r.json'}")
    assert code == 0 and "moe:" in out, err
    assert "ms" in json.loads((tmp_path / "r.json").read_text())["moe"]



@pytest.mark.parametrize("fp16", [False, True])
def test_bench_times_the_step_train_py_takes(tmp_path, monkeypatch, fp16):
    """bench.py's step and train.py's, twice each from the same initial weights on the same batches, leave
    the same weights and expert biases: the step that bench.py times cannot drift from train.py's. fp16 (its
    grad scaler's step; on the CPU here, which pick_device refuses for users) too."""
    from test_train import TINY, make_data
    if fp16:
        import model
        monkeypatch.setattr(model, "pick_device", lambda *a: ("cpu", "float16", False, "padded", "cpu: float16"))
    make_data(tmp_path / "data")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, f"--data_dir={tmp_path / 'data'}", "--eval_iters=1",
                                      f"--out_dir={tmp_path / 'out'}", "--max_iters=2", "--warmup_iters=0",
                                      "--learning_rate=1e-4", "--min_lr=1e-4"])  # bench's AdamW: lr 1e-4
    with contextlib.redirect_stdout(io.StringIO()):
        t = runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    model_args = [a for a in TINY if not a.startswith(("--eval", "--log", "--warmup"))]
    monkeypatch.setattr(sys, "argv", ["bench.py", *model_args, "--device=cpu"])
    b = runpy.run_path(str(REPO / "bench.py"), run_name="bench")
    model, step, x, y = b["make_step"](b["base"])
    for it in range(2):
        X, Y = t["get_batch"]("train", it, 0)
        x.copy_(X), y.copy_(Y)
        step()
    ours, theirs = model.state_dict(), t["raw_model"].state_dict()
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def test_the_step_breakdown_attributes_kernels_by_name(monkeypatch):
    """The profile's kernels, by their names (on an H200 under CUDA graphs: no launching op to go by), land
    in their parts, once each; annotations that span kernels and CPU events count for nothing."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["bench.py", *SMALL])
    part_timings = runpy.run_path(str(REPO / "bench.py"), run_name="bench")["part_timings"]

    def ev(name, us, device="CUDA", annotation=False):
        return SimpleNamespace(name=name, device_type=SimpleNamespace(name=device), is_user_annotation=annotation,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))
    kernels = {  # names seen on an H200 (torch 2.11), GPU microseconds over 3 steps
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": 3000, "sm90_xmma_gemm_bf16bf16_bf16f32": 300,
        "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel1": 1500,
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": 600,
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>": 30,
        "triton_red_fused__log_softmax__log_softmax_backward_data__to_copy_add": 900,
        "triton_poi_fused__to_copy_cat_index_mul_silu_silu_backward_split_55": 1200,
        "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>": 60,
        "void at_cuda_detail::cub::detail::radix_sort::DeviceRadixSortOnesweepKernel": 30,
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": 90,
        "Memcpy DtoD (Device -> Device)": 150, "void at::native::vectorized_elementwise_kernel<FillFunctor>": 3,
        "void at::native::reduce_kernel<128, 4, ReduceOp<float>>": 6}
    events = [ev(n, us) for n, us in kernels.items()] + [
        ev("## Call CompiledFxGraph fbjugpved4yicqic ##", 99_000),  # spans the graph's kernels
        ev("Optimizer.step#AdamW.step", 99_000, annotation=True), ev("aten::mm", 99_000, device="CPU")]
    parts = part_timings(SimpleNamespace(events=lambda: events))
    assert parts == pytest.approx({
        "GEMMs: head, projections, dense and shared MLPs (cuBLAS)": 1.1, "routed experts (grouped_mm: CUTLASS)": 0.5,
        "elementwise: norms, RoPE, SiLU, dispatch/combine, casts (Triton)": 0.4,
        "cross-entropy (fused Triton)": 0.3, "attention core (SDPA: cuDNN, flash)": 0.21,
        "copies and fills": 0.051, "router: top-k and sort": 0.03, "optimizer and clipping (multi-tensor)": 0.03,
        "other kernels": 0.002})
    assert list(parts)[0].startswith("GEMMs")  # largest first
