"""Plugin discovery the way a third party meets it.

Two real distributions under ``tests/plugin_dist/`` are pip-installed (built by setuptools,
installed into a temporary ``--target`` folder) and used from fresh Python processes that
find them only through ``PYTHONPATH`` and their ``.dist-info``: ``hfprune-threshold`` adds a
working strategy, ``hfprune-broken`` fails to import. In-process tests build a fresh
registry per test, register plugins in code, and inject a fake distribution into
``importlib.metadata`` discovery (pytest's own technique for testing its plugin loading).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from hfprune import (
    PluginError,
    PruneOptimizer,
    Pruner,
    RecipeError,
    Strategy,
    StrategyConfig,
    hookimpl,
    load_recipe,
)
from hfprune.plugins import DISABLE_AUTOLOAD_ENV, NOT_DISTRIBUTED, PLUGINS_ENV, PluginInfo, build_registry

from conftest import TokenDataset, tiny_bert

PLUGIN_DIST = Path(__file__).parent / "plugin_dist"
DISTRIBUTIONS = ("hfprune-threshold", "hfprune-broken")
MISSING_MODULE = "hfprune_broken_missing_dependency"  # what hfprune_broken imports and cannot find
FFN_TARGETS = r"['re:.*encoder\.layer\.\d+\.(intermediate|output)\.dense']"
THRESHOLD = 0.02  # BERT initialises weights with std 0.02: about two thirds fall below this


def recipe_text(strategy: str, config: str = "{}", schedule: str = "{start: 0, end: 1.0, every: 1}") -> str:
    return (
        f"version: 1\npruners:\n  - strategy: {strategy}\n    targets: {FFN_TARGETS}\n    schedule: "
        f"{schedule}\n    config: {config}\n"
    )


RECIPES = {
    "threshold": recipe_text("threshold", f"{{threshold: {THRESHOLD}}}"),
    "magnitude": recipe_text("magnitude", "{sparsity: 0.5}"),
    "broken": recipe_text("broken"),
}


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch):
    """The tests set the plugin switches themselves; none leaks in from the caller's shell."""
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(PLUGINS_ENV, raising=False)


# --- the real distributions, installed by pip ---------------------------------------------------


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A folder holding both test distributions, installed by pip as a user would.

    The sources are copied first so the build leaves no ``build/`` or ``*.egg-info`` in the
    repository, and no stale build output from an earlier run can be installed.
    """
    root = tmp_path_factory.mktemp("plugin_site")
    sources = []
    for name in DISTRIBUTIONS:
        sources.append(root / "src" / name)
        shutil.copytree(
            PLUGIN_DIST / name,
            sources[-1],
            ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
        )
    site = root / "site"
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--target",
        str(site),
        *map(str, sources),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(
            f"pip could not build and install the test plugins (exit {result.returncode}). "
            "--no-build-isolation builds with this environment's setuptools: install the test extra "
            "(pip install -e '.[test]').\n$ "
            f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}",
            pytrace=False,
        )
    return site


def subprocess_env(site: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (DISABLE_AUTOLOAD_ENV, PLUGINS_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
    )
    env.update(overrides)
    return env


def run(command: list[str], site: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, env=subprocess_env(site, **env), cwd=cwd, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, (
        f"$ {' '.join(command)}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


def plugin_rows(listing: str) -> dict[str, list[str]]:
    """The rows of ``hfprune plugins``' table by strategy: plugin, distribution, version."""
    lines = listing.splitlines()
    assert lines and lines[0].split()[:4] == ["strategy", "plugin", "distribution", "version"], listing
    return {
        line.split()[0]: line.split()[1:4]
        for line in lines[1:]
        if line.strip() and not line.startswith(("failed:", "note:"))
    }


def hfprune_plugins(site: Path, cwd: Path) -> tuple[dict[str, list[str]], str]:
    """Run the installed ``hfprune plugins`` console script; its table rows by strategy, and its output."""
    script = Path(sys.executable).with_name("hfprune")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "hfprune.cli"]
    out = run([*command, "plugins"], site, cwd).stdout
    return plugin_rows(out), out


PROBE = """
import contextlib, io, json, sys
from hfprune import RecipeError, load_recipe
from hfprune.cli import main

listing = io.StringIO()
with contextlib.redirect_stdout(listing):
    assert main(["plugins"]) == 0
recipes = {}
for path in sys.argv[1:]:
    try:
        load_recipe(path)
        recipes[path] = "ok"
    except RecipeError as exc:
        recipes[path] = f"RecipeError: {exc}"
print(json.dumps({"listing": listing.getvalue(), "recipes": recipes}))
"""


