"""fk.export.nvflare: an experiment as an NVIDIA FLARE job that FLARE's own simulator runs to the end,
with the final global accuracy within 0.03 of fedkit's run of the same settings (FedAvg, and FedProx with cross-site evaluation);
refusals that name FLARE's counterpart; the missing extra; ``fedkit export nvflare``.

The two FLARE runs (about 30 s each on 2 cores: FLARE starts a server and client processes) are made
once per module and shared."""

import dataclasses
import json
import subprocess
import sys
import time

import pytest

pytest.importorskip("nvflare")

import fedkit as fk  # noqa: E402
from fedkit import export  # noqa: E402
from fedkit.cli import main  # noqa: E402
from fedkit.aggregate import apply_rule, weighted_mean  # noqa: E402
from fedkit.export.flare_site import FedkitSite  # noqa: E402
from fedkit.export.settings import settings_of  # noqa: E402
from fedkit.workflows import Chain, CrossSiteEval, cross_site_dataframe  # noqa: E402

FLARE_TIMEOUT = 300  # seconds; a hung FLARE fails the test instead of hanging CI


def experiment(workflow):
    return fk.Experiment.preset("smoke", data=fk.DataSpec(clients=2), workflow=workflow)


def both(workflow, tmp):
    """fedkit's run and FLARE's run of the same experiment, with their wall times."""
    exp = experiment(workflow)
    job = export.nvflare(exp, tmp / "jobs" / "job")
    started = time.perf_counter()
    ours = exp.simulator().run(progress=False)
    ours_s = time.perf_counter() - started
    theirs = export.run_in_flare_simulator(job, tmp / "workspace", timeout=FLARE_TIMEOUT)
    return job, ours, ours_s, theirs


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory):
    return both(fk.FedAvg(rounds=2), tmp_path_factory.mktemp("fedavg"))


@pytest.fixture(scope="module")
def fedprox(tmp_path_factory):
    # with FLARE's cross-site evaluation after training, as fedkit's Chain(..., CrossSiteEval()) asks
    return both(Chain(fk.FedProx(rounds=2, mu=0.1), CrossSiteEval()), tmp_path_factory.mktemp("fedprox"))


def test_flare_runs_the_exported_fedavg_to_the_end_with_fedkits_accuracy(fedavg):
    job, ours, ours_s, theirs = fedavg
    assert {"meta.json", "app/config/config_fed_server.json", "app/custom/fedkit_client.py",
            "app/custom/fedkit_experiment.json"} <= set(job.files())
    server = json.loads((job.path / "app/config/config_fed_server.json").read_text())
    assert server["workflows"][0]["path"] == "nvflare.app_common.workflows.fedavg.FedAvg"
    assert server["workflows"][0]["args"]["num_rounds"] == 2
    assert theirs.status == "done" and len(theirs.history) == 2
    assert [set(r.clients) for r in theirs.history] == [{"site-1", "site-2"}] * 2
    assert abs(theirs.history.last("accuracy") - ours.history.last("accuracy")) <= 0.03
    print(f"\nfedkit {ours_s:.1f}s, FLARE simulator {theirs.seconds:.1f}s: ratio {theirs.seconds / ours_s:.1f}")
    fig = fk.plots.curves({"fedkit": ours, "NVFlare": theirs})  # the overlay the notebook shows
    assert len(fig.data) == 2


def test_flare_runs_the_exported_fedprox_and_cross_site_evaluation_with_fedkits_numbers(fedprox):
    job, ours, _, theirs = fedprox
    server = json.loads((job.path / "app/config/config_fed_server.json").read_text())
    assert server["workflows"][0]["args"]["fedprox_mu"] == 0.1  # FLARE sends mu; the client script reads it
    assert theirs.status == "done" and len(theirs.history) == 2
    assert abs(theirs.history.last("accuracy") - ours.history.last("accuracy")) <= 0.03
    assert "CrossSiteModelEval" in (job.path / "app/config/config_fed_server.json").read_text()
    flare_matrix, our_matrix = cross_site_dataframe(theirs.history), cross_site_dataframe(ours)
    assert list(flare_matrix.index) == ["site-1", "site-2", "global"] == list(our_matrix.index)
    assert (flare_matrix - our_matrix).abs().max().max() <= 0.03


