"""Everything that runs a study across processes: the only code that imports Ray and Optuna."""
