"""The distvi command: configs checked before anything runs, run/resume/summary end to end."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_config

import distvi as dv
from distvi.cli import main
from distvi.config import ConfigError, load

ROOT = Path(__file__).resolve().parent.parent

BASE = {
    "model": "jobs.quickstart:model",
    "data": {"kind": "loader", "loader": "jobs.quickstart:load", "options": {"rows": 3000}},
    "method": "advi",
    "n": 60,
    "optimizer": {"name": "adam", "learning_rate": 0.05},
    "batch_size": 500,
    "backend": "local",
    "seed": 4,
    "progress": "off",
}


pytestmark = pytest.mark.usefixtures("at_repo_root")  # configs name jobs.* from the root


write = write_config  # a config file in tmp_path


@pytest.mark.parametrize("change, match", [
    ({"optimiser": {"name": "adam"}}, r"unknown key 'optimiser'; allowed: .*optimizer"),
    ({"n": "100"}, r"n must be an int \(the number of steps\), or null or auto \(run until converged\), got str '100'"),
    ({"n": True}, r"n must be an int .*got bool"),
    ({"n": 0}, r"n must be >= 1"),
    ({"n": float("inf")}, r"n must be an int .*got float"),
    ({"model": "os.system"}, r"model must be a reference 'module:function'"),
    ({"model": "jobs.quickstart:model; rm -rf /"}, r"model must be a reference"),
    ({"method": "nuts"}, r"method must be one of advi, fullrank_advi, svgd, asvgd"),
    ({"method_options": {"n_particles": 10}}, r"method_options \(for advi\): unknown key 'n_particles'"),
    ({"optimizer": {"name": "adamw"}}, r"optimizer.name must be one of"),
    ({"optimizer": {"name": "adam", "lr": 0.1}}, r"optimizer: adam\(\) got an unexpected keyword argument 'lr'"),
    ({"optimizer": {"name": "adam", "decay": {"to": -1}}}, r"optimizer.decay.to must be a learning rate > 0"),
    ({"data": {"kind": "zarr", "path": "no/such.zarr"}}, r"data.path: 'no/such.zarr' does not exist"),
    ({"data": {"kind": "csv", "path": "x"}}, r"data.kind must be one of loader, npz, zarr, parquet"),
    ({"data": {"kind": "loader"}}, r"data.loader is required"),
    ({"checkpoint_every": 10}, r"checkpoint_every needs a store"),
    ({"tracking": {"experimnt": "x"}}, r"tracking: unknown key 'experimnt'"),
    ({"progress": "fancy"}, r"progress must be one of auto, bar, lines, off"),
    ({"backend": "dask"}, r"backend must be local or ray"),
    ({"local": {"a": 1}}, r"local must map variable names to data column names"),
    ({"seed": -1}, r"seed must be >= 0"),
    ({"average_from": 1.5}, r"average_from as a fraction of n must be in \[0, 1\)"),
    ({"average_from": "half"}, r"average_from must be a number or an int or null"),
    ({"diagnose": 10}, r"diagnose must be true/false or a number of draws in \[100, 1e6\]"),
    ({"diagnose": 10**9}, r"diagnose must be true/false or a number of draws in"),
    ({"method": "svgd", "method_options": {"n_particles": 10**9}}, r"n_particles must be <= 100000"),
    ({"optimizer": {"name": "adam", "decay": {"to": float("inf")}}}, r"optimizer.decay.to must be"),
    ({"method": "svgd", "diagnose": True}, r"diagnose needs the density of q"),
])
def test_config_errors_name_the_key_before_anything_runs(tmp_path, capsys, change, match):
    store = tmp_path / "never.zarr"
    cfg = {**BASE, "store": str(store), **change}
    if "checkpoint_every" in change:
        cfg.pop("store")
    assert main(["run", write(tmp_path, cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distvi: error: ")
    import re

    assert re.search(match, err), err
    assert not store.exists()


def test_yaml_is_safe_loaded_and_overrides_are_checked(tmp_path, capsys):
    evil = "model: !!python/object/apply:os.system ['echo pwned > pwned.txt']\n"
    assert main(["run", write(tmp_path, evil)]) == 2
    assert "not valid YAML for safe loading" in capsys.readouterr().err
    assert not Path("pwned.txt").exists()
    path = write(tmp_path, BASE)
    assert main(["run", path, "--set", "n"]) == 2
    assert "--set takes key=value" in capsys.readouterr().err
    assert main(["run", path, "--set", "optimizer.name=nope"]) == 2
    assert "optimizer.name must be one of" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    cfg = load(path, ["optimizer.learning_rate=0.02", "n=7", "data.options.rows=100"])
    assert cfg["optimizer"]["learning_rate"] == 0.02 and cfg["n"] == 7
    assert cfg["data"]["options"] == {"rows": 100}
    with pytest.raises(ConfigError, match="'n' is not a mapping"):
        load(path, ["n.x=1"])


def test_help_for_each_command():
    for argv in (["--help"], ["run", "--help"], ["resume", "--help"], ["summary", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0


def test_run_then_summary_equals_the_python_api(tmp_path, capsys):
    store = tmp_path / "run.zarr"
    cfg = {**BASE, "store": str(store), "checkpoint_every": 20}
    assert main(["run", write(tmp_path, cfg)]) == 0
    out = capsys.readouterr().out
    assert f"run store: {store}" in out
    # the same fit through the Python API gives the same numbers
    from jobs.quickstart import load as load_data, model

    inf = dv.ADVI(model=model, data=load_data(rows=3000), batch_size=500, random_seed=4)
    inf.fit(60, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False)
    run = dv.open_run(store)
    np.testing.assert_array_equal(run.traces["loss"], inf.hist)
    assert run.status == "finished"
    assert main(["summary", str(store)]) == 0
    text = capsys.readouterr().out
    assert "status finished" in text and "60 of 60 recorded" in text
    assert "beta[same_sex]" in text and "intercept" in text and "posterior draws written at the end" in text


def test_summary_and_resume_of_a_killed_run(tmp_path, capsys):
    store = tmp_path / "killed.zarr"
    cfg = {**BASE, "n": 100_000, "store": str(store), "checkpoint_every": 25, "progress": "lines"}
    path = write(tmp_path, cfg)
    proc = subprocess.Popen([sys.executable, "-m", "distvi.cli", "run", path], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                ckpt = dv.open_run(store).checkpoint
            except dv.store.StoreError:
                ckpt = None
            if ckpt is not None and ckpt.step >= 50:
                break
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    step = dv.open_run(store).checkpoint.step
    assert step >= 50
    assert main(["summary", str(store)]) == 0  # nothing the store names is run unasked
    text = capsys.readouterr().out
    assert "status running" in text and f"last checkpoint at step {step}" in text
    assert "summary --sample" in text and "beta[work]" not in text
    assert main(["summary", "--sample", str(store)]) == 0
    text = capsys.readouterr().out
    assert f"from the approximation at the last checkpoint (step {step})" in text
    assert "beta[work]" in text
    assert main(["resume", str(store), "--n", str(step + 30)]) == 0
    run = dv.open_run(store)
    assert run.status == "finished"
    np.testing.assert_array_equal(run.traces["step"], np.arange(1, step + 31))
    assert main(["resume", str(tmp_path / "nothing.zarr")]) == 2
    assert "no run store at" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["configs/quickstart.yaml", "configs/quickstart_fullrank.yaml"])
def test_the_quickstart_configs_run_end_to_end_on_a_slice(tmp_path, capsys, config):
    from jobs.quickstart import main as quickstart

    store = tmp_path / "q.zarr"
    quickstart(["--config", config, "--set", "n=40", "--set", "backend=local", "--set", "num_workers=1",
                "--set", "tracking=false", "--set", f"store={store}", "--set", "data.options={rows: 4000}",
                "--set", "progress=off"])
    out = capsys.readouterr().out
    assert f"run store   {store}" in out and "status finished" in out and "beta[same_sex]" in out
    run = dv.open_run(store)
    assert run.config["method"] == ("FullRankADVI" if "fullrank" in config else "ADVI")
    assert run.traces["step"].size == 40 and run.data["n_rows"] == 4000


def test_a_diagnosed_averaged_run_shows_khat_in_the_store_mlflow_and_summary(tmp_path, capsys):
    from mlflow import MlflowClient

    store = tmp_path / "d.zarr"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = {**BASE, "n": 200, "store": str(store), "average_from": 0.5, "diagnose": 300,
           "tracking": {"experiment": "diag", "tracking_uri": uri}}
    assert main(["run", write(tmp_path, cfg)]) == 0
    out = capsys.readouterr().out
    assert "PSIS k-hat" in out
    run = dv.open_run(store)
    diag = run.diagnosis
    assert diag["draws"] == 300 and diag["verdict"] in ("good", "usable", "do not trust")
    assert run.checkpoint.n_averaged == 100 and run.config["fit"]["average_start"] == 100
    client = MlflowClient(uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("diag").experiment_id])
    assert mlrun.data.metrics["psis_khat"] == pytest.approx(diag["khat"])
    assert mlrun.data.tags["distvi.psis_verdict"] == diag["verdict"]
    assert main(["summary", str(store)]) == 0
    text = capsys.readouterr().out
    assert f"PSIS        k-hat {diag['khat']:.3f} ({diag['verdict']})" in text
    assert diag["advice"] and f"            advice: {diag['advice']}" in text
    assert diag["gradient_evaluations"] == 200 and "the fit used 200 gradient evaluations" in out
    assert "averaging   iterates after step 100 (average_from=0.5)" in text


def test_summary_shows_the_start_and_the_convergence_of_a_run_fitted_until_converged(tmp_path, capsys):
    from jobs.quickstart import load as load_data, model

    store = tmp_path / "conv.zarr"
    inf = dv.ADVI(model=model, data=load_data(rows=300), random_seed=3)
    with inf:
        inf.fit(None, max_n=3000, tol=0.3, store=str(store), progressbar=False)
    conv, start = inf.convergence, inf.start_report
    assert main(["summary", str(store)]) == 0
    text = capsys.readouterr().out
    assert f"steps       {conv.step} (until converged: at most 3000 steps, tol 0.3) recorded" in text
    assert (f"start       map (the best Pathfinder Gaussian on an L-BFGS path): "
            f"{start.gradient_evaluations} gradient evaluations, {start.iterations} L-BFGS "
            f"iterations, {start.seconds:.2f} s") in text
    assert (f"converged   {'yes' if conv.converged else 'no'} ({conv.reason}) at step {conv.step}, "
            f"tol 0.3; {len(conv.phases)} phase(s), {conv.backoffs} backoff(s), "
            f"{conv.gradient_evaluations} gradient evaluations") in text
    rows = [line for line in text.splitlines() if line.startswith("  phase ")]
    assert len(rows) == len(conv.phases) >= 2
    for row, p in zip(rows, conv.phases):
        assert f"rate {p.learning_rate:<10.4g} steps {p.start_step}-{p.end_step} " \
               f"({p.end_step - p.start_step}) x {p.draws} draws {p.outcome}, change " in row
    assert rows[0].endswith("change -") and rows[-1].endswith(f"change {conv.phases[-1].change:.3g}")


def test_summary_says_when_start_map_fell_back():
    from distvi.cli import outcome_lines

    (line,) = outcome_lines({"method": "default", "message": "L-BFGS made no progress (ABNORMAL)",
                             "gradient_evaluations": 3, "iterations": 0, "seconds": 0.5}, None)
    assert line == ("start       default (start='map' fell back: L-BFGS made no progress "
                    "(ABNORMAL)): 3 gradient evaluations, 0 L-BFGS iterations, 0.50 s")


def test_a_job_says_what_it_fitted(tmp_path, capsys):
    from jobs.quickstart import main as quickstart

    t0 = time.perf_counter()
    quickstart(["--config", "configs/quickstart.yaml", "--set", "n=30", "--set", "backend=local",
                "--set", "num_workers=2", "--set", "tracking=false", "--set", "store=null",
                "--set", "checkpoint_every=null",
                "--set", "data.options={rows: 1500}", "--set", "progress=off"])
    wall = time.perf_counter() - t0
    out = capsys.readouterr().out
    # the model reference, its observed variable, the rows and shards, the method, the steps
    found = re.search(r"^fitted jobs\.quickstart:model \(outcome morekids, 1,500 rows, 2 shards on "
                      r"local\) with advi: 30 steps in (\d+\.\d) s$", out, re.M)
    assert found, out
    assert 0 < float(found.group(1)) <= wall + 0.05


def test_the_readme_data_examples_load(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from conftest import write_zarr
    from distvi.config import build_source, validate

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    examples = {d["kind"]: d for d in (yaml.safe_load(b)["data"] for b in blocks)}
    assert set(examples) == {"zarr", "parquet"}
    monkeypatch.chdir(tmp_path)  # the examples' relative paths
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(25, 3)), rng.integers(0, 2, 25)
    write_zarr(tmp_path / "runs" / "scale-data.zarr", {"X": X, "y": y, "unused": np.ones(25)})
    (tmp_path / "data").mkdir()
    for part, rows in (("part0", slice(0, 10)), ("part1", slice(10, 25))):
        pq.write_table(pa.table({"x1": X[rows, 0], "x2": X[rows, 1], "x3": X[rows, 2], "y": y[rows],
                                 "unused": np.ones(rows.stop - rows.start)}),
                       tmp_path / "data" / f"{part}.parquet")
    for kind, example in examples.items():
        source = build_source(validate({**BASE, "data": example})["data"])
        got = source.read(0, source.n_rows)
        assert source.n_rows == 25 and set(got) == {"X", "y"}, kind
        np.testing.assert_array_equal(got["X"], X, err_msg=kind)
        np.testing.assert_array_equal(got["y"], y, err_msg=kind)