def test_fedopt_exports_as_flares_fedopt_recipe_starting_from_fedkits_model(tmp_path):
    exp = dataclasses.replace(experiment(fk.FedOpt(rounds=2, server_opt=fk.server_opt.SGD(lr=1.0, momentum=0.6))),
                              seed=3)
    job = export.nvflare(exp, tmp_path / "job")
    server = (job.path / "app/config/config_fed_server.json").read_text()
    assert "PTFedOptModelShareableGenerator" in server and '"momentum": 0.6' in server
    # FedOpt's server model is built from the class path (it never reads the initial checkpoint): fedkit's seeded one
    assert "fedkit.export.flare_model.SeededMLP" in server and '"seed": 3' in server
    assert not any(f.startswith("app/custom/fedkit/") for f in job.files())  # the installed fedkit, not a copy


def test_each_flare_site_trains_as_fedkits_client_of_its_index():
    """site-k is seeded as the simulator seeds its k-th client (`fedkit.seeds.client_seed`): the sites' first round,
    averaged as FedAvg does, is fedkit's first round bit for bit. Another seed would train other batches."""
    exp = experiment(fk.FedAvg(rounds=1))
    ours = exp.simulator().run(progress=False)
    settings = settings_of(exp)
    initial = exp.simulator().initial_weights()
    trained = [FedkitSite(settings, f"site-{k}").train(dict(initial), round=0) for k in (1, 2)]
    mean = apply_rule(weighted_mean, [(t["diff"], t["samples"]) for t in trained])
    assert fk.weights.sha256(fk.weights.add(initial, mean)) == ours.model_sha256


def test_a_rule_written_in_a_cell_is_refused_with_flares_counterpart(tmp_path):
    exp = experiment(fk.FedAvg(rounds=2, aggregate=lambda updates: updates[0][0]))
    with pytest.raises(export.NotExportable, match="ModelAggregator.*FedAvgRecipe\\(aggregator=") as e:
        export.nvflare(exp, tmp_path / "job")
    assert "weighted_mean" in str(e.value) and not (tmp_path / "job").exists()


def test_fedkits_he_is_refused_with_flares_he_recipe(tmp_path):
    with pytest.raises(export.NotExportable, match="FedAvgRecipeWithHE.*nvflare provision"):
        export.nvflare(experiment(fk.FedAvg(rounds=2, he=fk.he.CKKS())), tmp_path / "job")


@pytest.mark.parametrize("workflow, counterpart", [
    (lambda: fk.SCAFFOLD(rounds=2), "ScaffoldRecipe"),
    (lambda: Chain(fk.FedAvg(rounds=1), fk.FedAvg(rounds=1)), "ModelController"),
    (lambda: fk.FedAvg(rounds=2, min_clients=1), "ScatterAndGather"),
    (lambda: fk.FedOpt(rounds=2, server_opt=fk.server_opt.Adam()), "torch.optim.Adam"),
    (lambda: fk.DPFedAvg(rounds=2), "nvflare.app_common.filters"),
], ids=["scaffold", "chain", "min_clients", "adam", "dp"])
def test_what_flare_cannot_run_as_fedkit_does_is_refused(tmp_path, workflow, counterpart):
    with pytest.raises(export.NotExportable, match=counterpart.replace(".", "\\.").replace("(", "\\(")):
        export.nvflare(experiment(workflow()), tmp_path / "job")


