"""The report's intervals: a macro average of accuracies, and a paired difference of two runs."""
from __future__ import annotations

import math

Z_95 = 1.959964  # two-sided 95% quantile of the normal distribution


def macro_average_ci(per_task) -> tuple:
    """(mean, low, high): the macro average of per-task accuracies with its 95% interval.

    `per_task` is a list of (correct, n). The tasks are independent samples, so the variance
    of the mean of accuracies is sum(p(1-p)/n) / k^2 (normal approximation per task); the
    interval is clipped to [0, 1].
    """
    accuracies = [(c / n, n) for c, n in per_task]
    k = len(accuracies)
    mean = sum(p for p, _ in accuracies) / k
    variance = sum(p * (1 - p) / n for p, n in accuracies) / k ** 2
    half = Z_95 * math.sqrt(variance)
    return mean, max(0.0, mean - half), min(1.0, mean + half)  # an accuracy stays in [0, 1]


def paired_difference_ci(per_task_flags) -> tuple:
    """(mean, low, high) of the macro-average difference B - A over paired per-example results.

    `per_task_flags` is a list of (flags_a, flags_b), strings of 0/1 over the same examples.
    Per task the difference of accuracies is the mean of d_i = b_i - a_i, with variance
    var(d)/n; the macro difference averages those over the k tasks.
    """
    means, variance = [], 0.0
    for flags_a, flags_b in per_task_flags:
        if len(flags_a) != len(flags_b) or not flags_a:
            raise ValueError("paired comparison needs the same examples in both runs")
        d = [int(b) - int(a) for a, b in zip(flags_a, flags_b)]
        n = len(d)
        mean = sum(d) / n
        means.append(mean)
        variance += (sum(x * x for x in d) / n - mean ** 2) / n
    k = len(means)
    mean = sum(means) / k
    half = Z_95 * math.sqrt(variance) / k
    return mean, mean - half, mean + half
