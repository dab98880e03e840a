"""One evaluation protocol for Basic, MAML and MELO.

Everything here takes predictions and targets in stars and knows nothing of how the
predictions were made.  Each test user contributes the squared / absolute errors of
its query targets, averaged over that user's real query sequences; RMSE is the square
root of the mean over users, MAE the mean over users.
"""
import math

import numpy as np



BOOTSTRAP_RESAMPLES = 1000


def evaluate(predictions, targets, row_mask, rating_values=None, users=None):
    """Metrics of target predictions.

    predictions, targets: [U, Q] stars (array-likes or tensors); row_mask: [U, Q], 1 where
    the query sequence is real.  rating_values: the rating scale, so the per-rating report
    lists every value (also ones that never occur among the targets).  users: [U] ids; when
    given, each user's squared and absolute error is kept (``per_user``) for paired
    comparisons of methods on the same users.
    """
    predictions, targets, row_mask = (np.asarray(_numpy(a), dtype=np.float64)
                                      for a in (predictions, targets, row_mask))
    real = row_mask > 0
    rows_per_user = real.sum(axis=1)
    if (rows_per_user == 0).any():
        raise ValueError("every user needs at least one real query sequence")
    errors = (predictions - targets) * real
    user_mse = (errors ** 2).sum(axis=1) / rows_per_user
    user_mae = np.abs(errors).sum(axis=1) / rows_per_user
    mse = float(user_mse.mean())
    metrics = {
        "num_users": int(len(user_mse)),
        "num_targets": int(real.sum()),
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(user_mae.mean()),
        "per_rating": per_rating_report(predictions[real], targets[real], rating_values),
    }
    if users is not None:
        metrics["per_user"] = {"user": [int(u) for u in _numpy(users)], "squared_error": user_mse.tolist(),
                               "absolute_error": user_mae.tolist()}
    return metrics


def paired_rmse_difference(squared_errors, other_squared_errors, resamples=BOOTSTRAP_RESAMPLES, seed=0):
    """RMSE of one method minus another's on the same users, with a 95 % paired-bootstrap
    interval: the users are drawn with replacement ``resamples`` times, the same draw for
    both methods, and the interval holds the middle 95 % of the differences. An interval
    that excludes 0 says the difference is more than the choice of test users explains."""
    ours, theirs = np.asarray(squared_errors, dtype=np.float64), np.asarray(other_squared_errors, dtype=np.float64)
    if ours.shape != theirs.shape or ours.ndim != 1:
        raise ValueError("paired errors must be of the same users, one value each")
    draws = np.random.default_rng(seed).integers(0, len(ours), size=(resamples, len(ours)))
    differences = np.sqrt(ours[draws].mean(axis=1)) - np.sqrt(theirs[draws].mean(axis=1))
    low, high = np.percentile(differences, [2.5, 97.5])
    return {"difference": math.sqrt(ours.mean()) - math.sqrt(theirs.mean()), "low": float(low),
            "high": float(high), "resamples": resamples}


def per_rating_report(predictions, targets, rating_values=None):
    """For each true rating: count, RMSE and the mean / median / std of the predictions."""
    values = np.union1d(np.unique(targets), [] if rating_values is None else rating_values)
    report = {}
    for value in values:
        chosen = predictions[np.isclose(targets, value)]
        count = int(chosen.size)
        report[_rating_key(value)] = {
            "count": count,
            "rmse": float(np.sqrt(np.mean((chosen - value) ** 2))) if count else None,
            "prediction_mean": float(chosen.mean()) if count else None,
            "prediction_median": float(np.median(chosen)) if count else None,
            "prediction_std": float(chosen.std()) if count else None,
        }
    return report


def mean_rating_metrics(tasks, data):
    """Metrics of predicting the training users' mean rating for every target of ``tasks``."""
    targets = tasks.target_ratings
    return evaluate(np.full(targets.shape, data.train_mean_rating), targets, tasks.query_row_mask,
                    rating_values=data.rating_values, users=tasks.users)


def warn_if_worse_than_the_mean(best_rmse, valid_tasks, data, advice):
    """One warning line when training never beat predicting the mean rating on valid."""
    baseline = mean_rating_metrics(valid_tasks, data)["rmse"]
    if best_rmse > baseline:
        print(f"warning: the best validation RMSE {best_rmse:.4f} is worse than predicting the "
              f"training mean rating ({baseline:.4f}): the run learned nothing useful; {advice}")


def is_finite(metrics):
    """Whether the RMSE, MSE and MAE of ``metrics`` are all finite numbers."""
    return all(math.isfinite(metrics[key]) for key in ("mse", "rmse", "mae"))


def format_metrics(prefix, metrics, label="", keys=("mse", "rmse", "mae")):
    """The reference's console lines, which scripts written for it read:
    'Iteration 5: MSE loss: … | RMSE loss: … | MAE loss: … | ' (no label),
    '\tValidation: Val MSE loss: … | Val RMSE loss: … | Val MAE loss: … | ' (label 'Val '),
    '\tTest: Test RMSE loss: … | Test MAE loss: … | ' (label 'Test ', keys rmse and mae)."""
    return prefix + "".join(f"{label}{key.upper()} loss: {metrics[key]:.4f} | " for key in keys)


def format_per_rating(report):
    """A table of the per-rating report, one row per true rating."""
    lines = [f"{'rating':>6} {'count':>7} {'RMSE':>7} {'pred mean':>9} {'median':>7} {'std':>6}"]
    for rating, row in report.items():
        if row["count"] == 0:
            lines.append(f"{rating:>6} {0:>7d} {'-':>7} {'-':>9} {'-':>7} {'-':>6}")
            continue
        lines.append(f"{rating:>6} {row['count']:>7d} {row['rmse']:>7.4f} "
                     f"{row['prediction_mean']:>9.4f} {row['prediction_median']:>7.4f} "
                     f"{row['prediction_std']:>6.4f}")
    return "\n".join(lines)


def print_test(metrics, title):
    """Print the test metrics and the per-rating report."""
    print(f"{title}: {metrics['num_users']} users, {metrics['num_targets']} targets")
    print(format_metrics("\tTest: ", metrics, label="Test ", keys=("rmse", "mae")))
    print(" -------- Rating ---- ")
    print(format_per_rating(metrics["per_rating"]))


def test_record(metrics, config, **extra):
    """A test's record for JSON: its metrics, the run's configuration (a dict of its flags) and
    ``extra``."""
    return {"metrics": metrics, "config": {k: _jsonable(v) for k, v in config.items()}, **extra}


def _rating_key(value):
    return f"{value:g}"


def _numpy(array):
    return array.detach().cpu().numpy() if hasattr(array, "detach") else array


def _jsonable(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def log_metrics(writer, split, metrics, step):
    """The MSE, RMSE and MAE of ``split`` (train / valid) to TensorBoard."""
    for key in ("mse", "rmse", "mae"):
        writer.add_scalar(f"{split}/{key.upper()}loss", metrics[key], step)
