"""Small data the package ships so that ``gradvitals demo`` runs on a plain install."""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np

#: Rows and columns of the bundled digits (64 pixels + the label).
DIGITS_SHAPE = (1797, 65)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The handwritten digits scikit-learn's ``load_digits`` gives (UCI optdigits test set,
    CC BY 4.0: see DIGITS-LICENSE.txt): X (1797, 64) float64 pixel counts 0..16, y (1797,) int64."""
    raw = gzip.decompress(resources.files(__package__).joinpath("digits.u8.gz").read_bytes())
    table = np.frombuffer(raw, dtype=np.uint8).reshape(DIGITS_SHAPE)
    return table[:, :64].astype(np.float64), table[:, 64].astype(np.int64)
