"""Running a Detector over many images on a Dask cluster (``pip install "visualad[dask]"``).

>>> from dask.distributed import Client
>>> import visualad, visualad.dask
>>> det = visualad.Detector("ViT-L-14-336px.pt", head="CLIP.pth")
>>> with Client("tcp://scheduler:8786") as client:        # or visualad.dask.connect("local:4")
...     scores = visualad.dask.anomaly_scores(det, paths, client)
...     scores = visualad.dask.save_maps(det, paths, [p + ".npy" for p in paths], client)

How it runs. The Detector is sent to every worker once (``client.scatter``: its parameters and a
reference to its weights, see ``Detector.__getstate__``); each worker loads the model once, on its
first batch, through the process-wide cache. Images go out in the batches a local run uses
(:func:`visualad.batches.split`), at most a few per worker in flight, and results come back in
order with a progress bar. The numbers equal the local run's exactly: same batches and the same
engine thread count (the worker copy gets the client's resolved ``num_threads``; the engine's
rounding can depend on both). Paths are read by the workers, so images, the weights and output
folders must be on a filesystem every worker sees.

Only this module imports ``dask``; the rest of visualad never does.
"""
from __future__ import annotations

import contextlib
import copy
from collections import deque

import numpy as np

from . import batches
from .progress import Progress

__all__ = ["connect", "map_batches", "run", "anomaly_scores", "maps_and_scores", "save_maps"]


def _distributed():
    try:
        import distributed
    except ImportError:
        raise ImportError('--dask / visualad.dask need Dask: pip install "visualad[dask]" '
                          '(dask[distributed])') from None
    return distributed


@contextlib.contextmanager
def connect(address: str):
    """A ``distributed.Client`` for ``address`` (context manager): ``"local:N"`` starts a
    LocalCluster of N worker processes (one thread each) and stops it afterwards; anything else is
    the address of a running scheduler (``tcp://host:8786``), left running."""
    distributed = _distributed()
    address = str(address)
    if address.startswith("local:"):
        try:
            n = int(address[len("local:"):])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--dask local:N needs a worker count N >= 1, got {address!r}")
        with distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
            yield client
    else:
        with distributed.Client(address) as client:
            yield client


def _worker_copy(detector):
    """The Detector as the workers get it: its settings and weights reference, with the engine
    thread count resolved here (so the workers round as this process does) and no progress bar."""
    w = copy.copy(detector)  # shares the parameters; the pickled state is what travels
    w.set_params(num_threads=detector._threads(), progress=False)
    return w


def _window(client) -> int:
    threads = sum(client.nthreads().values()) or 1
    return 2 * threads + 1


def map_batches(detector, function, arguments, client, *, progress=False, desc="dask"):
    """Runs ``function(detector, *args)`` on the workers for each ``args`` in ``arguments`` (a
    sequence of tuples, e.g. one batch of paths each) and yields the results in order, keeping a
    few tasks per worker thread in flight. ``function`` must be importable on the workers (e.g.
    one of :mod:`visualad.batches`). The progress bar counts batches."""
    remote = client.scatter(_worker_copy(detector), broadcast=True, hash=False)
    todo = iter(arguments)
    pending = deque()

    def submit():
        args = next(todo, None)
        if args is not None:
            pending.append(client.submit(function, remote, *args, pure=False))

    for _ in range(_window(client)):
        submit()
    with Progress(len(arguments), desc, progress) as bar:
        while pending:
            result = pending.popleft().result()
            submit()
            bar.update(1)
            yield result


def run(detector, function, client):
    """``function(detector)`` on one worker (with the workers' copy of the Detector), e.g. to ask
    what it resolves to there without loading the model in this process."""
    return client.submit(function, _worker_copy(detector), pure=False).result()


def _path_batches(detector, paths):
    return [(list(paths[a:b]),) for a, b in batches.split(len(paths), detector.batch_size)]


def anomaly_scores(detector, paths, client, *, progress=False) -> np.ndarray:
    """``detector.anomaly_scores(paths)`` computed on the cluster; equal to the local result."""
    paths = list(paths)
    parts = list(map_batches(detector, batches.anomaly_scores, _path_batches(detector, paths), client,
                             progress=progress, desc="anomaly scores"))
    return np.concatenate(parts) if parts else np.empty(0, np.float32)


def maps_and_scores(detector, paths, client, *, progress=False) -> tuple[np.ndarray, np.ndarray]:
    """``detector.maps_and_scores(paths)`` computed on the cluster (the maps come back to this
    process: S*S*4 bytes per image); equal to the local result."""
    paths = list(paths)
    parts = list(map_batches(detector, batches.maps_and_scores, _path_batches(detector, paths), client,
                             progress=progress, desc="anomaly maps"))
    return np.concatenate([m for m, _ in parts]), np.concatenate([s for _, s in parts])


def save_maps(detector, paths, out_paths, client, *, overlays=False, titles=None, progress=False) -> np.ndarray:
    """Each image's map written by the workers to its ``out_paths`` entry (``.npy`` float32, or an
    overlay picture with ``overlays=True``; see :func:`visualad.batches.save_maps`); returns the
    scores, equal to the local ``anomaly_scores``. Only scores travel back."""
    paths, out_paths = list(paths), list(out_paths)
    if len(out_paths) != len(paths):
        raise ValueError(f"{len(paths)} images but {len(out_paths)} output paths")
    args = [(paths[a:b], out_paths[a:b], overlays, None if titles is None else list(titles[a:b]))
            for a, b in batches.split(len(paths), detector.batch_size)]
    parts = list(map_batches(detector, batches.save_maps, args, client, progress=progress, desc="maps"))
    return np.concatenate(parts) if parts else np.empty(0, np.float32)
