"""What a study leaves behind: typed trial records, the Pareto front, plots, artifacts, export, the report."""
