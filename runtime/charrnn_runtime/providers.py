"""onnxruntime sessions on the provider asked for, with no silent CPU fallback for `cuda`.

onnxruntime only warns and runs on CPU when the CUDA provider cannot load, so the providers the
session really got are checked, and the cause is named: missing package, driver or libraries.
"""

import ctypes

import onnxruntime as ort

from .errors import CharrnnError
from .install import pip_install

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
CHOICES = ("auto", "cpu", "cuda")


def session_options(threads=None, spinning=True):
    """spinning=False: idle onnxruntime threads sleep instead of spinning, leaving the cores to other
    threads of the process (a server's event loop); spinning is faster for a lone sampling loop."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # our errors name the cause; ort's warnings would only repeat it
    return options


def cuda_unavailable_reason():
    """Why the CUDA provider cannot be had here, or None if nothing rules it out up front."""
    if CUDA not in ort.get_available_providers():
        return (f"the installed onnxruntime {ort.__version__} has no CUDA provider: "
                f"pip uninstall onnxruntime && {pip_install('gpu')}")
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver: libcuda.so.1 cannot be loaded"
    return None


def preload_cuda_libraries():
    """Load the pip-installed CUDA/cuDNN libraries the way onnxruntime-gpu expects.

    Where they are not pip-installed (system CUDA), this may fail; the session check that follows
    then names what is missing.
    """
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - any failure here is reported by the provider check
            pass


def create_session(model, provider="auto", threads=None, spinning=True):
    """(session, provider used: 'cuda' or 'cpu', why CUDA was not used or None)."""
    if provider not in CHOICES:
        raise CharrnnError(f"unknown provider {provider!r}: choose from {', '.join(CHOICES)}")
    options = session_options(threads, spinning)
    if provider == "cpu" or (provider == "auto" and CUDA not in ort.get_available_providers()):
        return _session(model, options, [CPU]), "cpu", None

    reason = cuda_unavailable_reason()
    if reason is None:
        preload_cuda_libraries()
        session = _session(model, options, [CUDA, CPU])
        if session.get_providers()[0] == CUDA:
            return session, "cuda", None
        reason = ("the CUDA provider failed to load its libraries (onnxruntime-gpu needs CUDA 13 and cuDNN 9: "
                  "pip install 'onnxruntime-gpu[cuda,cudnn]')")
    if provider == "cuda":
        raise CharrnnError(f"CUDA requested but unavailable: {reason}")
    return _session(model, options, [CPU]), "cpu", reason


def _session(model, options, providers):
    try:
        return ort.InferenceSession(str(model), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise CharrnnError(f"cannot load ONNX model {model}: {str(e).splitlines()[0][:200]}") from None