def probe(
    site: Path, tmp_path: Path, *names: str, **env: str
) -> tuple[dict[str, list[str]], str, dict[str, str]]:
    """In one fresh process (imports cost seconds): what ``hfprune plugins`` prints, and what loading each
    named recipe from a file gives ('ok' or the RecipeError text)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    paths = []
    for name in names:
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(RECIPES[name])
    report = json.loads(
        run([sys.executable, str(script), *map(str, paths)], site, tmp_path, **env).stdout.splitlines()[-1]
    )
    return (
        plugin_rows(report["listing"]),
        report["listing"],
        {name: report["recipes"][str(path)] for name, path in zip(names, paths)},
    )


def test_cli_lists_installed_plugins_with_their_distributions(plugin_site, tmp_path):
    rows, out = hfprune_plugins(plugin_site, tmp_path)
    assert rows["threshold"] == ["threshold", "hfprune-threshold", "0.3.0"], out
    assert rows["magnitude"] == ["magnitude", "hfprune", importlib.metadata.version("hfprune")], out
    assert "broken" not in rows, out
    failed = [line for line in out.splitlines() if "hfprune-broken" in line]
    assert (
        len(failed) == 1 and "'broken'" in failed[0] and "1.0.0" in failed[0] and MISSING_MODULE in failed[0]
    ), out


TRAIN = """
import json, sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import hfprune_threshold
from hfprune import PruneCallback

recipe, out = sys.argv[1], Path(sys.argv[2])
sys.path.insert(0, sys.argv[3])  # the tests folder: the same tiny model and data as in-process tests
from conftest import TokenDataset, tiny_bert

model = tiny_bert()


class ZerosOnlyGrow(TrainerCallback):
    \"\"\"After every optimizer step, the set of zero weights in the targets contains the previous one.\"\"\"

    def __init__(self, prune):
        self.prune, self.previous, self.ok, self.zero_counts = prune, None, True, []

    def on_step_end(self, args, state, control, **kwargs):
        zeros = [p.detach() == 0 for plan in self.prune.pruner.plans for p in plan.parameters.values()]
        if self.previous is not None:
            self.ok &= all(bool((old & ~new).sum() == 0) for old, new in zip(self.previous, zeros))
        self.previous = zeros
        self.zero_counts.append(sum(int(z.sum()) for z in zeros))


prune = PruneCallback(recipe)
watch = ZerosOnlyGrow(prune)
args = TrainingArguments(
    output_dir=str(out / "trainer"), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-3,
    report_to="none", save_strategy="no", logging_steps=4, use_cpu=True, disable_tqdm=True, seed=0,
)
Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[prune, watch]).train()