def test_a_hand_built_simulator_is_refused_but_one_from_an_experiment_exports(tmp_path):
    data = fk.data.load("digits")
    sim = fk.Simulator(fk.FedAvg(rounds=1), model=lambda: fk.models.for_data(data),
                       clients=fk.data.iid(data.train, clients=2, seed=0), test=data.test)
    with pytest.raises(export.NotExportable, match="fk.Experiment"):
        export.nvflare(sim, tmp_path / "job")
    job = export.nvflare(experiment(fk.FedAvg(rounds=1)).simulator(engine="vectorized"), tmp_path / "job")
    assert job.settings["rounds"] == 1 and job.clients == 2


@pytest.mark.parametrize("option", [{"executors": {"train": lambda task, ctx, abort: None}},
                                    {"client_result_filters": [lambda dxo, ctx: dxo]}, {"val_fraction": 0.3}],
                         ids=["executors", "filters", "val_fraction"])
def test_a_simulator_whose_options_change_the_run_is_refused_not_exported_as_its_experiment(tmp_path, option):
    sim = experiment(fk.FedAvg(rounds=1)).simulator(**option)
    with pytest.raises(export.NotExportable, match="options that change what is trained"):
        export.nvflare(sim, tmp_path / "job")
    assert not (tmp_path / "job").exists()


def test_without_nvflare_the_error_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvflare", None)  # `import nvflare` now raises ImportError
    with pytest.raises(export.FlareMissing, match=r"pip install 'fedkit\[flare\]'"):
        export.nvflare(experiment(fk.FedAvg(rounds=1)), tmp_path / "job")
    assert not (tmp_path / "job").exists()


def test_importing_fedkit_and_fk_export_does_not_import_nvflare():
    code = "import sys, fedkit as fk; fk.export.nvflare; assert 'nvflare' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_cli_exports_the_run_flags_as_a_job(tmp_path, capsys):
    out = tmp_path / "jobs" / "prox"
    assert main(["export", "nvflare", "--out", str(out), "--algorithm", "fedprox", "--mu", "0.1", "--clients", "2",
                 "--rounds", "2"]) == 0
    said = capsys.readouterr().out
    assert f"nvflare simulator {out} -w" in said and "-n 2" in said
    settings = json.loads((out / "app/custom/fedkit_experiment.json").read_text())
    assert (settings["algorithm"], settings["mu"], settings["rounds"], settings["clients"]) == ("fedprox", 0.1, 2, 2)


@pytest.mark.parametrize("flags, words", [
    (["--he"], "FedAvgRecipeWithHE"),
    (["--aggregate", "median"], "ModelAggregator"),
    (["--mu", "0.1"], "--mu only means something with --algorithm fedprox"),
    (["--engine", "vectorized"], "--engine means nothing for an exported job"),
    (["--rounds", "0"], "--rounds"),
], ids=["he", "median", "unused", "engine", "bad-value"])
def test_the_cli_refuses_bad_flags_with_exit_2(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as e:
        main(["export", "nvflare", "--out", str(tmp_path / "job"), *flags])
    assert e.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "job").exists()


def test_a_written_folder_a_foreign_folder_and_old_settings_are_refused_saying_what_to_do(tmp_path):
    exp = experiment(fk.FedAvg(rounds=1))
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "notes.txt").write_text("mine")
    with pytest.raises(fk.ConfigError, match="overwrite=True"):
        export.nvflare(exp, tmp_path / "job")
    assert (tmp_path / "job" / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="fk.export.nvflare"):
        export.read_flare_history(tmp_path / "ws", tmp_path / "job")
    with pytest.raises(fk.ConfigError, match="export the job again"):
        export.experiment_of({**export.settings_of(exp), "format": 0})


def user_folder(path):
    """A folder of a user's own work, which no export may delete."""
    path.mkdir(parents=True)
    (path / "notebook.ipynb").write_text('{"cells": []}')
    (path / "data.csv").write_text("x,y\n1,2\n")
    return path


