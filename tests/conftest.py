"""Test-wide environment: nothing may reach a hub, DeepSpeed runs on the CPU accelerator, digests are
cached in a directory of this session (not the user's ~/.cache)."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "DITILL_CACHE_DIR" not in os.environ:
    os.environ["DITILL_CACHE_DIR"] = tempfile.mkdtemp(prefix="ditill-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DITILL_CACHE_DIR"], ignore_errors=True)

# Triton reads TRITON_INTERPRET once, when it is first imported: without CUDA set it here, before any
# test module is collected, so the interpreter tests never depend on which module imported Triton
# first (test_kernels_triton.py also sets it; on a CUDA machine it stays unset for the GPU tests).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