names = [name for plan in prune.pruner.plans for name in plan.parameters]
params = dict(model.named_parameters())
torch.save({name: params[name].detach().clone() for name in names}, out / "targets.pt")
torch.save(params["bert.encoder.layer.0.attention.self.query.weight"].detach().clone(), out / "untargeted.pt")
print(json.dumps({
    "sparsity": prune.pruner.sparsity()["sparsity"],
    "strategy": type(prune.pruner.strategies[0]).__module__,
    "plugin_file": hfprune_threshold.__file__,
    "provenance": prune.pruner.plans[0].strategy.plugin.provenance,
    "zeros_only_grow": watch.ok,
    "zero_counts": watch.zero_counts,
}))
"""


def test_installed_plugin_prunes_in_a_stock_trainer(plugin_site, tmp_path):
    (tmp_path / "threshold.yaml").write_text(RECIPES["threshold"])
    (tmp_path / "train.py").write_text(TRAIN)
    out = run(
        [sys.executable, "train.py", "threshold.yaml", str(tmp_path), str(Path(__file__).parent)],
        plugin_site,
        tmp_path,
    ).stdout
    report = json.loads(out.splitlines()[-1])

    assert report["strategy"] == "hfprune_threshold"
    assert Path(report["plugin_file"]).is_relative_to(
        plugin_site
    )  # the pip-installed copy, not the source tree
    assert report["provenance"] == "hfprune-threshold 0.3.0"
    assert report["zeros_only_grow"], report
    assert len(report["zero_counts"]) == 6

    targets = torch.load(tmp_path / "targets.pt")
    assert len(targets) == 4  # intermediate.dense and output.dense of both layers
    below = {name: w[w.abs() < THRESHOLD] for name, w in targets.items()}
    assert all(bool((b == 0).all()) for b in below.values()), "a weight under the threshold survived training"
    zeros = sum(int((w == 0).sum()) for w in targets.values())
    total = sum(w.numel() for w in targets.values())
    assert 0.5 < zeros / total < 1.0
    assert report["sparsity"] == pytest.approx(zeros / total)
    assert (
        int((torch.load(tmp_path / "untargeted.pt") == 0).sum()) == 0
    )  # modules outside the recipe are untouched


def test_broken_plugin_fails_only_the_recipe_that_names_it(plugin_site, tmp_path):
    _, _, results = probe(plugin_site, tmp_path, "broken", "threshold", "magnitude")
    assert results["threshold"] == "ok" and results["magnitude"] == "ok", results
    error = results["broken"]
    assert error.startswith("RecipeError: "), error
    assert "hfprune-broken" in error and "1.0.0" in error, error
    assert f"ModuleNotFoundError: No module named '{MISSING_MODULE}'" in error, error
    assert f"{tmp_path / 'broken.yaml'}:3: pruners[0].strategy:" in error, error  # file, line and key


def test_autoload_switches(plugin_site, tmp_path):
    rows, listing, results = probe(plugin_site, tmp_path, "magnitude", **{DISABLE_AUTOLOAD_ENV: "1"})
    assert rows == {}, listing
    assert DISABLE_AUTOLOAD_ENV in listing and "hfprune-broken" not in listing, listing
    assert (
        results["magnitude"].startswith("RecipeError: ")
        and "unknown strategy 'magnitude'" in results["magnitude"]
    )
    assert DISABLE_AUTOLOAD_ENV in results["magnitude"] and PLUGINS_ENV in results["magnitude"], results

    rows, listing, results = probe(
        plugin_site,
        tmp_path,
        "magnitude",
        "threshold",
        **{DISABLE_AUTOLOAD_ENV: "1", PLUGINS_ENV: "magnitude"},
    )
    assert list(rows) == ["magnitude"] and rows["magnitude"][1] == "hfprune", listing
    assert results["magnitude"] == "ok", results
    assert "unknown strategy 'threshold'" in results["threshold"], results


# --- in process: a fresh registry per test ----------------------------------------------------


class Toy(Strategy):
    """A strategy that changes nothing."""


class OtherToy(Strategy):
    """Another strategy that changes nothing."""


def module_plugin(module_name: str, **strategies: type) -> types.ModuleType:
    """A plugin as a plain module object, the shape an entry point loads."""
    module = types.ModuleType(module_name)

    @hookimpl
    def hfprune_register_strategies(register):
        for name, cls in strategies.items():
            register(name, cls)

    module.hfprune_register_strategies = hfprune_register_strategies
    return module


def test_module_registered_in_code():
    registry = build_registry(extra_plugins={"toys": module_plugin("toys", toy=Toy)})
    info = registry.get("toy")
    assert info.cls is Toy and info.description == "A strategy that changes nothing."
    assert info.plugin == PluginInfo("toys", NOT_DISTRIBUTED, "")
    assert registry.get("magnitude").plugin.distribution == "hfprune"  # entry points still load beside it

    recipe = load_recipe(recipe_text("toy"), registry)
    plans = Pruner(recipe, registry).attach(tiny_bert())
    assert plans[0].strategy is info and len(plans[0].parameters) == 4


def test_object_with_hookimpl_method():
    class Plugin:
        @hookimpl
        def hfprune_register_strategies(self, register):
            register("toy", Toy)
            register("other-toy", OtherToy)

    registry = build_registry(extra_plugins={"object-plugin": Plugin()})
    assert registry.get("toy").cls is Toy and registry.get("other-toy").cls is OtherToy
    assert registry.get("other-toy").plugin.name == "object-plugin"


def test_same_strategy_name_from_two_plugins_names_both_when_asked_for():
    registry = build_registry(
        extra_plugins={
            "first": module_plugin("first", toy=Toy),
            "second": module_plugin("second", toy=OtherToy),
        }
    )
    assert registry.get("magnitude").cls.__name__ == "MagnitudeStrategy"  # the clash blocks only its own name
    with pytest.raises(PluginError) as info:
        registry.get("toy")
    message = str(info.value)
    assert "'toy'" in message and "'first'" in message and "'second'" in message, message


def test_plugin_cannot_take_over_a_builtin_name():
    registry = build_registry(extra_plugins={"impostor": module_plugin("impostor", magnitude=Toy)})
    with pytest.raises(PluginError) as info:
        registry.get("magnitude")
    message = str(info.value)
    assert "'magnitude'" in message and "hfprune 0.2.0" in message and "'impostor'" in message, message


@pytest.mark.parametrize(
    "not_a_strategy",
    [object, StrategyConfig, Toy(StrategyConfig(), {}, {}, None), lambda *args: Toy, "Toy"],
    ids=["object", "config-class", "strategy-instance", "factory", "string"],
)
def test_registering_a_non_strategy_is_an_error(not_a_strategy):
    registry = build_registry(extra_plugins={"bad": module_plugin("bad", toy=not_a_strategy)})
    with pytest.raises(PluginError, match=r"plugin 'bad' .* registered 'toy' as .*not a Strategy subclass"):
        registry.get("toy")


def test_a_plugin_whose_hook_raises_fails_alone():
    module = types.ModuleType("exploding")

    @hookimpl
    def hfprune_register_strategies(register):
        register("half", Toy)
        raise RuntimeError("boom")

    module.hfprune_register_strategies = hfprune_register_strategies
    registry = build_registry(extra_plugins={"exploding": module, "toys": module_plugin("toys", toy=Toy)})
    assert registry.get("toy").cls is Toy
    with pytest.raises(PluginError, match="plugins that failed to load: exploding .*RuntimeError: boom"):
        registry.get("half")  # nothing it registered before failing is kept


def test_a_misspelled_hook_is_reported_not_ignored():
    module = types.ModuleType("typo")

    @hookimpl
    def hfprune_register_strategy(register):  # missing the final "s"
        register("toy", Toy)

    module.hfprune_register_strategy = hfprune_register_strategy
    registry = build_registry(extra_plugins={"typo": module})
    [failed] = registry.failed
    assert failed.name == "typo" and "unknown hook(s) hfprune_register_strategy" in failed.error


def test_a_hook_with_a_bad_signature_is_a_load_failure_not_a_crash():
    module = types.ModuleType("badsig")

    @hookimpl
    def hfprune_register_strategies(reg):
        reg("toy", Toy)

    module.hfprune_register_strategies = hfprune_register_strategies
    registry = build_registry(extra_plugins={"badsig": module})
    assert [p.name for p in registry.failed] == ["badsig"] and "PluginValidationError" in registry.failed[
        0
    ].error


def test_a_plugin_name_used_twice_is_a_conflict_for_that_name_only():
    registry = build_registry(extra_plugins={"magnitude": module_plugin("magnitude", toy=Toy)})
    with pytest.raises(PluginError, match="plugin name 'magnitude' is declared by both hfprune .* and"):
        registry.get("magnitude")


def test_a_mistyped_plugins_variable_is_reported(monkeypatch):
    monkeypatch.setenv("HFPRUNE_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("HFPRUNE_PLUGINS", "magnitud")
    registry = build_registry()
    with pytest.raises(PluginError, match="no installed distribution has an entry point 'magnitud'"):
        registry.get("magnitud")


GOOD_PLUGIN = '''
from hfprune import Strategy, hookimpl


class FakeStrategy(Strategy):
    """Provided by a distribution that exists only as a dist-info folder."""


@hookimpl
def hfprune_register_strategies(register):
    register("fake", FakeStrategy)
'''


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """Make ``install(...)`` put a distribution on sys.path as a dist-info folder beside its module.

    importlib.metadata finds it on the next ``entry_points()`` call, exactly as it finds a
    pip-installed one; the module is dropped from sys.modules afterwards.
    """
    site = tmp_path / "site"
    site.mkdir()
    modules = []

    def install(dist: str, version: str, entry_point: str, module: str, source: str) -> None:
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[hfprune]\n{entry_point} = {module}\n")
        modules.append(module)
        monkeypatch.syspath_prepend(site)  # also invalidates importlib's caches

    yield install
    for module in modules:
        sys.modules.pop(module, None)


def test_fake_distribution_is_discovered_with_its_name_and_version(fake_distribution):
    fake_distribution("fake-dist", "1.0", "fake", "fake_hfprune_plugin", GOOD_PLUGIN)
    found = [ep for ep in importlib.metadata.entry_points(group="hfprune") if ep.name == "fake"]
    assert [(ep.value, ep.dist.name) for ep in found] == [("fake_hfprune_plugin", "fake-dist")]

    registry = build_registry()
    info = registry.get("fake")
    assert info.cls.__module__ == "fake_hfprune_plugin"
    assert info.plugin == PluginInfo("fake", "fake-dist", "1.0") and info.plugin.provenance == "fake-dist 1.0"
    assert info.plugin in registry.plugins and "magnitude" in registry.strategies
    assert load_recipe(recipe_text("fake"), registry).pruners[0].strategy == "fake"


def test_fake_distribution_that_fails_to_import(fake_distribution):
    fake_distribution(
        "fake-broken", "2.5", "fakebroken", "fake_broken_plugin", "raise ImportError('needs libfoo')\n"
    )
    registry = build_registry()  # a broken plugin does not break the registry
    assert PluginInfo("fakebroken", "fake-broken", "2.5", "ImportError: needs libfoo") in registry.plugins
    assert "magnitude" in registry.strategies
    load_recipe(RECIPES["magnitude"], registry)

    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_text("fakebroken"), registry)
    assert info.value.line == 3 and info.value.key == "pruners[0].strategy"
    assert "fake-broken 2.5" in str(info.value) and "ImportError: needs libfoo" in str(info.value)


def test_autoload_off_loads_only_named_entry_points(fake_distribution, monkeypatch):
    fake_distribution("fake-dist", "1.0", "fake", "fake_hfprune_plugin", GOOD_PLUGIN)
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    registry = build_registry()
    assert registry.strategies == {} and registry.plugins == [] and not registry.autoload
    with pytest.raises(PluginError, match=f"{DISABLE_AUTOLOAD_ENV}.*{PLUGINS_ENV}"):
        registry.get("fake")

    monkeypatch.setenv(PLUGINS_ENV, "fake")
    assert list(build_registry().strategies) == ["fake"]
    monkeypatch.setenv(PLUGINS_ENV, " magnitude , fake ")
    assert sorted(build_registry().strategies) == ["fake", "magnitude"]
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "0")  # "0" means autoloading stays on
    assert build_registry().autoload


# --- the installed threshold strategy in a hand-written loop ----------------------------------


@pytest.fixture
def threshold_registry(plugin_site, monkeypatch):
    """A registry that sees the pip-installed test plugins, in this process."""
    monkeypatch.syspath_prepend(plugin_site)
    yield build_registry()
    for module in ("hfprune_threshold", "hfprune_broken"):
        sys.modules.pop(module, None)


@pytest.fixture
def one_thread():
    """A model of width 32 runs fastest on one thread, and several threads crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_threshold_strategy_masks_only_grow_and_resume(threshold_registry, one_thread):
    assert threshold_registry.get("threshold").plugin.provenance == "hfprune-threshold 0.3.0"
    with pytest.raises(RecipeError, match="threshold.*must be > 0"):
        load_recipe(recipe_text("threshold", "{threshold: 0}"), threshold_registry)
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(recipe_text("threshold", "{threshold: 0.1, sparsity: 0.5}"), threshold_registry)

    model = tiny_bert()
    pruner = Pruner(
        recipe_text("threshold", f"{{threshold: {THRESHOLD}}}", "{start: 0, end: 4, every: 2}"),
        threshold_registry,
    )
    pruner.attach(model)
    pruner.start(total_steps=6)
    optimizer = PruneOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), pruner)
    params = list(pruner.plans[0].parameters.values())
    data = TokenDataset(size=8)
    batch = {k: torch.stack([torch.as_tensor(data[i][k]) for i in range(8)]) for k in ("input_ids", "labels")}
    pruned = None
    for step in range(6):
        model(**batch).loss.backward()
        if pruned is not None:  # try to bring pruned weights back: the mask puts them to zero again
            with torch.no_grad():
                for p, gone in zip(params, pruned):
                    p[gone] = 1.0
        optimizer.step()
        optimizer.zero_grad()
        zeros = [p == 0 for p in params]
        if pruned is not None:
            assert all(bool(z[gone].all()) for z, gone in zip(zeros, pruned)), (
                f"a pruned weight came back at step {step}"
            )
        if step in (0, 2, 4):  # update steps: nothing under the threshold survives
            assert all(bool((p[p.abs() < THRESHOLD] == 0).all()) for p in params)
        pruned = zeros
    assert 0.5 < pruner.sparsity()["sparsity"] < 1.0

    resumed = Pruner(pruner.recipe, threshold_registry)
    resumed.attach(model)
    resumed.start(total_steps=6)
    resumed.load_state_dict(pruner.state_dict())
    assert resumed.step == 6
    assert all(
        torch.equal(a, b) for a, b in zip(resumed.strategies[0].masks.masks, pruner.strategies[0].masks.masks)
    )
