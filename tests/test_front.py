"""Style gain against neutral cost (hnkit.front): the Pareto front and the recommended strength."""

from hnkit.front import pareto_front, points, recommend


def test_points_front_and_recommendation():
    factors = [0, 0.5, 1, 1.5, 2]
    style = [20.0, 16.0, 14.0, 14.5, 15.0]  # gains 0, 0.2, 0.3, 0.275, 0.25
    neutral = [10.0, 10.1, 10.5, 11.0, 10.2]  # costs 0, 0.01, 0.05, 0.10, 0.02
    pts = points(factors, style, neutral, 20.0, 10.0)
    assert [round(g, 3) for _, g, _ in pts] == [0, 0.2, 0.3, 0.275, 0.25]
    assert [round(c, 3) for _, _, c in pts] == [0, 0.01, 0.05, 0.1, 0.02]
    # 1.5 is beaten by 1 (more gain, less cost); the rest trade gain for cost
    assert [p[0] for p in pareto_front(pts)] == [0, 0.5, 2, 1]
    assert recommend(pts, 0.03)[0] == 2  # the largest gain at most 3 % neutral cost
    assert recommend(pts, 0.015)[0] == 0.5
    assert recommend(pts, 0.10)[0] == 1
    # no 0 in the sweep: the costs are still against the bare model's perplexities
    assert recommend(points([0.5, 1], [16.0, 14.0], [11.0, 12.0], 20.0, 10.0), 0.03) == (0.0, 0.0, 0.0)
    assert recommend(points([0.5, 1], [16.0, 14.0], [10.2, 12.0], 20.0, 10.0), 0.03)[0] == 0.5
    assert recommend([(1, 0.3, 0.2)], 0.03) == (0.0, 0.0, 0.0)  # nothing allowed: the bare model
