"""The verification's progress lines: what a user reads while the strong attacks run."""

from study.orchestration.verify import verified_line


def _record(final, **extra):
    return {"number": 6, "defense": "none", "final": final, **extra}


def test_a_verified_trial_shows_its_test_numbers_and_seconds():
    final = {"split": "test", "test_clean_accuracy": 0.975, "test_robust_accuracy": 0.285, "trusted": True,
             "flags_failed": [], "seconds": 103.4}
    assert verified_line(_record(final)) == "#6 none: test clean 97.5% robust 28.5%  (103s)"


def test_an_untrusted_verification_names_the_failed_gates():
    final = {"split": "test", "test_clean_accuracy": 0.5, "test_robust_accuracy": 0.125, "trusted": False,
             "flags_failed": ["R8", "R13"], "seconds": 9.6}
    assert verified_line(_record(final)) == "#6 none: test clean 50.0% robust 12.5% UNTRUSTED (R8, R13)  (10s)"


def test_a_failed_verification_says_why():
    line = verified_line(_record(None, final_error="no saved model to verify"))
    assert line == "#6 none: verification failed (no saved model to verify)"
