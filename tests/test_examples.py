"""Smoke runs of the examples that no other test imports: they run and their results are sane."""
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_me_inference_pulls_are_unbiased_with_unit_width(tmp_path):
    """examples/me_inference.py --quick: 20 pseudo-experiments fitted by maximum likelihood through
    TwoBodyCrossSection; the pulls of mZ and sin^2 thetaW have mean 0 and width 1 within their errors."""
    output = tmp_path / "me_inference_pulls.png"
    run = subprocess.run([sys.executable, str(EXAMPLES / "me_inference.py"), "--quick", "-o", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    pulls = re.findall(r"(\w+)\s*: mean fit (\S+) \(truth (\S+)\), mean error (\S+), "
                       r"pull mean (\S+) \+- (\S+), pull width (\S+)", run.stdout)
    assert {name for name, *_ in pulls} == {"mz", "sin2_theta_w"}, run.stdout
    for name, fit, truth, error, mean, mean_error, width in pulls:
        assert abs(float(mean)) < 3.5 * float(mean_error), (name, mean, mean_error)
        assert 0.5 < float(width) < 1.6, (name, width)
        assert abs(float(fit) - float(truth)) < 3.5 * float(error), (name, fit, truth, error)
    assert output.stat().st_size > 0


def test_shower_tuning_estimators_agree_and_fit_alpha_s(tmp_path):
    """examples/shower_tuning.py --quick: the two unbiased estimators (score function, Stochastic AD)
    give the same d chi2 / d alpha_s within their spread over seeds, and every estimator's Adam fit
    lands near the true alpha_s(mZ) = 0.118 (the relaxed one fits the relaxed histogram)."""
    output = tmp_path / "shower_tuning.png"
    run = subprocess.run([sys.executable, str(EXAMPLES / "shower_tuning.py"), "--quick", "-o", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {name.strip(): (float(gradient), float(spread), int(seeds), float(fitted)) for name, gradient, spread, seeds, fitted
            in re.findall(r"^\s*([\w ]+): d (?:relaxed )?chi2/d alpha_s at \S+ =\s*(\S+) \+-\s*(\S+) \(std over (\d+) seeds.*?"
                          r"fitted alpha_s = (\S+)", run.stdout, flags=re.MULTILINE)}
    assert set(rows) == {"score function", "stochastic AD", "relaxed"}, run.stdout
    (score, score_std, n, _), (stochastic, stochastic_std, m, _) = rows["score function"], rows["stochastic AD"]
    assert abs(score - stochastic) < 4.0 * (score_std ** 2 / n + stochastic_std ** 2 / m) ** 0.5, rows
    for name, (*_, fitted) in rows.items():
        assert abs(fitted - 0.118) < 0.003, (name, fitted)
    assert output.stat().st_size > 0
