"""Checks, before `make install` on a machine with an NVIDIA GPU, what vllm==0.33.0 needs and pip cannot
install, and names what is missing. Standard library only (it runs before .venv exists).

- Python >= 3.11 (the wheel's Requires-Python), with its venv module and ensurepip, which `make install`'s
  `python -m venv` needs (Debian and Ubuntu ship them apart, in the package python3.X-venv);
- a C compiler and the Python headers: Triton compiles a small launcher (driver.c, #include <Python.h>)
  at the first GPU kernel launch, and Model Runner V2, vLLM 0.33's GPU default, samples with Triton kernels;
- an NVIDIA driver of the R580 series or newer, which CUDA 13 (the wheel's libcudart.so.13) needs.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

MIN_PYTHON, MIN_DRIVER = (3, 11), 580


def problems(version=sys.version_info[:2], include=None, driver=None, compiler=None, venv=None):
    """The list of what is missing, in words (empty: ready). Arguments override what is probed."""
    out = []
    if tuple(version) < MIN_PYTHON:
        out.append(f"Python {version[0]}.{version[1]}: vllm 0.33.0 needs Python >= 3.11 "
                   f"(run `make PY=python3.11 install`, or install python3.11 and its venv module)")
    venv = venv if venv is not None else all(importlib.util.find_spec(m) for m in ("venv", "ensurepip"))
    if not venv:
        out.append(f"no venv module with ensurepip: `python -m venv` cannot create .venv "
                   f"(apt install python{version[0]}.{version[1]}-venv)")
    compiler = compiler if compiler is not None else (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
                                                      or shutil.which("clang"))
    if not compiler:
        out.append("no C compiler (cc, gcc, clang or $CC): Triton compiles its launcher at the first GPU kernel "
                   "launch (apt install gcc)")
    include = include if include is not None else sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        out.append(f"no Python headers ({include}/Python.h): Triton's launcher includes them "
                   f"(apt install python{version[0]}.{version[1]}-dev)")
    driver = driver if driver is not None else nvidia_driver()
    if driver is None:
        out.append("nvidia-smi did not report a driver version")
    elif not driver.split(".")[0].isdigit() or int(driver.split(".")[0]) < MIN_DRIVER:
        out.append(f"NVIDIA driver {driver}: vllm 0.33.0's CUDA 13 wheels need driver {MIN_DRIVER} or newer")
    return out


def nvidia_driver():
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = r.stdout.split()
    return lines[0] if r.returncode == 0 and lines else None


if __name__ == "__main__":
    found = problems()
    if found:
        sys.exit("make install (GPU): this machine is missing what vllm==0.33.0 needs:\n  - " + "\n  - ".join(found))
    print("GPU machine: Python and its venv module, C compiler, Python headers and NVIDIA driver are fine for "
          "vllm 0.33.0")
