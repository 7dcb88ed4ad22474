"""Callbacks that report a fit as it runs: a tqdm progress bar and a JSON-lines log.

Both take each :class:`~dnmf.run.driver.IterationRecord` and return None (they never stop a fit),
so they fit ``NMF(callbacks=[...])`` directly.
"""

from __future__ import annotations

import json
import math
import sys

from tqdm.auto import tqdm

from .driver import IterationRecord


class ProgressBar:
    """A progress bar over iterations: objective, relative change, s/iter and ETA.

    The ETA assumes the fit runs to ``max_iter``; convergence usually ends it sooner.

    Parameters
    ----------
    max_iter : int or None
        The bar's total (iterations numbered from 1, as in the history); None: unknown.
    disable : bool
        Show nothing (for ``--quiet``).
    file : text stream, optional
        Where to draw (default: stderr).
    """

    def __init__(self, max_iter: int, *, disable: bool = False, file=None, desc: str = "NMF"):
        self.max_iter = None if max_iter is None else int(max_iter)
        self._options = dict(desc=desc, unit="it", disable=disable, file=file, dynamic_ncols=True, leave=True)
        self._bar = None  # drawn at the first iteration, so a fit that fails early shows no bar

    def __call__(self, record: IterationRecord) -> None:
        if self._bar is None:
            self._bar = tqdm(total=self.max_iter, **self._options)
        # On resume the first record is not iteration 1: start the bar where the history ends.
        self._bar.update(record.iteration - self._bar.n)
        self._bar.set_postfix(
            {
                "objective": f"{record.objective:.5g}",
                "rel_change": f"{record.rel_decrease:.2e}",
                "dWH": f"{max(record.w_change, record.h_change):.2e}",
                "s/it": f"{record.seconds:.3g}",
            },
            refresh=False,
        )
        return None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonLog:
    """Append one JSON object per iteration to a file (the record's fields).

    The file is opened for appending on the first record, so a resumed fit continues the log.
    """

    def __init__(self, path):
        self.path = path
        self._file = None

    def __call__(self, record: IterationRecord) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        row = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.as_dict().items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        return None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VerboseLog:
    """``NMF(verbose=k)``: a line on stderr every 10th iteration (every one for k >= 2), and
    the first, with the objective, its relative decrease and the seconds so far.

    scikit-learn's NMF prints such lines ("Epoch 10 reached after ..."); here they go to stderr,
    beside the progress bar, so that stdout stays the caller's.
    """

    def __init__(self, verbose: int = 1, file=None):
        self.every = 1 if verbose >= 2 else 10
        self.file = file
        self.seconds = 0.0

    def __call__(self, record: IterationRecord) -> None:
        self.seconds += record.seconds
        if record.iteration == 1 or record.iteration % self.every == 0:
            objective = "not evaluated" if math.isnan(record.objective) else f"{record.objective:.6g}"
            print(
                f"NMF iteration {record.iteration}: objective {objective}, relative decrease "
                f"{record.rel_decrease:.3g}, change {max(record.w_change, record.h_change):.3g}, "
                f"{self.seconds:.3f} s",
                file=self.file or sys.stderr,
            )
