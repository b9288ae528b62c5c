"""The metric vocabulary: which key to read for a run's accuracy, loss and epsilon."""

import fedkit.metrics as M


def test_names_are_the_ones_runs_record():
    assert (M.ACCURACY, M.LOSS, M.CLIENT_ACCURACY, M.CLIENT_LOSS) == (
        "accuracy", "loss", "client_accuracy", "client_loss")
    assert (M.EPSILON, M.CLIENT_EPSILON, M.EPSILON_NEXT, M.DELTA) == (
        "epsilon", "client_epsilon", "epsilon_next", "delta")
    assert M.HE_COSTS == ("he_encrypt_s", "he_decrypt_s", "he_aggregate_s", "bytes_cipher_up", "bytes_cipher_down",
                          "bytes_plain_up", "bytes_plain_down")
    assert M.HE_SETUP_S not in M.HE_COSTS  # first round only


def test_scored_prefers_the_server_test_set():
    assert M.scored({"accuracy": 0.5, "loss": 1.0}) == ("accuracy", "loss", "server test set")
    both = {"accuracy": 0.5, "loss": 1.0, "client_accuracy": 0.6, "client_loss": 0.9}
    assert M.scored(both) == ("accuracy", "loss", "server test set")


def test_scored_falls_back_to_the_clients_then_to_none():
    he = {"client_accuracy": 0.6, "client_loss": 0.9, "clients_validated": 3}
    assert M.scored(he) == ("client_accuracy", "client_loss", "clients' validation splits")
    assert M.scored({"bytes_up": 10}) == ("accuracy", "loss", "none")
    assert M.scored({}) == ("accuracy", "loss", "none")
    assert M.scored({"client_accuracy"}) == ("client_accuracy", "client_loss", "clients' validation splits")  # names


def test_resolve_maps_only_accuracy_and_loss():
    he = {"client_accuracy", "client_loss", "client_epsilon"}
    assert [M.resolve(m, he) for m in ("accuracy", "loss", "epsilon", "bytes_up")] == [
        "client_accuracy", "client_loss", "epsilon", "bytes_up"]
    assert [M.resolve(m, {"accuracy", "loss"}) for m in ("accuracy", "loss")] == ["accuracy", "loss"]


def test_epsilons_in_fixed_order():
    assert M.epsilons(["client_epsilon", "loss", "epsilon"]) == ["epsilon", "client_epsilon"]
    assert M.epsilons(["client_epsilon"]) == ["client_epsilon"]
    assert M.epsilons({"epsilon": 1.0, "epsilon_next": 1.2}) == ["epsilon"]  # a dict's keys; epsilon_next is a row's
    assert M.epsilons(iter(["accuracy", "delta"])) == []


def test_reported_and_labels():
    assert M.reported([{"loss": 1.0}, {}, {"client_epsilon": 2.0, "loss": 0.5}]) == {"loss", "client_epsilon"}
    assert M.reported([]) == set()
    assert M.label("client_epsilon") == "epsilon, example-level (DP-SGD, worst client)"
    assert M.label("epsilon") == "epsilon, user-level (DP-FedAvg)"
    assert M.label("accuracy") == "accuracy" and M.label("bytes_up") == "bytes_up"
    assert len({M.label(k) for k in (M.EPSILON, M.CLIENT_EPSILON, M.CLIENT_ACCURACY, M.ACCURACY)}) == 4


def test_imports_nothing_from_fedkit():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(M))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported == ["__future__", "typing"]