def holds_the_users_files(path):
    return sorted(f.name for f in path.iterdir()) == ["data.csv", "notebook.ipynb"] and \
        (path / "data.csv").read_text() == "x,y\n1,2\n"


@pytest.fixture
def nothing_deleted(monkeypatch):
    """A refusal must come before any deletion: a call of shutil.rmtree fails the test instead of deleting."""
    monkeypatch.setattr(export.nvflare_job.shutil, "rmtree", lambda *a, **k: pytest.fail(f"rmtree{a} was called"))


def test_export_refuses_a_folder_it_did_not_write(tmp_path, capsys, monkeypatch, nothing_deleted):
    mine = user_folder(tmp_path / "work" / "inner")
    with pytest.raises(export.FolderRefused, match=r"notebook\.ipynb.*even with overwrite=True; nothing was deleted"):
        export.nvflare(experiment(fk.FedAvg(rounds=1)), mine, overwrite=True)
    assert holds_the_users_files(mine)
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(SystemExit) as e:  # the command line of the report: a sibling folder, with --overwrite
        main(["export", "nvflare", "--out", "../work/inner", "--overwrite", "--clients", "2", "--rounds", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and holds_the_users_files(mine)
    assert err.startswith("fedkit export nvflare: error: ../work/inner holds what an export did not write") and \
        "even with --overwrite" in err and len(err.strip().splitlines()) == 2


@pytest.mark.parametrize("out, words", [(".", "is the working directory"), ("..", "a folder above the working"),
                                        ("", "is the working directory"), ("~", "your home folder"),
                                        ("/", "a folder above the working")], ids=["dot", "dotdot", "empty", "home", "root"])
def test_export_refuses_the_working_directory_its_parents_home_and_root(tmp_path, capsys, monkeypatch, nothing_deleted,
                                                                        out, words):
    home = user_folder(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))  # Path.home(): a stand-in that holds a user's files too
    cwd = user_folder(tmp_path / "work" / "project")
    monkeypatch.chdir(cwd)
    path = str(home) if out == "~" else out
    with pytest.raises(export.FolderRefused, match=words + r".*nothing was written.*out='jobs/"):
        export.nvflare(experiment(fk.FedAvg(rounds=1)), path, overwrite=True)
    with pytest.raises(SystemExit) as e:  # `--out .` was a raw ValueError traceback from FLARE
        main(["export", "nvflare", "--out", path, "--overwrite", "--clients", "2", "--rounds", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and words in err and "e.g. --out jobs/" in err
    assert holds_the_users_files(cwd) and holds_the_users_files(home)


def test_export_replaces_only_a_folder_an_earlier_export_wrote(tmp_path):
    exp = experiment(fk.FedAvg(rounds=1))
    job = export.nvflare(exp, tmp_path / "job")
    marker = json.loads((job.path / export.MARKER).read_text())
    assert marker["written_by"] == "fedkit.export.nvflare" and marker["files"] == \
        [f for f in job.files() if f != export.MARKER] and "meta.json" in marker["files"]
    with pytest.raises(export.FolderRefused, match="an earlier export wrote: pass overwrite=True"):
        export.nvflare(exp, job.path)
    again = export.nvflare(dataclasses.replace(exp, seed=7), job.path, overwrite=True)
    assert again.settings["seed"] == 7 and json.loads((job.path / "app/custom/fedkit_experiment.json").read_text()) \
        ["seed"] == 7
    (job.path / "app" / "notes.txt").write_text("mine")  # a file of the user's in the job folder: no longer replaced
    with pytest.raises(export.FolderRefused, match=r"also holds app/notes\.txt.*move those files out"):
        export.nvflare(exp, job.path, overwrite=True)
    assert (job.path / "app" / "notes.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(export.FolderRefused, match="is a file"):
        export.nvflare(exp, tmp_path / "a-file", overwrite=True)
    assert (tmp_path / "a-file").read_text() == "mine"
