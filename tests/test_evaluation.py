import json
import math

import numpy as np
import pytest

from meta_learning import evaluation


def test_metrics_average_per_user_then_over_users():
    # user 0: two real queries with errors 1 and 3; user 1: one real query (error 2), one padded
    predictions = np.array([[4.0, 2.0], [3.0, 0.0]])
    targets = np.array([[5.0, 5.0], [1.0, 0.0]])
    rows = np.array([[1, 1], [1, 0]])
    metrics = evaluation.evaluate(predictions, targets, rows)
    user_mse = [(1 + 9) / 2, 4.0]
    assert metrics["mse"] == pytest.approx(np.mean(user_mse))
    assert metrics["rmse"] == pytest.approx(math.sqrt(np.mean(user_mse)))
    assert metrics["mae"] == pytest.approx(np.mean([(1 + 3) / 2, 2.0]))
    assert metrics["num_users"] == 2 and metrics["num_targets"] == 3


def test_per_rating_report_lists_the_whole_scale_and_counts_add_up():
    predictions = np.array([[4.0, 4.5], [2.0, 3.0]])
    targets = np.array([[5.0, 5.0], [1.0, 1.0]])
    rows = np.ones((2, 2))
    report = evaluation.evaluate(predictions, targets, rows, rating_values=[1, 2, 3, 4, 5])["per_rating"]
    assert list(report) == ["1", "2", "3", "4", "5"]
    assert sum(row["count"] for row in report.values()) == 4
    assert report["5"]["rmse"] == pytest.approx(math.sqrt((1 + 0.25) / 2))
    assert report["5"]["prediction_mean"] == pytest.approx(4.25)
    assert report["1"]["prediction_median"] == pytest.approx(2.5)
    assert report["1"]["prediction_std"] == pytest.approx(0.5)
    assert report["3"] == {"count": 0, "rmse": None, "prediction_mean": None,
                           "prediction_median": None, "prediction_std": None}


def test_half_star_ratings_keep_their_own_rows():
    report = evaluation.per_rating_report(np.array([3.0, 4.0]), np.array([3.5, 4.5]))
    assert list(report) == ["3.5", "4.5"]


def test_a_user_without_real_queries_is_an_error():
    with pytest.raises(ValueError):
        evaluation.evaluate(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)))


def test_results_are_written_with_the_configuration(tmp_path):
    metrics = evaluation.evaluate(np.array([[4.0]]), np.array([[5.0]]), np.array([[1]]))
    record = json.loads(json.dumps(evaluation.test_record(metrics, {"model": "bert4rec", "device": object()},
                                                          method="melo")))
    assert record["metrics"]["rmse"] == pytest.approx(1.0)
    assert record["config"]["model"] == "bert4rec" and record["method"] == "melo"
    # the reference's lines, character for character
    assert evaluation.format_metrics("\tTest: ", metrics, label="Test ", keys=("rmse", "mae")) == \
        "\tTest: Test RMSE loss: 1.0000 | Test MAE loss: 1.0000 | "
    assert evaluation.format_metrics("\tValidation: ", metrics, label="Val ") == \
        "\tValidation: Val MSE loss: 1.0000 | Val RMSE loss: 1.0000 | Val MAE loss: 1.0000 | "
    assert evaluation.format_metrics("Iteration 3: ", metrics) == \
        "Iteration 3: MSE loss: 1.0000 | RMSE loss: 1.0000 | MAE loss: 1.0000 | "


def test_per_user_errors_are_kept_for_paired_comparisons():
    predictions = np.array([[4.0, 3.0], [2.0, 0.0]])
    targets = np.array([[5.0, 5.0], [2.0, 1.0]])
    metrics = evaluation.evaluate(predictions, targets, np.array([[1, 1], [1, 0]]), users=[7, 3])
    assert metrics["per_user"] == {"user": [7, 3], "squared_error": [2.5, 0.0], "absolute_error": [1.5, 0.0]}
    assert metrics["mse"] == pytest.approx(np.mean(metrics["per_user"]["squared_error"]))
    assert "per_user" not in evaluation.evaluate(predictions, targets, np.ones((2, 2)))


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    base = rng.gamma(1.0, 1.0, size=400)                       # one method's per-user squared errors
    same = evaluation.paired_rmse_difference(base, base)
    assert same["difference"] == 0 and same["low"] == same["high"] == 0
    better = evaluation.paired_rmse_difference(base * 0.8, base)  # every user 20 % lower
    assert better["high"] < 0 and better["low"] <= better["difference"] <= better["high"]
    assert better["difference"] == pytest.approx(np.sqrt(0.8 * base.mean()) - np.sqrt(base.mean()))
    noise = evaluation.paired_rmse_difference(base, rng.permutation(base) * 1.01)  # unpaired noise
    assert noise["low"] < 0 < noise["high"]
    assert evaluation.paired_rmse_difference(base * 0.8, base) == better, "seeded"
    with pytest.raises(ValueError, match="same users"):
        evaluation.paired_rmse_difference(base, base[:-1])
