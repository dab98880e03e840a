"""The rating loss that Basic, MAML and MELO share.

The recommenders predict rating / 5; the loss compares that with the true rating / 5
(--normalize_loss=True, the reference's default) or, scaled back, in stars.
"""
MAX_RATING = 5.0


def loss_scale(normalize_loss):
    """The factor that takes a difference of ratings / 5 to the loss's scale."""
    return 1.0 if normalize_loss else MAX_RATING


def rating_errors(predictions, ratings, scale, focal=False):
    """Per-position loss of ``predictions`` (rating / 5) against ``ratings`` (stars): the
    squared error, or with ``focal`` the cubed absolute error (--use_focal_loss)."""
    difference = (predictions - ratings / MAX_RATING) * scale
    return difference.abs() ** 3 if focal else difference ** 2
