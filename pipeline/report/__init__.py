"""Reports from stored results: leaderboards and plots, what to deploy (costs, Pareto front, budgets),
and the quickstart's report."""
