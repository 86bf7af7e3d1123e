"""VisualAD: language-free zero-shot anomaly detection with a ViT, in C.

>>> import visualad
>>> det = visualad.Detector("ViT-L-14-336px.pt", head="CLIP.pth")
>>> maps = det.anomaly_maps(["img.png"])      # (N, S, S) float32
>>> scores = det.anomaly_scores(["img.png"])  # (N,) float32
>>> demo = visualad.Detector.default()         # the embedded default model (offline, for trying things)
"""
from ._blas import preload_openblas

preload_openblas()

from . import _engine  # noqa: E402
from . import metrics  # noqa: E402
from .detector import Detector  # noqa: E402
from .engine_info import engine_info  # noqa: E402
from .errors import CheckpointError  # noqa: E402
from .plotting import plot_overlay  # noqa: E402  (matplotlib itself is imported on first use)

from ._version import package_version  # noqa: E402

__all__ = ["Detector", "CheckpointError", "engine_info", "plot_overlay"]
__version__ = package_version()
