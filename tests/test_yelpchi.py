"""YelpChi as shipped in the installed UGFraud package: the real review-spam graph loads whole and as documented."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from riskcascade.modelling.datasets.format import DatasetFormatError
from riskcascade.modelling.datasets.yelpchi import (
    FEATURE_DESCRIPTIONS,
    PACKAGE,
    load_yelpchi,
    yelpchi_dir,
    yelpchi_spec,
)

REVIEWS = 67_395
SPAM_REVIEWS = 8_919
USERS = 38_063
PRODUCTS = 201


@pytest.fixture(scope="module")
def yelpchi():
    return load_yelpchi()


@pytest.fixture(scope="module")
def raw_metadata() -> list[list[str]]:
    with gzip.open(yelpchi_dir() / "metadata.gz", "rt", encoding="utf-8") as f:
        return [line.split() for line in f if line.strip()]


def test_data_ships_in_the_installed_package():
    folder = yelpchi_dir()
    assert folder.parts[-2:] == ("Yelp_Data", "YelpChi")
    assert (folder / "metadata.gz").is_file() and (folder / "priors.pkl").is_file()
    assert folder.is_relative_to(Path(importlib.util.find_spec(PACKAGE).origin).parent)


def test_counts(yelpchi):
    assert len(yelpchi) == REVIEWS
    assert int(yelpchi.labels.sum()) == SPAM_REVIEWS
    assert len(set(yelpchi.links["user_id"])) == USERS
    assert len(set(yelpchi.links["product_id"])) == PRODUCTS


def test_spam_is_label_minus_one_in_the_source(yelpchi, raw_metadata):
    source_labels = np.array([row[3] for row in raw_metadata])
    assert set(source_labels) == {"-1", "1"}
    assert int((source_labels == "-1").sum()) == SPAM_REVIEWS
    np.testing.assert_array_equal(yelpchi.labels, (source_labels == "-1").astype(np.int64))


def test_rows_follow_the_source_and_link_users_and_products(yelpchi, raw_metadata):
    users = np.array(["u" + row[0] for row in raw_metadata], dtype=object)
    products = np.array(["p" + row[1] for row in raw_metadata], dtype=object)
    np.testing.assert_array_equal(yelpchi.links["user_id"], users)
    np.testing.assert_array_equal(yelpchi.links["product_id"], products)
    np.testing.assert_array_equal(yelpchi.ids, users + "-" + products)
    # user and product ids overlap as numbers in the source; the prefixes keep the two links apart
    assert not set(yelpchi.links["user_id"]) & set(yelpchi.links["product_id"])


def test_ids_are_unique_and_never_empty(yelpchi):
    assert len(set(yelpchi.ids)) == REVIEWS
    assert np.all(yelpchi.ids != "")
    assert np.all(yelpchi.links["user_id"] != "") and np.all(yelpchi.links["product_id"] != "")


def test_priors_are_present_finite_numbers(yelpchi):
    assert yelpchi.numeric.shape == (REVIEWS, 3)
    assert yelpchi.numeric.dtype == np.float64
    assert not np.isnan(yelpchi.numeric).any()
    assert np.isfinite(yelpchi.numeric).all()
    # a prior that is the same on every row would carry nothing
    assert all(len(np.unique(yelpchi.numeric[:, j])) > 1 for j in range(3))


def test_priors_of_one_user_or_product_agree(yelpchi):
    user_prior = yelpchi.numeric[:, yelpchi.spec.numeric_features.index("user_prior")]
    product_prior = yelpchi.numeric[:, yelpchi.spec.numeric_features.index("product_prior")]
    for link, prior in (("user_id", user_prior), ("product_id", product_prior)):
        _, group = np.unique(yelpchi.links[link], return_inverse=True)
        lowest = np.full(group.max() + 1, np.inf)
        highest = np.full(group.max() + 1, -np.inf)
        np.minimum.at(lowest, group, prior)
        np.maximum.at(highest, group, prior)
        np.testing.assert_array_equal(lowest, highest, err_msg=link)


def test_spec_describes_the_table(yelpchi):
    spec = yelpchi_spec()
    assert yelpchi.spec == spec
    assert spec.fraud_labels == ["-1"] and spec.legit_labels == ["1"]
    assert spec.numeric_features == ["review_prior", "user_prior", "product_prior"]
    assert spec.feature_descriptions == FEATURE_DESCRIPTIONS
    assert spec.links == ["user_id", "product_id"]
    assert spec.aggregated == spec.numeric_features
    assert yelpchi.splits == [] and yelpchi.risk_types is None and yelpchi.edges is None
    assert yelpchi.categorical == {}


def test_missing_package_is_named(monkeypatch):
    real = importlib.util.find_spec

    def without_ugfraud(name, *args, **kwargs):
        return None if name == PACKAGE else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_ugfraud)
    with pytest.raises(DatasetFormatError) as caught:
        yelpchi_dir()
    assert str(caught.value) == "the UGFraud package is not installed: `make install` installs it"
    with pytest.raises(DatasetFormatError, match="UGFraud package is not installed"):
        load_yelpchi()
