"""The trainer side on a GPU, in one command, for a machine with torch and transformers but neither vLLM
nor a package registry (`make gpu-check`, or `python3 scripts/gpu_check.py` in the repository root).

    1. dvp.py's specification on CUDA: test_dvp.py, whose device-parametrised tests then run on the GPU too
       (the fast path against the plain definition in float64/float32/bfloat16, at the GPU's own block size);
    2. `scripts/bench.py --device cuda --only logits`: DVP's log-probs against log_softmax + gather;
    3. `scripts/bench.py --device cuda --only grpo`: one default GRPO step's trainer phase (SmolLM2-135M's
       shapes; random weights when the embedded model's package is not installed), fp32 and bf16, against
       the GPU's own matmul rate.
Each part has a time limit (the whole check about 6 minutes on one H200); the summary at the end names
the GPU and each part's result. Needs pytest for part 1 (it says so when it is missing).
"""
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = [("dvp.py specification (test_dvp.py)", [sys.executable, "-m", "pytest", "-q", "-x", "test_dvp.py"], 150),
         ("log-prob kernels (bench.py --only logits)", [sys.executable, "scripts/bench.py", "--device", "cuda",
                                                         "--only", "logits"], 120),
         ("GRPO-step trainer phase (bench.py --only grpo)", [sys.executable, "scripts/bench.py", "--device", "cuda",
                                                              "--only", "grpo"], 120)]


def main():
    try:
        import torch
    except ImportError:
        sys.exit(f"gpu_check: {sys.executable} has no torch; run it with the Python that has torch and CUDA "
                 "(make gpu-check PY=/path/to/python)")
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability(0)
    gpu = f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor})"
    print(f"GPU check on {gpu}, torch {torch.__version__}", flush=True)
    summary = []
    for name, cmd, limit in PARTS:
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            out, status = r.stdout + r.stderr, "ok" if r.returncode == 0 else f"FAILED (exit {r.returncode})"
        except subprocess.TimeoutExpired as e:
            out, status = (e.stdout or b"").decode() + (e.stderr or b"").decode(), f"TIMED OUT after {limit} s"
        print(out, flush=True)
        lines = [x for x in out.splitlines() if x.strip()]
        key = [x for x in lines if "passed" in x or "failed" in x or "worst" in x or x.startswith("bf16") or
               x.startswith("| float32") or x.startswith("| bfloat16")]
        summary.append((name, status, time.time() - t0, key[-3:] or lines[-1:]))
    print(f"\n=== Summary, {gpu}")
    for name, status, wall, key in summary:
        print(f"- {name}: {status}, {wall:.0f} s")
        for x in key:
            print(f"    {x.strip()}")
    sys.exit(0 if all(s == "ok" for _, s, _, _ in summary) else 1)


if __name__ == "__main__":
    main()
