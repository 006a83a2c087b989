"""Data sets for training and evaluation: the documented format (``format``) and the built-in sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from riskcascade.core.config import Settings
from riskcascade.modelling.datasets.format import Dataset, DatasetFormatError, load_dataset

BUILT_IN = ("synthetic", "yelpchi")
SPLIT_FILES = {"train": "train.csv", "valid": "valid.csv", "test": "test.csv"}
GENERATOR = "riskcascade.modelling.synthetic.generate_events"


def open_dataset(name: str, settings: Settings, write_synthetic_csv: bool = False) -> tuple[Dataset, dict[str, Any]]:
    """A built-in data set by name, or one in the documented format by the path of its descriptor.

    Returns the data set and a summary of where it came from, for the model card. ``synthetic`` is generated
    from ``settings.data`` (n_events, seed); with ``write_synthetic_csv`` its splits are also written as CSV into
    ``settings.data.dir``, where the case memory is built from.
    """
    if name == "synthetic":
        from riskcascade.modelling.datasets.synthetic_source import synthetic_dataset
        from riskcascade.modelling.synthetic import generate_events, split_events, write_events_csv

        parts = split_events(generate_events(settings.data.n_events, settings.data.seed), settings.data.seed)
        if write_synthetic_csv:
            for split, file in SPLIT_FILES.items():
                write_events_csv(settings.data.dir / file, parts[split])
        source = {"generator": GENERATOR, "seed": settings.data.seed, "n_events": settings.data.n_events}
        return synthetic_dataset(parts), source
    if name == "yelpchi":
        from riskcascade.modelling.datasets.yelpchi import load_yelpchi, yelpchi_dir

        return load_yelpchi(), {"source": f"PyPI UGFraud 0.1.1.3 ({yelpchi_dir()})"}
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        raise DatasetFormatError(
            f"unknown data set {name!r}: use {' or '.join(BUILT_IN)}, or the path of a dataset.yaml descriptor"
        )
    return load_dataset(path), {"source": str(path.resolve())}


def read_split_events(data_dir: Path) -> dict[str, Any]:
    """The synthetic generator's train/valid/test CSV files in ``data_dir`` as {split: [LabelledEvent]}.

    FileNotFoundError names a missing file; ValueError (from ``read_events_csv``) a bad cell."""
    from riskcascade.modelling.synthetic import read_events_csv

    parts = {}
    for split, file in SPLIT_FILES.items():
        source = Path(data_dir) / file
        if not source.exists():
            raise FileNotFoundError(f"no data at {source}: run `riskcascade train` first")
        parts[split] = read_events_csv(source)
    return parts
