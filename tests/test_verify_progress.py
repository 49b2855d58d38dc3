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


# --------------------------------------------------------------------------- order of the verifications


def test_verifications_go_longest_search_evaluation_first_ties_in_front_order():
    from study.orchestration.verify import longest_first

    records = [{"number": n, "eval_seconds": s} for n, s in [(0, 5.0), (1, 40.0), (2, None), (3, 12.0), (4, 12.0)]]
    assert [r["number"] for r in longest_first(records)] == [1, 3, 4, 0, 2]


def test_verify_front_submits_in_that_order(monkeypatch):
    import sys
    import types

    from study.orchestration.verify import verify_front
    from study.spec import load_spec

    submitted: list[str] = []

    def remote(**resources):
        def wrap(fn):
            return types.SimpleNamespace(remote=lambda checkpoint, *args: submitted.append(checkpoint) or checkpoint)
        return wrap

    final = {"split": "test", "test_clean_accuracy": 1.0, "test_robust_accuracy": 0.0, "trusted": True,
             "flags_failed": [], "seconds": 1.0}
    fake = types.SimpleNamespace(remote=remote, wait=lambda refs, num_returns: (refs[:1], refs[1:]),
                                 get=lambda ref: dict(final))
    monkeypatch.setitem(sys.modules, "ray", fake)
    front = [{"number": n, "trial_id": f"t{n}", "defense": "none", "checkpoint": f"ckpt{n}", "eval_seconds": s}
             for n, s in [(0, 3.0), (1, 90.0), (2, 20.0)]]
    front.append({"number": 3, "trial_id": "t3", "defense": "none", "checkpoint": None, "eval_seconds": 500.0})
    verify_front(load_spec("demo"), front)
    assert submitted == ["ckpt1", "ckpt2", "ckpt0"]
    assert [r["verified"] for r in front] == [True, True, True, False]
